"""retrieval.py and eval_retrieval.py: chunking, bad input, BM25 and fusion against brute force, dense search with
the tiny random model, reference parsing. No downloads; the tiny model comes from conftest."""
import math
import re

import numpy as np
import pytest

import common
import eval_retrieval as ev
import retrieval

LAW = """---
제목: 테스트보호법 시행령
법령구분: 대통령령
공포일자: 2024-01-01
첨부파일: []
---

# 테스트보호법 시행령

## 제1장 총칙

##### 제1조 (목적)

이 영은 테스트보호법에서 위임된 사항을 정함을 목적으로 한다.

##### 제2조 (정의)

**①** 이 영에서 사용하는 용어의 뜻은 다음과 같다.

  1\\. "전자서명"이란 전자문서에 첨부된 정보를 말한다.
  2\\. "가입자"란 인증을 받은 자를 말한다.

**②** 그 밖의 용어는 법에서 정하는 바에 따른다.

##### 제3조

삭제 <2020.2.4>

## 제2장 보칙

##### 제3조의2 (긴 조문)

{long}

## 부칙

부칙 <제100호,2020.1.1>

이 영은 2020년부터 시행한다.

부칙 <제200호,2024.1.1>

제1조(시행일) 이 영은 공포한 날부터 시행한다.
"""
LONG = "\n".join(f"**{i}** 금융회사는 개인정보 유출 사고 {i}호를 보고하여야 한다." for i in range(1, 41))


def word_spans(text):
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def write_law(folder, name="테스트보호법__시행령.md", text=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text if text is not None else LAW.replace("{long}", LONG), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- chunking
def test_law_chunks_keep_structure(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "WINDOW_TOKENS", 60)
    monkeypatch.setattr(retrieval, "WINDOW_OVERLAP", 10)
    write_law(tmp_path / "laws")
    chunks = retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)
    articles = [c.article for c in chunks]
    assert articles[:2] == ["제1조", "제2조"]
    assert "제3조" not in articles  # deleted article: no chunk
    assert chunks[0].law == "테스트보호법" and chunks[0].kind == "시행령"
    assert chunks[0].source == "laws/테스트보호법__시행령.md"
    assert chunks[0].text.split("\n")[0] == "테스트보호법 [시행령] 제1조 (목적)"
    definition = chunks[1].text
    assert "**①**" in definition and "**②**" in definition and "가입자" in definition
    assert "제1장" not in " ".join(c.text for c in chunks)  # chapter headings are not article text
    long = [c for c in chunks if c.article == "제3조의2"]
    assert len(long) > 1 and all(c.parts == len(long) for c in long)
    assert [c.part for c in long] == list(range(1, len(long) + 1))
    assert all(c.text.startswith("테스트보호법 [시행령] 제3조의2 (긴 조문)\n") for c in long)
    addenda = [c for c in chunks if c.article == "부칙"]
    assert len(addenda) == 1 and addenda[0].title == "제200호,2024.1.1"  # the newest 부칙 only
    assert "2020년부터" not in addenda[0].text
    assert [c.id for c in chunks] == list(range(len(chunks)))


def test_addenda_policy_all(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "ADDENDA", "all")
    write_law(tmp_path / "laws")
    chunks = retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)
    assert len([c for c in chunks if c.article == "부칙"]) == 2


def test_token_windows_cover_and_overlap():
    text = LONG
    spans = word_spans(text)
    windows = retrieval.token_windows(text, spans, size=50, overlap=12)
    assert len(windows) > 1
    sizes = [len(word_spans(w)) for w in windows]
    assert max(sizes) <= 50
    for a, b in zip(windows, windows[1:]):  # consecutive windows share text, cut at a line start
        assert b.split("\n")[0] in a
        assert b.startswith("**")
    covered = set()
    for w in windows:
        covered |= set(w.split("\n"))
    assert covered == set(text.split("\n"))
    assert retrieval.token_windows("짧은 조문", word_spans("짧은 조문"), 50, 12) == ["짧은 조문"]


def test_token_windows_single_long_line():
    text = " ".join(f"단어{i}" for i in range(100))
    windows = retrieval.token_windows(text, word_spans(text), size=30, overlap=5)
    assert all(len(word_spans(w)) <= 30 for w in windows)
    assert windows[0].split()[-5:] == windows[1].split()[:5]
    assert windows[-1].endswith("단어99")


