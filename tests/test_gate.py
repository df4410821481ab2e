"""eval_gate.py: a relevance gate mixes the answers of a run without and a run with passages."""
import importlib
import math

import common
import competition

gate = importlib.import_module("eval_gate")


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


def test_gate_answers_from_the_run_with_passages_only_for_the_chosen_questions(monkeypatch):
    monkeypatch.setattr(gate.infer, "CALIBRATION", "none")
    labels, plain, rag = runs(4, {"q0", "q1", "q2", "q3"})
    answers = gate.gated_answers(list(labels), {"q0", "q1"}, plain, rag)
    assert answers == {"q0": "2", "q1": "2", "q2": "1", "q3": "1"}
    assert gate.accuracy(answers, labels) == 0.5


def test_each_group_is_calibrated_on_its_own(monkeypatch):
    # Batch calibration over one run: every question favours option 1 by a shared prior, the answer lifts one option.
    monkeypatch.setattr(gate.infer, "CALIBRATION", "batch")
    n = 2 * gate.infer.BATCH_MIN
    prior = {"plain": [0.7, 0.1, 0.1, 0.1], "rag": [0.1, 0.1, 0.1, 0.7]}
    records = {}
    for name, p in prior.items():
        records[name] = {}
        for i in range(n):
            probs = [x * (3.0 if k == i % 4 else 1.0) for k, x in enumerate(p)]
            records[name][f"q{i}"] = record(f"q{i}", [x / sum(probs) for x in probs])
    half = {f"q{i}" for i in range(0, n, 2)}
    answers = gate.gated_answers(list(records["plain"]), half, (records["plain"], None), (records["rag"], None))
    assert all(answers[f"q{i}"] == str(i % 4 + 1) for i in range(n))


def test_held_out_gain_finds_a_signal_that_separates_the_questions(monkeypatch):
    monkeypatch.setattr(gate.infer, "CALIBRATION", "none")
    monkeypatch.setattr(gate, "GATE_SPLITS", 3)
    n = 40
    sure = {f"q{i}" for i in range(n) if i % 2}
    labels, plain, rag = runs(n, sure)
    plain[0].update({i: record(i, [0.1, 0.7, 0.1, 0.1]) for i in labels if i not in sure})  # right without them
    values = {i: 1.0 if i in sure else 0.0 for i in labels}
    mean, _ = gate.held_out_gain(values, list(labels), plain, rag, labels)
    assert mean > 0.4  # no passages: half right; the gate at the separating threshold: all right
    noise = {i: float(k % 3) for k, i in enumerate(labels)}  # unrelated to which run is right
    assert gate.held_out_gain(noise, list(labels), plain, rag, labels)[0] < mean


def test_signals_rank_the_article_a_question_quotes_as_sure(tiny_index):
    index = gate.build_index.load_index(tiny_index)
    questions = [competition.Question(id="sure", text="전자서명은 서명자의 신원을 나타내는 정보인가?", stem="", options=[],
                                 kind="desc"),
                 competition.Question(id="vague", text="무엇이 옳은가?", stem="", options=[], kind="desc")]
    values = gate.signals(index, questions)
    assert values["sure"]["top"] > 0 and values["sure"]["margin"] > 0 and values["sure"]["ratio"] > 1
    assert values["sure"]["per_token"] == values["sure"]["top"] / len(gate.build_index.morphemes(
        index.kiwi, [questions[0].text])[0])
    assert values["vague"]["top"] < values["sure"]["top"]
