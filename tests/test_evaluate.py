"""The competition scorer: keyword recall, the character n-gram cosine and the combined score by hand."""
import importlib
import json

import pytest

evaluate = importlib.import_module("evaluate")


def test_keyword_recall_ignores_spaces_and_case():
    assert evaluate.keyword_recall("CISO 독립성 확보", ["ciso", "독립 성"]) == 1.0
    assert evaluate.keyword_recall("자본금 요건", evaluate.keywords_of("자본금 차등화")) == 0.5
    assert evaluate.keyword_recall("무엇이든", []) == 0.0


def test_keywords_split_on_commas_slashes_and_spaces():
    assert evaluate.keywords_of("공급망 보안, OSS/서드파티") == ["공급망", "보안", "OSS", "서드파티"]


def test_char_ngram_cosine_bounds():
    same, disjoint, partial = evaluate.char_ngram_cosines(["접근 통제", "가나다", "접근 통제 정책"],
                                                          ["접근 통제", "라마바", "접근 통제"])
    assert same == pytest.approx(1.0)
    assert disjoint == pytest.approx(0.0)
    assert 0.0 < partial < 1.0


def test_score_by_hand():
    labels = {"m1": dict(kind="mc", Answer="2", domain="A"), "m2": dict(kind="mc", Answer="3", domain="B"),
              "d1": dict(kind="desc", Answer="접근 통제", Keyword="접근 통제")}
    answers = {"m1": "2", "m2": "1", "d1": "접근 통제"}
    s = evaluate.score(answers, labels)
    assert s["mc_acc"] == 0.5 and s["per_domain"] == {"A": (1.0, 1), "B": (0.0, 1)}
    assert s["cosine"] == pytest.approx(1.0) and s["keyword_recall"] == 1.0
    assert s["score"] == pytest.approx(0.5 * 0.5 + 0.5 * (0.6 * 1.0 + 0.4 * 1.0))


def test_missing_labels_say_why(tmp_path):
    with pytest.raises(SystemExit, match="no public answers"):
        evaluate.read_labels(tmp_path / "labels.csv")


def test_copy_check_finds_verbatim_spans_from_the_cited_passages(tmp_path):
    law = "전자서명법 [법률] 제2조 (정의)\n전자서명이란 서명자의 신원과 서명자가 해당 전자문서에 서명하였다는 사실을 나타내는 정보를 말한다."
    chunk = dict(id=0, source="laws/x.md", law="전자서명법", kind="법률", article="제2조", title="정의", part=1,
                 parts=1, text=law)
    (tmp_path / "chunks.jsonl").write_text(json.dumps(chunk, ensure_ascii=False) + "\n", encoding="utf-8")
    passages = evaluate.passages_by_key(tmp_path)
    key = ["전자서명법", "법률", "제2조"]
    copied = "전자서명이란 서명자의 신원과   서명자가 해당 전자문서에 서명하였다는 사실을 나타내는 정보이다."
    own = "전자서명은 문서에 서명한 사람이 누구인지 확인해 주는 정보입니다."
    records = [dict(id="a", kind="desc", context=[key]), dict(id="b", kind="desc", context=[key]),
               dict(id="c", kind="desc", context=[]), dict(id="d", kind="mc", context=[key])]
    answers = {"a": copied, "b": own, "c": copied, "d": "1"}
    checked, n_copied, longest = evaluate.copy_check(answers, records, passages)
    # "c" had no passages and "d" is multiple choice; the header line of the chunk is not counted as passage text.
    assert checked == 2 and n_copied == 1
    assert longest == len("전자서명이란 서명자의 신원과 서명자가 해당 전자문서에 서명하였다는 사실을 나타내는 정보")
    assert evaluate.longest_shared_span(own, passages[tuple(key)]) < evaluate.COPY_SPAN_CHARS
