"""00_generate_pairs.py: question checking, layout, no test data, the retriever's chunks, the writer's token cap,
per-device settings and resume on a tiny model; sweep_distill.py's grid, folders and reports."""
import importlib
import inspect
import json
import math
import random
import re

import pytest

import common
import competition
import lm
import scoring

g = importlib.import_module("00_generate_pairs")
g.sweep_kind = importlib.import_module("sweep_distill").template_kind  # the report's reading of a stem's kind

GOOD_MC = """문제: 전자금융거래법상 전자금융거래의 정의로 옳은 것은?
1 금융회사가 전자적 장치로 금융상품을 제공하는 거래
2 현금을 직접 주고받는 거래
3 종이 어음으로 하는 거래
4 대면 창구에서만 하는 거래
정답: 1"""


def test_parse_mc_accepts_the_requested_layout():
    (stem, options, key), reason = g.parse_mc(GOOD_MC, 4)
    assert reason is None and key == 1 and len(options) == 4 and stem.startswith("전자금융거래법상")


@pytest.mark.parametrize("text,n,reason", [
    (GOOD_MC, 5, "4 options instead of 5"),
    (GOOD_MC.replace("정답: 1", ""), 4, "no answer key"),
    (GOOD_MC.replace("정답: 1", "정답: 7"), 4, "no answer key"),
    (GOOD_MC.replace("3 종이 어음으로 하는 거래", "3 현금을 직접 주고받는 거래"), 4, "repeated options"),
    (GOOD_MC.replace("문제: 전자금융거래법상 전자금융거래의 정의로 옳은 것은?", "문제: <질문>"), 4, "stem"),
    (GOOD_MC.replace("4 대면 창구에서만 하는 거래", "4 <보기>"), 4, "placeholder"),
])
def test_parse_mc_drops_malformed_questions(text, n, reason):
    parsed, why = g.parse_mc(text, n)
    assert parsed is None and reason in why


def test_parse_desc():
    assert g.parse_desc("문제: 전자서명법상 전자서명인증사업자의 의무를 설명하시오.")[0].startswith("전자서명법상")
    assert g.parse_desc("")[0] is None
    assert g.parse_desc("문제: <질문>")[0] is None


def test_shuffled_question_is_in_the_competition_layout_and_keeps_the_key():
    (stem, options, key), _ = g.parse_mc(GOOD_MC, 4)
    rng = random.Random(0)
    shuffled, new_key = g.shuffle_options(options, key, rng)
    assert shuffled[new_key - 1] == options[key - 1] and sorted(shuffled) == sorted(options)
    q = competition.parse_question("x", g.mc_question_text(stem, shuffled))
    assert q.kind == "mc" and q.options == shuffled and q.stem == stem


def test_prompt_matches_04_and_context_is_shared(monkeypatch):
    monkeypatch.setattr(g, "CONTEXT_RATE", 0.5)  # the default follows 04's RAG_PASSAGES (0 = never)
    (stem, options, _), _ = g.parse_mc(GOOD_MC, 4)
    text = g.mc_question_text(stem, options)
    plain = g.build_prompt("a", "mc", text, "제1조 목적", random.Random(1))  # rng().random() = 0.13 < 0.5
    assert plain["prefix"] == common.MC_ANSWER_PREFIX and plain["context"] is True
    assert common.CONTEXT_HEADER in plain["prompt"][-1]["content"]
    assert "제1조 목적" in plain["prompt"][-1]["content"]
    g_rng = random.Random(3)  # first draw 0.237 ...; find a draw above CONTEXT_RATE
    while True:
        state = g_rng.getstate()
        if g_rng.random() >= g.CONTEXT_RATE:
            g_rng.setstate(state)
            break
    bare = g.build_prompt("a", "mc", text, "제1조 목적", g_rng)
    assert bare["prompt"] == common.mc_messages(stem, options)  # exactly what 04_infer.py asks


def test_never_reads_the_development_or_competition_questions():
    source = inspect.getsource(g)
    for name in ("SHARED", "QUESTIONS", "LABELS", "USER_TEST", "PREPARED", "fsku_dev", "test.csv", "eval/"):
        assert name not in source


def test_chunks_come_from_the_retrievers_chunker(tiny_model_dir, tmp_path):
    tok = lm.load_tokenizer(tiny_model_dir)
    (tmp_path / "laws").mkdir()
    text = "# 전자금융거래법\n## 제1장 총칙\n##### 제1조 (목적)\n\n이 법은 전자금융거래의 안전성을 확보함을 목적으로 한다.\n"
    (tmp_path / "laws" / "전자금융거래법__법률.md").write_text(text + "##### 제2조 (정의)\n\n1\\. 정의\n", encoding="utf-8")
    chunks = g.load_chunks(tok, tmp_path, ["laws"])
    assert [c["article"] for c in chunks] == ["제1조", "제2조"] and chunks[0]["title"] == "목적"
    assert chunks[0]["id"] == g.chunk_id(chunks[0]["text"]) and chunks[0]["source"] == "laws/전자금융거래법__법률.md"
    (tmp_path / "empty" / "laws").mkdir(parents=True)
    with pytest.raises(SystemExit, match="make data"):
        g.load_chunks(tok, tmp_path / "empty", ["laws"])


def test_settings_are_plain_json():
    settings = json.loads(json.dumps(g.settings(), ensure_ascii=False))
    assert settings["TEMPLATE_KINDS"] and "BUILDERS" not in settings and "TEMPLATE_STEMS" in settings


def test_chunk_ids_are_content_hashes():
    assert g.chunk_id("가") == g.chunk_id("가") != g.chunk_id("나")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch

    tok = lm.load_tokenizer(tiny_model_dir)
    return tok, lm.load_model(str(tiny_model_dir), "cpu", torch.float32)


def fake_writer(teacher, tokenizer, jobs, seed, caps=None):
    """A question writer that always produces a well-formed, distinct question (the tiny model writes noise)."""
    out = {}
    for j in jobs:
        n = j["chunk"]["n"]
        if j["kind"] == "mc":
            out[j["id"]] = "\n".join([f"문제: 금융보안 문제 번호 {n} 정답은 무엇인가요?"] +
                                     [f"{i} 보기 {n} {'가나다라마'[i - 1]}" for i in range(1, j["n_options"] + 1)]
                                     + ["정답: 2"])
        else:
            out[j["id"]] = f"문제: 개인정보 보호법 목적 {n} 을 설명하세요."
    return out