def test_guideline_chunks(tmp_path):
    text = ("# source: test note\n규정이름\n[시행 2020. 1. 1.]\n 제1장 총 칙\n"
            "제1조(목적) 이 규정은 전자금융거래의 안전성을 확보하기 위하여 필요한 사항을 정함을 목적으로 하며 이는 중요\n"
            "하다.\n"
            "제2조(정의) ① 이 규정에서 사용하는 용어의 정의는 다음과 같다.\n1. \"전산실\"이란 장소를 말한다.\n"
            "부칙 <제1호, 2020.1.1.>\n이 규정은 공포한 날부터 시행한다.\n"
            "[별표 1] 보안 점검 항목\n┃항목 │내용┃\n┃암호 │강력한 암호를 쓴다┃\n")
    (tmp_path / "guidelines").mkdir()
    (tmp_path / "guidelines" / "규정이름__고시.txt").write_text(text, encoding="utf-8")
    chunks = retrieval.chunk_corpus(tmp_path, ["guidelines"], word_spans)
    by_article = {c.article: c for c in chunks}
    assert list(by_article) == ["제1조", "제2조", "별표", "부칙"]
    assert by_article["제1조"].law == "규정이름" and by_article["제1조"].kind == "행정규칙"
    assert "중요하다." in by_article["제1조"].text  # the PDF line wrap is joined
    assert "┃" not in by_article["별표"].text and "강력한 암호" in by_article["별표"].text
    assert "test note" not in " ".join(c.text for c in chunks)


def test_guideline_without_headings_is_windowed(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "WINDOW_TOKENS", 20)
    (tmp_path / "guidelines").mkdir()
    paragraphs = "\n\n".join(f"문단 {i} 정보보호 관리체계 인증 기준을 설명한다." for i in range(10))
    (tmp_path / "guidelines" / "안내서.md").write_text("# 안내서\n" + paragraphs, encoding="utf-8")
    chunks = retrieval.chunk_corpus(tmp_path, ["guidelines"], word_spans)
    assert len(chunks) > 1 and all(c.article == "" for c in chunks)


# ----------------------------------------------------------------------------- bad input
def test_empty_corpus_folder(tmp_path):
    (tmp_path / "laws").mkdir()
    with pytest.raises(SystemExit, match="laws.*no .md/.txt files"):
        retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "laws").mkdir()
    (tmp_path / "laws" / "깨진법__법률.md").write_bytes("##### 제1조 (목적)\n본문".encode("cp949"))
    with pytest.raises(SystemExit, match="깨진법__법률.md is not UTF-8"):
        retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)


def test_law_without_articles_is_named(tmp_path):
    write_law(tmp_path / "laws", "빈법__법률.md", "---\n제목: 빈법\n---\n# 빈법\n\n본문만 있고 조문이 없다.\n")
    with pytest.raises(SystemExit, match="빈법__법률.md has no articles"):
        retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)


def test_empty_file_is_named(tmp_path):
    write_law(tmp_path / "laws", "공백__법률.md", "\n\n")
    with pytest.raises(SystemExit, match="공백__법률.md is empty"):
        retrieval.chunk_corpus(tmp_path, ["laws"], word_spans)


# ----------------------------------------------------------------------------- BM25 and fusion
TOY = [["전자", "서명", "인증"], ["개인", "정보", "보호", "정보"], ["전자", "금융", "거래", "전자", "보안"],
       ["신용", "정보", "이용"], ["금융", "보안", "사고", "보고"], ["인증", "서", "발급", "전자", "서명", "서명"]]


def okapi_oracle(corpus, query, k1=1.5, b=0.75, epsilon=0.25):
    """BM25Okapi as rank_bm25 defines it (negative idf floored at epsilon x mean idf), one document at a time."""
    n, avgdl = len(corpus), sum(map(len, corpus)) / len(corpus)
    df = {t: sum(t in d for d in corpus) for d in corpus for t in d}
    idf = {t: math.log(n - c + 0.5) - math.log(c + 0.5) for t, c in df.items()}
    floor = epsilon * sum(idf.values()) / len(idf)
    idf = {t: (v if v >= 0 else floor) for t, v in idf.items()}
    scores = []
    for d in corpus:
        s = 0.0
        for t in query:
            f = d.count(t)
            s += idf.get(t, 0.0) * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return np.array(scores)


