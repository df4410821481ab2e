"""Slow end-to-end test: the real embedded student answers a few development questions (`make test-slow`)."""
import csv
import importlib
import json

import pytest

import answering
import common
import competition
import scoring

infer = importlib.import_module("04_infer")

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (common.STUDENT_BASE / "DONE").exists(), reason="run `make student` first")
def test_student_answers_five_dev_questions(tmp_path, monkeypatch):
    eval_dir = common.SHARED / "eval"
    with open(eval_dir / "fsku_dev_mc.csv", encoding="utf-8") as f:
        mc = list(csv.DictReader(f))[:4]
    with open(eval_dir / "fsku_dev_subjective.csv", encoding="utf-8") as f:
        desc = list(csv.DictReader(f))[:1]
    questions_csv = tmp_path / "questions.csv"
    common.write_csv(questions_csv, ["ID", "Question"], mc + desc)
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 48)
    # No retrieval: CI builds no index (its dense pass takes minutes of CPU); test_infer covers passages on a tiny
    # index. The configuration is given in full, so a committed selection.json does not change the test.
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["04_infer.py", "--out", str(run), "--questions", str(questions_csv),
                                     "--model", "student", "--level", "float", "--calibration", "auto",
                                     "--permutations", "1", "--passages", "0"])
    infer.main()
    rows = competition.read_submission(run / "submission.csv")
    questions = competition.read_questions(questions_csv)
    assert competition.validate_submission(rows, questions) == []
    meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"] == common.STUDENT_MODEL and meta["rag"] is None and (run / "DONE").exists()
    answers = dict(rows)
    description = answers[desc[0]["ID"]]
    assert len(description) > 10 and any("\uac00" <= ch <= "\ud7a3" for ch in description)  # Korean prose
    labels = {r["ID"]: dict(kind="mc", Answer=r["Answer"], domain=r["domain"]) for r in mc}
    labels[desc[0]["ID"]] = dict(kind="desc", Answer=desc[0]["Answer"], Keyword=desc[0]["Keyword"])
    answers_again, _, records = scoring.load_run(run)  # what `make eval` reads
    assert answers_again == answers and len(records) == 5
    s = scoring.score(answers, labels)
    assert 0.0 <= s["score"] <= 1.0 and s["n_mc"] == 4 and s["n_desc"] == 1
    assert s["encoder"] == scoring.encoder_name()