def test_resume_appends_only_new_chunks(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "write_questions", fake_writer)
    monkeypatch.setattr(g, "KEEP_TEACHER_WRONG", True)  # the tiny teacher's option is noise
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    chunks = [dict(id=g.chunk_id(f"조문 {i} 내용입니다"), source="laws/x.md", text=f"조문 {i} 내용입니다", n=i)
              for i in range(6)]
    g.run(chunks, model, model, tok, tmp_path, n_chunks=2, batch=2)
    first = lm.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(first) == 4 and {p["kind"] for p in first} == {"mc", "desc"}
    with open(tmp_path / "pairs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # a kill in the middle of a line
    stats = g.run(chunks, model, model, tok, tmp_path, n_chunks=4, batch=2)
    assert stats["chunks_done_before"] == 2 and stats["chunks_now"] == 2
    pairs = lm.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == 8 and len({p["id"] for p in pairs}) == 8
    for p in pairs:
        assert p["chosen"].strip() and p["rejected"].strip() and p["settings"]["temperature"] == g.ANSWER_TEMPERATURE
        if p["kind"] == "mc":
            assert p["chosen"] in {"1", "2", "3", "4", "5"} and p["prefix"] == common.MC_ANSWER_PREFIX
    assert g.run(chunks, model, model, tok, tmp_path, n_chunks=4)["chunks_now"] == 0
    meta = g.summary(tmp_path, stats, 1.0)
    assert meta["pairs"] == 8 and meta["attempts"] == 8 and meta["timed_batches"]["batches"] == 2
    assert "peak_gpu_gib" in meta and meta["peak_rss_gib"] > 0  # GPU peak beside host RSS (None on the CPU)


def test_duplicates_are_dropped(tiny, tmp_path, monkeypatch):
    tok, model = tiny

    def same_writer(teacher, tokenizer, jobs, seed, caps=None):
        return {j["id"]: fake_writer(teacher, tokenizer, [dict(j, chunk=dict(j["chunk"], n=0))], seed)[j["id"]]
                for j in jobs}

    monkeypatch.setattr(g, "write_questions", same_writer)
    monkeypatch.setattr(g, "KEEP_TEACHER_WRONG", True)
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    chunks = [dict(id=g.chunk_id(f"조문 {i}"), source="laws/x.md", text=f"조문 {i} 내용", n=i) for i in range(3)]
    g.run(chunks, model, model, tok, tmp_path, n_chunks=3)
    attempts = lm.read_jsonl(tmp_path / "attempts.jsonl")
    assert len(lm.read_jsonl(tmp_path / "pairs.jsonl")) == 2
    assert sum(a["reason"] == "duplicate" for a in attempts) == 4


def test_sweep_grid_and_gap_closed():
    sweep = importlib.import_module("sweep_distill")
    points = sweep.grid_points(dict(loss_type=["distillm_v2"], alpha=[0.1, 0.3], beta=[1.0], temperature=[1.0, 2.0]),
                               [dict(loss_type="kd", alpha=0.1, beta=1.0, temperature=1.0)])
    assert len(points) == 5 and len({p["name"] for p in points}) == 5
    assert points[-1]["name"] == "kd-a0.1-b1.0-t1.0"
    by_epochs = sweep.grid_points(dict(loss_type=["kd"], alpha=[0.1], beta=[1.0], temperature=[1.0], epochs=[1.0, 2.0]),
                                  [])
    assert [p["name"] for p in by_epochs] == ["kd-a0.1-b1.0-t1.0-e1.0", "kd-a0.1-b1.0-t1.0-e2.0"]
    assert sweep.gap_closed(0.25, 0.45, 0.35) == pytest.approx(0.5)
    assert sweep.gap_closed(0.3, 0.3, 0.4) is None


LAW = "laws/가상법__법률.md"
ARTICLE_TEXT = {  # article -> body lines (numbering, bold markers and amendment notes as in the corpus)
    "제1조": ["이 법은 전자금융거래의 안전성과 신뢰성을 확보함을 목적으로 한다. <개정 2020.1.1>"],
    "제2조": ["**①** 금융회사는 전자금융거래의 안전성을 확보하기 위하여 보안대책을 마련하여야 한다.",
             "**②** 금융회사는 이용자의 접근매체를 분실한 경우 즉시 지급을 정지하여야 한다.",
             "다만, 대통령령으로 정하는 경우에는 그러하지 아니하다.",
             "  1\\. 전자금융업자는 매년 정보보호 교육계획을 수립하고 시행하여야 한다.",
             "짧은 문장이다."],
    "제3조": ["금융위원회는 전자금융업자의 업무에 관하여 필요한 자료의 제출을 요구할 수 있다.",
             "전자금융업자는 이용자의 거래기록을 오 년간 보존하여야 한다."],
    "제4조": ["이용자는 접근매체를 제3자에게 대여하거나 양도하여서는 아니 된다.",
             "금융회사는 전자적 침해행위에 대비하여 비상계획을 수립하여야 한다."],
}


def law_chunks():
    return [dict(id=g.chunk_id(f"{a}{body}"), source=LAW, law="가상법", kind="법률", article=a, title=f"제목{a}",
                 text="\n".join([f"가상법 [법률] {a} (제목{a})"] + body)) for a, body in ARTICLE_TEXT.items()]


def test_sentences_are_clean_and_standalone():
    got = g.sentences(law_chunks()[1])
    assert got == ["금융회사는 전자금융거래의 안전성을 확보하기 위하여 보안대책을 마련하여야 한다.",
                   "금융회사는 이용자의 접근매체를 분실한 경우 즉시 지급을 정지하여야 한다.",
                   "전자금융업자는 매년 정보보호 교육계획을 수립하고 시행하여야 한다."]  # no 다만, no short one
    assert g.sentences(law_chunks()[0]) == ["이 법은 전자금융거래의 안전성과 신뢰성을 확보함을 목적으로 한다."]


def law_sentences(chunks):
    return {x for c in chunks for x in g.sentences(c)}


@pytest.mark.parametrize("n", [4, 5])
def test_template_questions_parse_and_their_key_is_right(n):
    chunks = law_chunks()
    pool = g.template_pool(chunks)
    own, every = g.sentences(chunks[1]), law_sentences(chunks)
    seen_kinds = set()
    for seed in range(40):
        job = dict(id="x-mc", chunk=chunks[1], kind="mc", n_options=n)
        raw = g.template_questions([job], pool, seed)["x-mc"]
        (stem, options, key), reason = g.parse_mc(raw, n)
        assert reason is None and len(set(options)) == n and g.sweep_kind(stem) == job["template"]
        inside = [o in own for o in options]
        if job["template"] == "not_in":
            assert stem.startswith("다음 중 「가상법」 제2조(제목제2조)") and stem.endswith("해당하지 않는 것은?")
            assert not inside[key - 1] and sum(inside) == n - 1
        elif job["template"] == "in":
            assert stem.endswith("옳은 것은?") and inside[key - 1] and sum(inside) == 1
        else:  # false: one own sentence falsified, every other option a true sentence of the law
            assert job["template"] == "false" and stem.endswith("옳지 않은 것은?")
            assert options[key - 1] not in every and all(o in every for i, o in enumerate(options) if i != key - 1)
            assert any(options[key - 1] == g.falsified(x, random.Random(s)) for x in own for s in range(20))
            assert stem.startswith("다음 중 「가상법」에 관한")  # 3 own sentences < n: topped up from the law
        assert job["evidence"] and all(e in chunks[1]["text"] or e in every for e in job["evidence"])
        seen_kinds.add(job["template"])
    assert seen_kinds == ({"in", "not_in", "false"} if n == 4 else {"in", "false"})  # "not in" needs n - 1 own


def test_falsified_changes_one_fact():
    rng = random.Random(0)
    assert g.falsified("금융회사는 보안대책을 마련하여야 한다.", rng) == "금융회사는 보안대책을 마련하지 아니할 수 있다."
    assert g.falsified("금융위원회는 자료의 제출을 요구할 수 있다.", rng) == "금융위원회는 자료의 제출을 요구할 수 없다."
    assert g.falsified("이용자는 접근매체를 양도하여서는 아니 된다.", rng) == "이용자는 접근매체를 양도할 수 있다."
    assert g.falsified("금융회사는 사고를 안 날부터 30일 이내에 신고한다.", rng) == \
        "금융회사는 사고를 안 날부터 60일 이내에 신고한다."
    assert g.falsified("과태료는 100만원 이하로 한다.", rng) == "과태료는 100만원 이상로 한다."
    assert g.falsified("제3조에 따른 신고는 서면으로 한다.", rng) is None  # an article number is no fact to change


def item_chunk(article, lines):
    return dict(id=g.chunk_id(article + "".join(lines)), source=LAW, law="가상법", kind="법률", article=article,
                title=f"제목{article}", text="\n".join([f"가상법 [법률] {article} (제목{article})"] + lines))


def test_items_of_a_list_on_lines_and_run_together():
    lines = ["금융회사는 다음 각 호의 사항을 포함하여야 한다.", "  1\\. 접근매체의 발급과 관리", "  2\\. 이용자 보호 절차",
             "    가\\. 세부 목", "  3\\. 그 밖에 금융위원회가 정하는 사항", "  4\\. 전자적 침해행위 대응 계획"]
    assert g.items(item_chunk("제5조", lines)) == ["접근매체의 발급과 관리", "이용자 보호 절차", "전자적 침해행위 대응 계획"]
    inline = ["다음 각 호의 서류를 제출하여야 한다.1. 별지 제1호서식의 지정 신청서2. 직원 보유현황 증명서류3. 업무수행 계획서"]
    assert g.items(item_chunk("제6조", inline)) == ["별지 제1호서식의 지정 신청서", "직원 보유현황 증명서류", "업무수행 계획서"]
    assert g.items(item_chunk("제7조", ["ISMS 1.1.1 경영진의 참여 2.5 기준"])) == []  # codes and decimals are no items


def test_definitions_are_self_contained():
    lines = ['  1\\. "전자금융거래"라 함은 금융회사가 전자적 장치를 통하여 금융상품을 제공하는 거래를 말한다.',
             '  2\\. "접근매체"란 전자금융거래에서 거래지시를 하기 위한 수단을 말한다.',
             '  3\\. "이용자"라 함은 이용자번호를 부여받은 이용자를 말한다.',  # the term in its own definition
             '  4\\. "대통령령으로 정하는 기관"이란 한국은행을 말한다.',  # a reference, no term
             '  5\\. "정보보호" 또는 "정보보안"이라 함은 정보의 유출을 방지하는 일체의 행위를 말한다.']
    assert g.definitions(item_chunk("제2조", lines)) == [
        ("전자금융거래", "금융회사가 전자적 장치를 통하여 금융상품을 제공하는 거래"),
        ("접근매체", "전자금융거래에서 거래지시를 하기 위한 수단"), ("정보보안", "정보의 유출을 방지하는 일체의 행위")]


def definition_chunks():
    terms = [("전자금융거래", "금융회사가 전자적 장치를 통하여 금융상품을 제공하는 거래"),
             ("접근매체", "전자금융거래에서 거래지시를 하기 위한 수단"), ("전자서명", "서명자의 신원을 나타내는 전자적 정보"),
             ("오류", "이용자의 과실 없이 거래가 이행되지 아니한 경우"), ("가맹점", "재화를 제공하는 자로서 계약을 맺은 자"),
             ("전자화폐", "금전적 가치가 전자적 방법으로 저장된 증표")]
    return [item_chunk("제2조", [f'  {i}\\. "{t}"란 {b}을 말한다.' for i, (t, b) in enumerate(terms[:3], 1)]),
            item_chunk("제2조의2", [f'  {i}\\. "{t}"란 {b}을 말한다.' for i, (t, b) in enumerate(terms[3:], 1)])]


@pytest.mark.parametrize("kind", ["definition", "term"])
def test_definition_and_term_questions(kind):
    chunks = definition_chunks()
    pool = g.template_pool(chunks)
    own = dict(g.definitions(chunks[0]))
    for seed in range(5):
        subject, right, wrong, evidence = g.BUILDERS[kind](chunks[0], pool, 4, random.Random(seed))
        stem = g.template_stem(kind, subject)
        assert g.sweep_kind(stem) == kind and len({right, *wrong}) == 4
        if kind == "definition":
            assert own[subject[1]] == right and stem == f"다음 중 「가상법」상 '{subject[1]}'의 정의로 가장 적절한 것은?"
        else:
            assert own[right] == subject[1] and right not in stem and subject[1] in stem
        assert evidence == [own[subject[1]] if kind == "definition" else subject[1]]


ISMS_TABLE = """## [별표 0007] 인증기준(제23조 관련)
[별표 7] <전문개정>
가. 관리체계 수립 및 운영
┏━━━┯━━━┓
┃분야                │항목                        │상세 내용                                               ┃
┠───┬──────┼───┬──────────┼────────────────────────────┨
┃1.1.  │ 관리체계   │1.1.1 │경영진의 참여       │최고경영자는 관리체계의 수립과 운영활동 전반에 경영진의 참여가 이루어질  ┃
┃      │기반 마련   │      │                    │수 있도록 보고 체계를 수립하여야 한다.               ┃
┃      │            ├───┼──────────┼────────────────────────────┨
┃　    │　          │1.1.2 │최고책임자의 지정   │최고경영자는 정보보호 최고책임자를 임원급으로 지정하여야 한다.  ┃
┃      │            ├───┼──────────┼────────────────────────────┨
┃　    │　          │1.1.3 │조직 구성           │최고경영자는 실무조직과 위원회를 구성하여 운영하여야 한다.  ┃
┠───┼──────┼───┼──────────┼────────────────────────────┨
┃1.2.  │위험 관리   │1.2.1 │정보자산 식별       │정보자산 분류기준을 수립하여 모든 정보자산을 식별ㆍ분류하여야   ┃
┃      │            │      │                    │한다.                                                   ┃
┃      │            ├───┼──────────┼────────────────────────────┨
┃　    │　          │1.2.2 │현황 및 흐름분석    │개인정보 처리 현황을 분석하고 업무 흐름을 문서화하여야 한다.  ┃
┃      │            ├───┼──────────┼────────────────────────────┨
┃　    │　          │1.2.3 │위험 평가           │연 1회 이상 위험을 평가하고 경영진의 승인을 받아야 한다.   ┃
┗━━━┷━━━┛
## [별표 0008] 인증의 표시
┃1.1.  │ 다른 표   │9.9.9 │다른 항목           │다른 표의 내용이다.                                     ┃
"""


def isms_chunks(tmp_path):
    """The ISMS-P notice's table as a corpus file and as the chunker shows it (box characters as spaces)."""
    source = f"guidelines/{g.ISMS_SOURCE}등에관한고시__test.md"
    (tmp_path / "guidelines").mkdir(exist_ok=True)
    (tmp_path / source).write_text(ISMS_TABLE, encoding="utf-8")
    flat = re.sub(r"[┃│┏┓┗┛┯┷┠┨┬┼├─━]", " ", ISMS_TABLE)
    header = "정보보호 및 개인정보보호 관리체계 인증 등에 관한 고시 [행정규칙] 별표 ([별표 0007] 인증기준(제23조 관련))"
    return [dict(id=g.chunk_id(part), source=source, law="정보보호 및 개인정보보호 관리체계 인증 등에 관한 고시",
                 kind="행정규칙", article="별표", title="[별표 0007] 인증기준(제23조 관련)", text=header + "\n" + part)
            for part in flat.split("1.2.  ")]


def test_isms_criteria_are_read_from_the_box_table(tmp_path):
    rows = g.isms_criteria(ISMS_TABLE)
    assert [r["code"] for r in rows] == ["1.1.1", "1.1.2", "1.1.3", "1.2.1", "1.2.2", "1.2.3"]
    pool = g.isms_pool(isms_chunks(tmp_path), tmp_path)
    first = pool[0]
    assert first["name"] == "경영진의 참여" and first["field"] == "관리체계 기반 마련" and first["area"] == "관리체계 수립 및 운영"
    assert first["desc"] == "최고경영자는 관리체계의 수립과 운영활동 전반에 경영진의 참여가 이루어질 수 있도록 보고 체계를 수립하여야 한다."
    assert pool[3]["desc"].endswith("식별ㆍ분류하여야 한다.")  # a wrapped cell joined where a word was split
    chunks = isms_chunks(tmp_path)
    assert [len(r["chunk_ids"]) for r in pool] == [1] * 6 and pool[0]["chunk_ids"] == [chunks[0]["id"]]
    assert g.join_wrapped(["보고 체계를", "수립한다."], set()) == "보고 체계를 수립한다."
    assert g.join_wrapped(["정보보호 최고책", "임자를 지정한다."], {"최고책임자"}) == "정보보호 최고책임자를 지정한다."


@pytest.mark.parametrize("kind", ["isms_desc", "isms_item", "isms_not"])
def test_isms_questions(tmp_path, kind):
    chunks = isms_chunks(tmp_path)
    pool = g.template_pool(chunks, tmp_path)
    by_name = {r["name"]: r for r in pool["isms"]}
    for seed in range(5):
        subject, right, wrong, evidence = g.BUILDERS[kind](chunks[0], pool, 4, random.Random(seed))
        stem = g.template_stem(kind, subject)
        assert g.sweep_kind(stem) == kind and len({right, *wrong}) == 4 and "ISMS-P 인증기준" in stem
        if kind == "isms_desc":
            assert by_name[subject]["desc"] == right and by_name[subject]["chunk_ids"] == [chunks[0]["id"]]
        elif kind == "isms_item":
            assert by_name[right]["desc"] == subject
        else:  # three items of the field, the key from another field of the area
            assert {by_name[w]["field"] for w in wrong} == {subject} and by_name[right]["field"] != subject
        assert all(e.split(":")[0].split(" ", 1)[1] in by_name for e in evidence)


def test_evidence_context_holds_the_evidence_within_the_budget(tiny):
    tok, _ = tiny
    chunk = law_chunks()[1]
    key = g.sentences(chunk)[1]
    text = g.evidence_context(tok, chunk, [key], 10_000)
    assert text.split("\n")[0] == chunk["text"].split("\n")[0] and key in text and "<개정" not in text
    short = g.evidence_context(tok, chunk, [key], len(tok(chunk["text"].split("\n")[0] + key).input_ids) + 8)
    assert key in short and g.sentences(chunk)[0] not in short  # the evidence first, other lines while they fit
    assert g.evidence_context(tok, chunk, ["1.1.1 경영진의 참여: 보고 체계"], 10_000).endswith("보고 체계")


def test_template_title_question_and_descriptive_and_too_small_pool(monkeypatch):
    chunks = law_chunks()
    pool = g.template_pool(chunks)
    title_only = dict(chunks[0], text="가상법 [법률] 제1조 (제목제1조)\n삭제 <2020.1.1>")
    job = dict(id="t", chunk=title_only, kind="mc", n_options=4)
    assert g.template_questions([job], pool, 0)["t"] == ""  # no content kind, no title fallback
    monkeypatch.setattr(g, "TITLE_FALLBACK", True)
    raw = g.template_questions([job], pool, 0)["t"]
    (stem, options, key), _ = g.parse_mc(raw, 4)
    assert "제목으로 옳은 것은" in stem and options[key - 1] == "제목제1조" and len(set(options)) == 4
    assert stem == "다음 중 「가상법」 제1조의 제목으로 옳은 것은?"  # no title in the stem: it is the answer
    desc = g.template_questions([dict(id="d", chunk=chunks[2], kind="desc", n_options=0)], pool, 0)["d"]
    assert g.parse_desc(desc) == ("「가상법」 제3조(제목제3조)에서 규정하는 내용을 설명하세요.", None)
    lonely = g.template_pool(chunks[:1])
    job = dict(id="e", chunk=chunks[0], kind="mc", n_options=5)
    assert g.template_questions([job], lonely, 0)["e"] == ""
    assert g.checked_question(job, "", random.Random(0))[2].startswith("nothing written")


def long_sentence(subject, chars=g.SENTENCE_CHARS[1]):
    """A sentence of exactly `chars` characters that the template writer uses as an option."""
    end = " 하여야 한다."
    body = f"{subject}는 " + "전자금융거래의 안전성과 신뢰성을 확보하기 위한 보안대책을 수립하고 " * 8
    return body[:chars - len(end)] + end


def longest_template_chunks():
    """Two articles of one law, each with five sentences of the longest option length: every 5-option template
    question built from them has options of SENTENCE_CHARS[1] characters."""
    subjects = ["금융회사", "전자금융업자", "신용정보회사", "개인정보처리자", "정보통신서비스 제공자"]
    return [dict(id=g.chunk_id(a), source=LAW, law="가상법", kind="법률", article=a, title=f"제목{a}",
                 text="\n".join([f"가상법 [법률] {a} (제목{a})"] + [long_sentence(f"{a} {x}") for x in subjects]))
            for a in ("제10조", "제11조")]


def test_mc_write_cap_fits_the_longest_template_question(tiny):
    tok, _ = tiny
    chunks = law_chunks() + longest_template_chunks()
    assert all(len(x) == g.SENTENCE_CHARS[1] for x in g.sentences(chunks[-1]))
    cap = g.mc_write_cap(tok, chunks)
    pool, longest = g.template_pool(chunks), 0
    for seed in range(10):
        job = dict(id="x-mc", chunk=chunks[-1], kind="mc", n_options=5)
        raw = g.template_questions([job], pool, seed)["x-mc"]
        assert g.parse_mc(raw, 5)[1] is None
        longest = max(longest, len(tok(raw, add_special_tokens=False).input_ids))
    assert longest <= cap <= longest + 2 * g.WRITE_MC_MARGIN  # fits, and not by a wide margin
    assert longest > 200  # what the former fixed cap of 200 new tokens cut off


def test_the_teacher_writes_within_the_caps(tiny, monkeypatch):
    tok, model = tiny
    asked = []

    def fake_sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed):
        asked.append(max_new_tokens)
        return [""] * len(prompts)

    monkeypatch.setattr(g, "sample", fake_sample)
    jobs = [dict(id="a-mc", kind="mc", passage="조문", n_options=5),
            dict(id="a-desc", kind="desc", passage="조문", n_options=0)]
    g.write_questions(model, tok, jobs, 0, dict(g.WRITE_MAX_NEW_TOKENS, mc=777))
    assert asked == [777, g.WRITE_MAX_NEW_TOKENS["desc"]]


