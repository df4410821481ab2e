"""The competition scorer: keyword recall, the character n-gram cosine and the combined score by hand."""
import importlib

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
