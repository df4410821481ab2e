"""eval_gate.py: a relevance gate mixes the answers of a select point without and one with passages."""
import json
import math
import shutil
import sys

import pytest

import answering
import common
import competition
import eval_gate as gate
import retrieval
import scoring


def record(qid, probs):
    return dict(id=qid, kind="mc", logprobs=[math.log(p) for p in probs])


def runs(n, right_with_passages):
    """Labels (answer 2 everywhere), and the two runs: without passages option 1 for every question; with passages
    option 2 for the questions in right_with_passages, option 3 for the others."""
    labels = {f"q{i}": dict(kind="mc", Answer="2") for i in range(n)}
    plain = {f"q{i}": record(f"q{i}", [0.7, 0.1, 0.1, 0.1]) for i in range(n)}
    rag = {f"q{i}": record(f"q{i}", [0.1, 0.7, 0.1, 0.1] if f"q{i}" in right_with_passages else [0.1, 0.1, 0.7, 0.1])
           for i in range(n)}
    return labels, (plain, None), (rag, None)


def test_gate_answers_from_the_run_with_passages_only_for_the_chosen_questions():
    labels, plain, rag = runs(4, {"q0", "q1", "q2", "q3"})
    answers = gate.gated_answers(list(labels), {"q0", "q1"}, plain, rag, "none")
    assert answers == {"q0": "2", "q1": "2", "q2": "1", "q3": "1"}
    assert gate.accuracy(answers, labels) == 0.5


def test_each_group_is_calibrated_on_its_own():
    # Batch calibration over one run: every question favours option 1 by a shared prior, the answer lifts one option.
    n = 2 * answering.BATCH_MIN
    prior = {"plain": [0.7, 0.1, 0.1, 0.1], "rag": [0.1, 0.1, 0.1, 0.7]}
    records = {}
    for name, p in prior.items():
        records[name] = {}
        for i in range(n):
            probs = [x * (3.0 if k == i % 4 else 1.0) for k, x in enumerate(p)]
            records[name][f"q{i}"] = record(f"q{i}", [x / sum(probs) for x in probs])
    half = {f"q{i}" for i in range(0, n, 2)}
    answers = gate.gated_answers(list(records["plain"]), half, (records["plain"], None), (records["rag"], None),
                                 "batch")
    assert all(answers[f"q{i}"] == str(i % 4 + 1) for i in range(n))


def test_held_out_gain_finds_a_signal_that_separates_the_questions(monkeypatch):
    monkeypatch.setattr(gate, "GATE_SPLITS", 3)
    n = 40
    sure = {f"q{i}" for i in range(n) if i % 2}
    labels, plain, rag = runs(n, sure)
    plain[0].update({i: record(i, [0.1, 0.7, 0.1, 0.1]) for i in labels if i not in sure})  # right without them
    values = {i: 1.0 if i in sure else 0.0 for i in labels}
    mean, _ = gate.held_out_gain(values, list(labels), plain, rag, labels, "none")
    assert mean > 0.4  # no passages: half right; the gate at the separating threshold: all right
    noise = {i: float(k % 3) for k, i in enumerate(labels)}  # unrelated to which run is right
    assert gate.held_out_gain(noise, list(labels), plain, rag, labels, "none")[0] < mean


def test_only_the_shifts_of_the_chosen_calibration_are_read():
    questions = [competition.parse_question("q1", "옳은 것은?\n1 가\n2 나\n3 다"), competition.parse_question(
        "d1", "전자서명을 설명하세요.")]
    full = dict(record("q1", [0.5, 0.3, 0.2]), shifts={"1": [-1.0, -1.0, -1.0], "2": [-2.0, -2.0, -2.0]})
    records = {"q1": full, "d1": dict(id="d1", kind="desc", raw="답")}
    two = gate.with_chosen_shifts(records, questions, answering.Config(calibration="permute", permutations=2))
    assert list(two) == ["q1"] and two["q1"]["shifts"] == {"1": [-1.0, -1.0, -1.0]}
    assert gate.with_chosen_shifts(records, questions, answering.Config(calibration="auto"))["q1"]["shifts"] == {}
    assert full["shifts"].keys() == {"1", "2"}  # the records read are left as they were
    permute = answering.Config(calibration="permute", permutations=3)
    assert gate.scorable(permute, questions, [records]) == permute
    identity = {"q1": dict(full, shifts={}), "d1": records["d1"]}  # a CPU passage point: one prompt per question
    assert gate.scorable(permute, questions, [records, identity]).calibration == "batch"


def test_a_missing_select_point_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gate, "SELECT", tmp_path)
    plain, rag, index = gate.point_dirs(answering.Config(candidate="teacher", level="bnb-nf4"))
    assert (plain.name, rag.name, index.name) == ("teacher-bnb-nf4-p0", "teacher-bnb-nf4-p1", "index-teacher")
    with pytest.raises(SystemExit, match="make select"):
        gate.load_point(plain)