def test_models_load_on_any_gpu_with_the_cuda_settings(tiny_model_dir, monkeypatch):
    """FSKU_DEVICE=cuda:1: the per-device settings are read by kind, the student loads first and the teacher keeps
    this stage's working memory free beside it (no GPU here: the loaders are stand-ins)."""
    import torch

    calls = []
    monkeypatch.setattr(common, "STUDENT_MODEL", str(tiny_model_dir))
    monkeypatch.setattr(common, "TEACHER_MODEL", str(tiny_model_dir))
    monkeypatch.setattr(lm, "pick_dtype", lambda device, dtype=None, level="float": torch.bfloat16)
    monkeypatch.setattr(lm, "load_model", lambda model_id, device, dtype, **kw: calls.append(("student", device)))
    monkeypatch.setattr(lm, "load_teacher", lambda model_id, device, reserve, dtype: calls.append(
        ("teacher", device, reserve)))
    tok = lm.load_tokenizer(tiny_model_dir)
    g.load_models("cuda:1", tok, 300)
    config = lm.model_config(tiny_model_dir)
    reserve = g.working_memory_bytes(config, config, g.prompt_tokens(tok, 300), 300, g.BATCH["cuda"]) / 2**30
    assert calls == [("student", "cuda:1"), ("teacher", "cuda:1", pytest.approx(reserve))] and reserve > 0
    assert g.prompt_tokens(tok, 300)["answer"] > 300  # a question as long as the cap, in the answering template