def lucene_oracle(corpus, query, k1=1.5, b=0.75):
    """bm25s "lucene": idf log(1 + (N - df + 0.5) / (df + 0.5)), and no (k1 + 1) factor (as Lucene >= 8)."""
    n, avgdl = len(corpus), sum(map(len, corpus)) / len(corpus)
    scores = []
    for d in corpus:
        s = 0.0
        for t in set(query):
            c = sum(t in x for x in corpus)
            if c == 0:
                continue
            f = d.count(t)
            s += math.log(1 + (n - c + 0.5) / (c + 0.5)) * f / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return np.array(scores)


@pytest.mark.parametrize("query", [["전자", "서명"], ["정보"], ["금융", "보안", "보고"], ["없는말"]])
def test_bm25_matches_brute_force(query):
    got = retrieval.BM25(TOY, "rank_bm25").scores(query)
    np.testing.assert_allclose(got, okapi_oracle(TOY, query), rtol=1e-5, atol=1e-6)
    want = [i for i in np.argsort(-okapi_oracle(TOY, query), kind="stable") if okapi_oracle(TOY, query)[i] > 0]
    assert retrieval.top_k(got, 3) == [int(i) for i in want[:3]]


def test_bm25s_matches_lucene_formula():
    pytest.importorskip("bm25s")
    for query in (["전자", "서명"], ["정보", "이용"], ["없는말"]):
        got = retrieval.BM25(TOY, "bm25s").scores(query)
        np.testing.assert_allclose(got, lucene_oracle(TOY, query), rtol=1e-4, atol=1e-6)


def test_top_k_orders_and_drops_zero():
    scores = np.array([0.0, 2.0, 5.0, 2.0, -1.0])
    assert retrieval.top_k(scores, 10) == [2, 1, 3]
    assert retrieval.top_k(np.zeros(3), 2) == []