def test_signals_rank_the_article_a_question_quotes_as_sure(tiny_index):
    index = retrieval.load_index(tiny_index)
    questions = [competition.Question(id="sure", text="전자서명은 서명자의 신원을 나타내는 정보인가?", stem="", options=[],
                                      kind="desc"),
                 competition.Question(id="vague", text="무엇이 옳은가?", stem="", options=[], kind="desc")]
    values = gate.signals(index, questions)
    assert values["sure"]["top"] > 0 and values["sure"]["margin"] > 0 and values["sure"]["ratio"] > 1
    assert values["sure"]["per_token"] == values["sure"]["top"] / len(retrieval.morphemes(
        index.kiwi, [questions[0].text])[0])
    assert values["vague"]["top"] < values["sure"]["top"]


def write_point(folder, records, rag=None):
    folder.mkdir(parents=True)
    (folder / "predictions-k.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                                encoding="utf-8")
    meta = dict(model="models/student-base", rag=rag, content_free={}, predictions="predictions-k.jsonl")
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "DONE").touch()


def test_report_from_the_two_select_points_on_the_tiny_index(tiny_index, tmp_path, monkeypatch):
    """main() end to end: two fake select points of the default configuration over four law questions, one of them
    (q0) answered right only with passages that hold its cited article."""
    texts = ["전자서명은 무엇을 나타내는가?", "개인정보처리자의 의무는?", "전자금융거래에서 확보할 것은?", "금융회사가 보고할 것은?"]
    rows = [dict(ID=f"q{i}", Question=f"{t}\n1 가\n2 나\n3 다\n4 라") for i, t in enumerate(texts)]
    rows.append(dict(ID="d0", Question="전자서명의 뜻을 설명하세요."))
    labels = [dict(ID=f"q{i}", kind="mc", Answer="2", domain="금융보안법률", sub_domain="", reference=f"테스트법 제{i + 1}조",
                   Keyword="") for i in range(4)]
    labels.append(dict(ID="d0", kind="desc", Answer="서명자의 신원을 나타내는 정보", domain="서술형", Keyword="신원"))
    common.write_csv(tmp_path / "questions.csv", ["ID", "Question"], rows)
    common.write_csv(tmp_path / "labels.csv", scoring.LABEL_FIELDS, labels)
    monkeypatch.setattr(common, "QUESTIONS", tmp_path / "questions.csv")
    monkeypatch.setattr(common, "LABELS", tmp_path / "labels.csv")
    monkeypatch.setattr(common, "SELECTION", tmp_path / "selection.json")  # none: Config()'s defaults
    monkeypatch.setattr(gate, "SELECT", tmp_path / "05_select")
    monkeypatch.setattr(gate, "GATE_SPLITS", 2)
    key = ["테스트법", "법률", "제1조"]
    plain = [record(f"q{i}", [0.7, 0.1, 0.1, 0.1]) for i in range(4)] + [dict(id="d0", kind="desc", raw="모릅니다.")]
    rag = [dict(record("q0", [0.1, 0.7, 0.1, 0.1]), context=[key])]
    rag += [dict(record(f"q{i}", [0.7, 0.1, 0.1, 0.1]), context=[]) for i in range(1, 4)]
    rag.append(dict(id="d0", kind="desc", raw="서명자의 **신원**을 나타내는 정보입니다.", context=[key]))
    write_point(gate.SELECT / "student-float-p0", plain)
    write_point(gate.SELECT / "student-float-p1", rag, dict(passages=1, method="fused", max_tokens=512))
    write_point(gate.SELECT / "student-float-p3", rag, dict(passages=3, method="fused", max_tokens=512))
    write_point(gate.SELECT / "student-float-p2-rerank", rag, dict(passages=2, method="fused", max_tokens=512))
    assert list(gate.passage_points(answering.Config(candidate="student"))) == [1, 3]  # first stage only
    monkeypatch.setattr(sys, "argv", ["eval_gate.py", "--out", str(tmp_path / "gate.md")])
    with pytest.raises(SystemExit, match="no index at .*make select"):
        gate.main()
    shutil.copytree(tiny_index, gate.SELECT / "index-student")
    gate.main()
    report = (tmp_path / "gate.md").read_text(encoding="utf-8")
    assert "4 development multiple-choice questions" in report
    assert "No passages: **0.000**. Passages for every question: **0.250**." in report
    assert "**Oracle gate** (passages exactly for the 1 questions" in report and "**0.250**" in report
    assert "| echo baseline (the question as the answer) |" in report and "| 1 passages |" in report
    rows = [line for line in report.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 3 |"))]
    assert len(rows) == 3 and "| 0.250 | +0.250 ± 0.250 |" in rows[1]  # every finished point, against none
    assert "| 금융보안법률 /  | 4 | 0.000 | 0.250 | +0.250 ± 0.250 |" in report  # per domain
    law = next(line for line in report.splitlines() if line.startswith("| first passage from a law"))
    assert law.endswith("| 1 | 0.250 | +0.000 ± 0.000 |")  # only q0 read a law's article: the one it needed
    assert "| oracle: the question's domain is 금융보안법률 | 4 | 0.250 |" in report