@pytest.mark.parametrize("module", ["00_generate_pairs", "01_train_distillm", "sweep_distill"])
def test_per_device_settings_have_a_cpu_and_a_cuda_value(module):
    settings = common.settings_of(importlib.import_module(module))
    per_device = {k: v for k, v in settings.items() if isinstance(v, dict) and "cpu" in v}
    assert per_device and all(set(v) == {"cpu", "cuda"} for v in per_device.values()), per_device


def test_template_run_keeps_only_mc_the_teacher_gets_right(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "KEEP_TEACHER_WRONG", False)
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    chunks = law_chunks()
    g.run(chunks, model, model, tok, tmp_path, n_chunks=4, writer="template")
    pairs, attempts = lm.read_jsonl(tmp_path / "pairs.jsonl"), lm.read_jsonl(tmp_path / "attempts.jsonl")
    mc = [p for p in pairs if p["kind"] == "mc"]
    wrong = [a for a in attempts if a["reason"] == "the teacher's most likely option is not the key"]
    assert len(mc) + len(wrong) == 4 and all(p["writer"] == "template" for p in pairs)
    for p in mc:  # the target teacher: with the passage
        assert p["teacher_context_probs"].index(max(p["teacher_context_probs"])) + 1 == p["key"]
    assert sum(p["kind"] == "desc" for p in pairs) == 4
    meta = g.summary(tmp_path, {}, 1.0)
    assert meta["mc_answered"] == 4 and meta["teacher_top1_on_key"] == len(mc) / 4  # dropped ones count too
    assert 0 <= meta["student_top1_on_key"] <= 1
    with pytest.raises(SystemExit, match="WRITER"):
        g.run(chunks, model, model, tok, tmp_path, n_chunks=4, writer="gpt")