def test_rrf_and_weighted_match_hand_computation():
    a, b = [3, 1, 2], [1, 4]
    fused = retrieval.rrf([a, b], k=60)
    assert fused[1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[3] == pytest.approx(1 / 61) and fused[4] == pytest.approx(1 / 62)
    assert [d for d, _ in retrieval.ranked(fused, 2)] == [1, 3]
    w = retrieval.weighted([{1: 10.0, 2: 5.0, 3: 0.0}, {1: 0.2, 4: 0.6}], [0.3, 0.7])
    assert w == pytest.approx({1: 0.3 * 1.0 + 0.7 * 0.0, 2: 0.3 * 0.5, 3: 0.0, 4: 0.7 * 1.0})


@pytest.fixture(scope="module")
def kiwi():
    return retrieval.make_kiwi()


def test_morphemes_keep_content_words(kiwi):
    tokens = retrieval.morphemes(kiwi, ["전자서명인증사업자는 제2조에 따라 IPv6 주소를 관리하여야 한다."])[0]
    assert {"전자", "서명", "사업자", "관리", "ipv"} <= set(tokens)
    assert "는" not in tokens and "하" not in tokens


def toy_chunks(texts):
    return [retrieval.Chunk(id=i, source=f"laws/t{i}.md", law="테스트법", kind="법률", article=f"제{i + 1}조", title="",
                     part=1, parts=1, text=t) for i, t in enumerate(texts)]


TEXTS = ["전자서명은 서명자의 신원을 나타내는 정보이다.", "개인정보처리자는 개인정보를 보호하여야 한다.",
         "전자금융거래의 안전성을 확보하여야 한다.", "신용정보회사는 신용정보를 관리한다.",
         "금융회사는 보안 사고를 금융위원회에 보고한다."]


@pytest.mark.parametrize("backend, oracle", [("rank_bm25", okapi_oracle), ("bm25s", lucene_oracle)])
def test_bm25_search_against_scan(kiwi, backend, oracle):
    pytest.importorskip(backend)
    tokens = retrieval.morphemes(kiwi, TEXTS)
    index = retrieval.Index(toy_chunks(TEXTS), tokens, kiwi=kiwi, backend=backend)
    hits = index.search("개인정보를 보호하는 자", k=3, method="bm25")
    assert hits[0][0].article == "제2조"
    scan = oracle(tokens, retrieval.morphemes(kiwi, ["개인정보를 보호하는 자"])[0])
    assert [h[1] for h in hits] == pytest.approx(sorted((s for s in scan if s > 0), reverse=True)[:3], rel=1e-5)
    assert index.search("?!", k=3, method="bm25") == []  # nothing retrieved: an empty list, not an error


# ----------------------------------------------------------------------------- dense
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import lm

    model_dir = str(tiny_model_dir)
    return lm.load_model(model_dir, "cpu", lm.pick_dtype("cpu", "float32")), lm.load_tokenizer(model_dir)


def test_embed_is_batch_invariant(tiny):
    model, tokenizer = tiny
    together = retrieval.embed(model, tokenizer, TEXTS, batch_size=4)
    alone = [retrieval.embed(model, tokenizer, [t], batch_size=1) for t in TEXTS]
    for variant in retrieval.DENSE_VARIANTS:
        assert together[variant].shape == (len(TEXTS), model.config.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(together[variant], axis=1), 1.0, rtol=1e-5)
        for i, one in enumerate(alone):
            np.testing.assert_allclose(together[variant][i], one[variant][0], atol=2e-5)
    assert tokenizer.padding_side == "left"  # the caller's tokenizer is left as it was


def test_dense_and_fused_search(tiny, kiwi):
    model, tokenizer = tiny
    vectors = retrieval.embed(model, tokenizer, TEXTS)[retrieval.DENSE_VARIANT]
    index = retrieval.Index(toy_chunks(TEXTS), retrieval.morphemes(kiwi, TEXTS), vectors, kiwi=kiwi)
    with pytest.raises(SystemExit, match="attach_encoder"):
        index.search(TEXTS[0], method="dense")
    index.attach_encoder(model, tokenizer)
    for i, text in enumerate(TEXTS):  # a chunk's own text finds it first, with cosine 1
        (chunk, score), *_ = index.search(text, k=3, method="dense")
        assert chunk.id == i and score == pytest.approx(1.0, abs=1e-4)
    query = "신용정보를 관리하는 회사"
    qv = index.query_vectors([query])[0]
    brute = [int(i) for i in np.argsort(-(vectors @ qv), kind="stable")[:3]]
    assert [c.id for c, _ in index.search(query, k=3, method="dense")] == brute
    fused = index.search_many([query, "?!"], k=3, method="fused")
    assert fused[0][0][0].article == "제4조"
    assert len(fused[1]) == 3  # no BM25 hit: dense still retrieves, the question is answered with context
    assert retrieval.format_context([], tokenizer) == ""
    context = retrieval.format_context(fused[0], tokenizer, max_passages=2, max_tokens=40)
    assert context.startswith("[1] ") and len(tokenizer(context)["input_ids"]) <= 40 + 2


def test_write_and_load_index(tiny, kiwi, tmp_path):
    model, tokenizer = tiny
    chunks = toy_chunks(TEXTS)
    vectors = retrieval.embed(model, tokenizer, TEXTS)[retrieval.DENSE_VARIANT]
    retrieval.write_index(tmp_path, chunks, retrieval.morphemes(kiwi, TEXTS), vectors)
    with pytest.raises(SystemExit, match="make index"):
        retrieval.load_index(tmp_path)
    common.write_json(tmp_path / "meta.json", dict(settings=dict(BM25_BACKEND="rank_bm25"),
                                                   dense_variant=retrieval.DENSE_VARIANT))
    (tmp_path / "DONE").touch()
    index = retrieval.load_index(tmp_path).attach_encoder(model, tokenizer)
    assert index.chunks == chunks
    assert index.search(TEXTS[3], k=1, method="fused")[0][0].id == 3
    retrieval.write_index(tmp_path, chunks, retrieval.morphemes(kiwi, TEXTS), None)  # BM25 only (02, bm25 search)
    assert not (tmp_path / "dense.faiss").exists()
    bm25_only = retrieval.load_index(tmp_path)
    assert bm25_only.search(TEXTS[3], k=1, method="bm25")[0][0].id == 3 and bm25_only.dense_ranking([0.0], 5) == []


def test_embedding_cache_reuses_vectors(tiny, tmp_path):
    model, tokenizer = tiny
    cache = tmp_path / "emb_cache.npz"
    first = retrieval.embed_chunks(model, tokenizer, TEXTS[:3], cache, "fp")
    assert len(retrieval.load_cache(cache, "fp")) == 3 and retrieval.load_cache(cache, "other") == {}
    second = retrieval.embed_chunks(model, tokenizer, TEXTS, cache, "fp")
    np.testing.assert_allclose(second[retrieval.DENSE_VARIANT][:3], first[retrieval.DENSE_VARIANT], atol=1e-6)
    loaded = retrieval.load_cache(cache, "fp")
    assert len(loaded) == len(TEXTS)
    # A cached row must own its memory: a view of the whole array per row made 1874 chunks take 24 GB (OOM).
    assert all(vec.base is None for row in loaded.values() for vec in row.values())


# ----------------------------------------------------------------------------- reference parsing
DOCS = {("개인정보보호법", "법률"): {"제15조": "개인정보의 수집ㆍ이용", "제42조": "위원의 제척ㆍ기피ㆍ회피"},
        ("개인정보보호법", "시행령"): {"제40조": "개인정보 유출 등의 신고"},
        ("정보통신망이용촉진및정보보호등에관한법률", "법률"): {"제45조": "집적정보통신시설 사업자의 보호조치",
                                               "제53조": "통신과금서비스제공자의 등록 등"},
        ("전자서명법", "법률"): {"제9조": "인정기관", "제14조": "신원확인"},
        ("신용정보의이용및보호에관한법률", "법률"): {"제43조": "손해배상의 책임"},
        ("전자금융감독규정", "행정규칙"): {"제40조": "외부주문등에 대한 감독 및 검사"}}


@pytest.mark.parametrize("reference, sub_domain, golds, how", [
    ("개인정보 보호법 제15조제1항", "개인정보보호", [("개인정보보호법", "법률", "제15조")], "explicit"),
    ("「정보통신망 이용촉진 및 정보보호 등에 관한 법률」 제45조", "정보통신",
     [("정보통신망이용촉진및정보보호등에관한법률", "법률", "제45조")], "explicit"),
    ("정보통신망법 제45조 제1항\n\n---", "정보통신", [("정보통신망이용촉진및정보보호등에관한법률", "법률", "제45조")], "explicit"),
    ('"개인정보 보호법 시행령" 제40조', "개인정보보호", [("개인정보보호법", "시행령", "제40조")], "explicit"),
    ("전자서명법 제14조 및 제9조 제1항 제2호", "전자서명", [("전자서명법", "법률", "제14조"), ("전자서명법", "법률", "제9조")],
     "explicit"),
    ("제40조(개인정보 유출 등의 신고) 1 개인정보처리자는 법 제34조제1항", "개인정보보호", [("개인정보보호법", "시행령", "제40조")],
     "title"),
    ("제42조(위원의 제척ㆍ기피ㆍ회피)", "개인정보보호", [("개인정보보호법", "법률", "제42조")], "title"),
    ("「통신과금서비스제공자의 등록 등」 제53조", "정보통신", [("정보통신망이용촉진및정보보호등에관한법률", "법률", "제53조")], "title"),
    ("제40조(외부주문등에 대한 감독 및 검사) 1 금융회사", "전자금융", [("전자금융감독규정", "행정규칙", "제40조")], "title"),
    ('"고의 또는 과실이 없음을 증명한 경우에는 그러하지 아니하다." (제43조)', "신용정보",
     [("신용정보의이용및보호에관한법률", "법률", "제43조")], "sub-domain"),
])
def test_parse_reference(reference, sub_domain, golds, how):
    parsed = ev.parse_reference(reference, sub_domain, DOCS)
    assert parsed["golds"] == golds and parsed["how"] == how


@pytest.mark.parametrize("reference, why", [
    ("정보보안기사 필기 출제기준, 네트워크 보안", "no article"),
    ('"금융위원회는 전자금융업자가 제21조제1항을 위반하여 누설한 경우"', "inside a sentence"),
    ("신용정보업감독규정 제34조(무료 열람권)", "not in the corpus"),
    ("개인정보 보호법 제99조", "article not in"),
    ("", "no article"),
])
def test_parse_reference_rejects(reference, why):
    parsed = ev.parse_reference(reference, "개인정보보호", DOCS)
    assert parsed["golds"] == [] and why in parsed["why"]


def test_first_rank_and_summary():
    assert ev.first_rank(["a", "b", "c"], [("c"), ("b")]) == 2
    assert ev.first_rank(["a"], ["z"]) is None
    m = ev.summarise([1, 3, None, 30])
    assert m["recall@1"] == 0.25 and m["recall@5"] == 0.5 and m["recall@20"] == 0.5
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 30) / 4)