def test_keep_teacher_wrong_keeps_every_mc(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    monkeypatch.setattr(g, "KEEP_TEACHER_WRONG", True)
    g.run(law_chunks(), model, model, tok, tmp_path, n_chunks=4, writer="template")
    assert sum(p["kind"] == "mc" for p in lm.read_jsonl(tmp_path / "pairs.jsonl")) == 4


def test_heldout_set_is_disjoint_from_the_pairs_and_keyed_right(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    monkeypatch.setattr(common, "HELDOUT", tmp_path / "heldout.csv")
    monkeypatch.setattr(common, "HELDOUT_KEYS", tmp_path / "heldout-keys.csv")
    chunks = law_chunks()
    g.run(chunks, model, model, tok, tmp_path, n_chunks=2, writer="template", kinds=("mc",))
    assert g.write_heldout(chunks, tmp_path, n_chunks=10) == 2
    used = {a["id"].rsplit("-", 1)[0] for a in lm.read_jsonl(tmp_path / "attempts.jsonl")}
    questions, keys = competition.read_questions(common.HELDOUT), scoring.read_labels(common.HELDOUT_KEYS)
    assert len(used) == 2 and not used & {k["chunk_id"] for k in keys.values()}
    by_id = {c["id"]: c for c in chunks}
    for q in questions:
        k = keys[q.id]
        assert q.kind == "mc" and len(q.options) == 4 and k["kind"] == "mc" and k["domain"] == "가상법"
        key_in_article = q.options[int(k["Answer"]) - 1] in g.sentences(by_id[k["chunk_id"]])
        assert k["template"] in ("in", "not_in", "false") and g.sweep_kind(q.stem) == k["template"]
        assert key_in_article == (k["template"] == "in")  # "not in": another article's; "false": none
    assert scoring.score({i: k["Answer"] for i, k in keys.items()}, keys)["mc_acc"] == 1.0
    asked = {g.mc_key(q.stem, q.options) for q in questions}
    assert g.heldout_set(chunks, used, asked, 10) == ([], [])  # questions already asked are not held out again
    window = dict(chunks[0], id="w2", text=chunks[0]["text"] + "\n이용자는 비밀번호를 타인에게 알려서는 아니 된다.")
    keys = g.heldout_set(chunks + [window], {chunks[0]["id"]}, set(), 10)[1]
    assert {k["chunk_id"] for k in keys} == {c["id"] for c in chunks[1:]}  # not another window of an asked article


def test_distill_report_pairs_section_for_template_pairs(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    stats = g.run(law_chunks(), model, model, tok, tmp_path, n_chunks=4, writer="template", kinds=("mc",))
    meta = g.summary(tmp_path, stats, 1.0)
    text = "\n".join(importlib.import_module("sweep_distill").pairs_lines(meta))
    assert "Questions written by: template" in text and "questions from templates (no generation)" in text
    acc = meta["key_accuracy"]
    assert f"| all | 4 | {acc['teacher']:.3f} | {acc['teacher_context']:.3f} | {acc['student']:.3f} |" in text
    assert "None" not in text and set(meta["key_accuracy_per_template"]) == set(meta["templates"])
    assert sum(meta["templates"].values()) == 4 and meta["with_teacher_context"] == 4
    assert meta["desc_pairs"] == 0 and meta["timed_batches"]["mc_answers"] == 4


def test_loss_ends_average_the_first_and_last_tenth():
    sweep = importlib.import_module("sweep_distill")
    history = [dict(loss=float(i)) for i in range(20)]
    assert sweep.loss_ends(history) == (0.5, 18.5) and sweep.loss_ends([]) == (None, None)
    assert sweep.loss_ends([dict(loss=2.0)]) == (2.0, 2.0)


def test_mc_difference_is_paired():
    labels = {f"q{i}": dict(kind="mc", Answer="1") for i in range(4)}
    labels["d"] = dict(kind="desc", Answer="설명")
    a = {"q0": "1", "q1": "1", "q2": "2", "q3": "1", "d": "x"}
    b = {"q0": "1", "q1": "2", "q2": "2", "q3": "2", "d": "y"}
    diff, se = scoring.mc_difference(a, b, labels)
    assert diff == 0.5  # a right on q1 and q3 where b is wrong; descriptive ignored
    assert abs(se - (1 / 3) ** 0.5 / 2) < 1e-9  # differences [0, 1, 0, 1]: sample sd sqrt(1/3), over sqrt(4)


def fake_run(folder, probs_by_id):
    """A finished 04 run folder (DONE, submission.csv, meta.json, predictions) with the given option probabilities."""
    folder.mkdir(parents=True)
    records = [dict(id=i, kind="mc", logprobs=[math.log(p) for p in probs]) for i, probs in probs_by_id.items()]
    (folder / "predictions-x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    competition.write_submission(folder / "submission.csv", [(i, "1") for i in probs_by_id])
    (folder / "meta.json").write_text(json.dumps(dict(predictions="predictions-x.jsonl", content_free={})))
    (folder / "DONE").touch()
    return folder


def test_sweep_report_compares_every_point_with_the_base_under_one_calibration(tmp_path, monkeypatch):
    sweep = importlib.import_module("sweep_distill")
    monkeypatch.setattr(sweep, "SWEEP_DIR", tmp_path)
    monkeypatch.setattr(sweep, "REPORT_CALIBRATION", "none")
    n = 10
    labels = {f"q{i}": dict(kind="mc", Answer="2", domain="법률") for i in range(n)}
    wrong, right = [0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]
    base = fake_run(tmp_path / "base", {f"q{i}": right if i < 4 else wrong for i in range(n)})
    point = dict(loss_type="kd", alpha=0.1, beta=1.0, temperature=1.0, name="kd-a0.1-b1.0-t1.0")
    trained = fake_run(tmp_path / "point", {f"q{i}": right if i < 6 else wrong for i in range(n)})
    adapter = tmp_path / point["name"] / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "meta.json").write_text(json.dumps(dict(history=[dict(loss=2.0), dict(loss=1.0)], max_steps=7,
                                                       seconds=dict(per_step=3.5))))
    monkeypatch.setattr(sweep, "base_answers", lambda n_questions: base)
    monkeypatch.setattr(sweep, "train_and_answer", lambda p, steps, n_questions: trained)
    text = "\n".join(sweep.sweep_report([point], labels, "make sweep"))
    assert "MC accuracy **0.400**" in text and "most frequent raw answer 1 (60%)" in text
    row = next(line for line in text.splitlines() if line.startswith("| kd |"))
    # 6 of 10 right against 4: +0.2; paired differences two 1s and eight 0s -> SE sqrt(0.2*0.8*10/9/10)
    assert "| – | 7 | 0.600 | +0.200 ± 0.133 | 0.600 | 2 (60%) | 2.0000 → 1.0000 | 3.5 |" in row  # 7 steps, 01's epochs


def test_sweep_folder_is_started_again_when_its_pairs_change(tmp_path):
    sweep = importlib.import_module("sweep_distill")
    folder = tmp_path / "kd-a0.1-b1.0-t1.0"
    sweep.fresh_folder(folder, dict(pairs="aaa", steps=20))
    (folder / "eval").mkdir()
    (folder / "eval" / "DONE").touch()
    sweep.fresh_folder(folder, dict(pairs="aaa", steps=20))
    assert (folder / "eval" / "DONE").exists()  # same inputs: resumed
    sweep.fresh_folder(folder, dict(pairs="bbb", steps=20))
    assert not (folder / "eval").exists()  # new pairs: the old answers are not reused
    assert json.loads((folder / "inputs.json").read_text())["pairs"] == "bbb"
    (folder / "inputs.json").unlink()
    (folder / "DONE").touch()
    sweep.fresh_folder(folder, dict(pairs="bbb", steps=20))
    assert not (folder / "DONE").exists()  # a folder from before the stamps existed is not trusted either


def test_heldout_table_compares_students_and_teacher_on_the_keys(tmp_path, monkeypatch):
    sweep = importlib.import_module("sweep_distill")
    monkeypatch.setattr(sweep, "DISTILL_DIR", tmp_path)
    monkeypatch.setattr(common, "DISTILLED", tmp_path / "adapter")  # no adapter meta: designs from DISTILL_RUNS
    monkeypatch.setattr(sweep, "REPORT_CALIBRATION", "none")
    monkeypatch.setattr(common, "HELDOUT", tmp_path / "heldout.csv")
    monkeypatch.setattr(common, "HELDOUT_KEYS", tmp_path / "keys.csv")
    assert sweep.heldout_lines(sweep.DISTILL_RUNS)[0].startswith("Held-out template questions: not answered")
    n = 10
    common.write_csv(common.HELDOUT_KEYS, ["ID", "kind", "Answer", "domain"],
                     [dict(ID=f"h{i}", kind="mc", Answer="2", domain="가상법") for i in range(n)])
    stems = [g.TEMPLATE_STEMS["in" if i < 6 else "not_in"].format(where=f"「가상법」 제{i}조") for i in range(n)]
    common.write_csv(common.HELDOUT, ["ID", "Question"],
                     [dict(ID=f"h{i}", Question=g.mc_question_text(stem, ["가", "나", "다", "라"]))
                      for i, stem in enumerate(stems)])
    wrong, right = [0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]
    for folder, n_right in (("student", 2), ("teacher", 8), ("distillm_v2", 5)):
        fake_run(tmp_path / f"heldout-{folder}", {f"h{i}": right if i < n_right else wrong for i in range(n)})
    text = "\n".join(sweep.heldout_lines(sweep.DISTILL_RUNS))
    overall, per_kind = text.split("Per template")
    rows = {line.split(" | ")[0]: line for line in overall.splitlines() if line.startswith("| ")}
    assert len(rows) == 9  # header, base student, teacher, the 6 distilled runs (distillm_v2 answered)
    assert rows["| teacher"] == "| teacher | 0.800 | 1.00 | +0.600 ± 0.163 | 0.800 | 2 (80%) |"
    # 5 of 10 against 2: half of the teacher's lead of 6 questions; differences three 1s, seven 0s
    name = "student + distillm_v2 (plain teacher)"
    assert rows[f"| {name}"] == f"| {name} | 0.500 | 0.50 | +0.300 ± 0.153 | 0.500 | 2 (50%) |"
    kd = "student + kd (plain teacher)"
    assert rows[f"| {kd}"] == f"| {kd} | not run (heldout-kd) | | | | |"
    kd = "student + kd (privileged teacher)"
    assert rows[f"| {kd}"] == f"| {kd} | not run (heldout-kd-context) | | | | |"
    assert "| teacher | 1.000 (6) | 0.500 (4) |" in per_kind  # in: h0-h5, not_in: h6-h9 (read from the stems)
    assert f"| {name} | 0.833 (6) | 0.000 (4) |" in per_kind
    assert sweep.template_kind("다음 중 무엇인가?") == "other"
    plain = [name for name, design in sweep.DISTILL_RUNS.items() if design == "plain"]
    assert "privileged" not in "\n".join(sweep.heldout_lines(plain))  # only the runs asked for


def test_distill_report_of_one_design_leaves_the_other_out(tmp_path, monkeypatch):
    sweep = importlib.import_module("sweep_distill")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(sweep, "DISTILL_DIR", tmp_path / "outputs" / "distill")
    monkeypatch.setattr(common, "DISTILLED", tmp_path / "adapter")
    monkeypatch.setattr(common, "PAIRS", tmp_path / "pairs")
    monkeypatch.setattr(common, "HELDOUT_KEYS", tmp_path / "keys.csv")
    lines = sweep.distill_report({}, "make distill-report DISTILL_DESIGNS=plain", ["plain"])
    text = "\n".join(lines)
    assert "Design not in this report: privileged teacher (`make distill-report` runs every design)." in lines
    assert "Not run: student + kd (plain teacher) (" in text and "-context" not in text
    last_missing = max(i for i, line in enumerate(lines) if line.startswith("Not run: "))
    assert lines[last_missing + 1] == ""  # a paragraph of its own before the next section
    both = "\n".join(sweep.distill_report({}, "make distill-report", list(sweep.DESIGNS)))
    assert "Design not in this report" not in both and "(outputs/distill/kd-context)" in both


def test_distilled_runs_are_checked_against_the_base_and_distillm_v2_against_the_other_losses(tmp_path, monkeypatch):
    sweep = importlib.import_module("sweep_distill")
    monkeypatch.setattr(sweep, "DISTILL_DIR", tmp_path)
    monkeypatch.setattr(common, "DISTILLED", tmp_path / "adapter")  # no adapter meta: designs from DISTILL_RUNS
    monkeypatch.setattr(sweep, "REPORT_CALIBRATIONS", ["none"])
    n = 100
    labels = {f"q{i}": dict(kind="mc", Answer="2", domain="법률") for i in range(n)}
    wrong, right = [0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]
    right_on = dict(student=range(0, 30), distillm_v2=range(0, 32), kd=range(10, 60))
    done = [(sweep.run_label(name) if name in sweep.DISTILL_RUNS else "base student",
             fake_run(tmp_path / name, {f"q{i}": right if i in hits else wrong for i in range(n)}))
            for name, hits in right_on.items()]
    lines = sweep.dev_lines(sweep.compare(done, labels), sweep.DEV_FLAGS)
    checks = {line.split(":")[0]: line for line in lines if line.startswith("- ")}
    assert set(checks) == {"- student + distillm_v2 (plain teacher)", "- student + kd (plain teacher)"}
    assert checks["- student + kd (plain teacher)"].endswith("**met**")  # +0.20 ± 0.060: 30 gained, 10 lost
    assert "**not met** (none: +0.020 ± 0.014 (needs >= +0.030" in checks["- student + distillm_v2 (plain teacher)"]
    table = sweep.loss_lines(done, labels)
    # distillm_v2 - kd: +1 on q0-q9, -1 on q32-q59: mean -0.18, SE sqrt((0.38 - 0.18 ** 2) / 99)
    assert table[-2] == "| plain teacher | kd | -0.180 ± 0.059 |"
    assert not any("gkd" in line for line in table)  # gkd not run: no row


def test_answer_position_reads_the_digits_and_the_top_k_of_one_prefill(tiny):
    tok, model = tiny
    prompts = [lm.render(tok, common.mc_messages(f"질문 {i} 금융보안", ["가", "나", "다", "라"]), common.MC_ANSWER_PREFIX)
               for i in range(3)] + [lm.render(tok, common.mc_messages("짧은 질문", ["가", "나", "다", "라"]))]
    ids = lm.option_token_ids(tok, 4)
    got = g.answer_position(model, tok, prompts, ids, k=8, batch_size=3)  # mixed lengths: left padding
    reference = lm.next_token_logprobs(model, tok, prompts, ids)  # 04's reading (over every logit row)
    import torch
    vocab = len(tok.get_vocab())
    for (digits, top), ref, prompt in zip(got, reference, prompts):
        assert torch.softmax(torch.tensor(digits), -1).tolist() == pytest.approx(
            torch.softmax(torch.tensor(ref), -1).tolist(), abs=1e-4)  # the same option distribution
        with torch.no_grad():  # alone, unpadded, over the shared vocabulary as 01 reads it
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1, :vocab].float()
            full = torch.log_softmax(logits, -1)
        assert digits == pytest.approx(full[ids].tolist(), abs=1e-4)
        assert top["ids"] == full.topk(8).indices.tolist()
        assert top["logprobs"] == pytest.approx(full.topk(8).values.tolist(), abs=1e-4)
        assert math.exp(top["rest"]) + sum(math.exp(x) for x in top["logprobs"]) == pytest.approx(1.0, abs=1e-4)


def test_the_teacher_answers_with_the_passage_and_the_student_without(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    monkeypatch.setattr(g, "TOPK_STORED", 5)
    chunks = law_chunks()
    g.run(chunks, model, model, tok, tmp_path, n_chunks=4, writer="template", kinds=("mc",))
    pairs = lm.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == 4  # KEEP_TEACHER_WRONG: every question is a pair
    by_id = {c["id"]: c for c in chunks}
    for p in pairs:
        q = competition.parse_question(p["id"], p["question"])
        assert p["prompt"] == common.mc_messages(q.stem, q.options)  # the student's prompt is 04's
        assert p["teacher_prompt"] == g.teacher_messages(q, p["evidence"])
        content = p["teacher_prompt"][-1]["content"]
        assert p["evidence"] in content and content.endswith("\n".join(f"{i} {o}" for i, o in enumerate(q.options, 1)))
        assert g.teacher_messages(q, p["evidence"], "retrieval") == common.mc_messages(q.stem, q.options,
                                                                                      context=p["evidence"])
        assert p["evidence"].split("\n")[0] == by_id[p["chunk_id"]]["text"].split("\n")[0]
        if p["template"] == "in":  # the key sentence is in the teacher's passage
            assert q.options[p["key"] - 1] in p["evidence"]
        assert set(p["teacher_topk"]) == {"plain", "context"}
        assert all(len(t["ids"]) == 5 for t in p["teacher_topk"].values())
        assert p["teacher_topk"]["plain"] != p["teacher_topk"]["context"]  # another prompt, another distribution
        assert len(p["teacher_probs"]) == len(p["teacher_context_probs"]) == len(p["student_probs"]) == 4
    timing = lm.read_jsonl(tmp_path / "timings.jsonl")[0]
    assert timing["context_answers"] == 4 and timing["teacher_context_answer_seconds"] > 0
