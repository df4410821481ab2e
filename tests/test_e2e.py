"""Slow end-to-end test: the real embedded student answers a few development questions (`make test-slow`)."""
import csv
import importlib

import pytest

import common
import competition

infer = importlib.import_module("04_infer")
evaluate = importlib.import_module("evaluate")

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (common.STUDENT_BASE / "DONE").exists(), reason="run `make student` first")
def test_student_answers_five_dev_questions(tmp_path, monkeypatch):
    eval_dir = common.SHARED / "eval"
    with open(eval_dir / "fsku_dev_mc.csv", encoding="utf-8") as f:
        mc = list(csv.DictReader(f))[:4]
    with open(eval_dir / "fsku_dev_subjective.csv", encoding="utf-8") as f:
        desc = list(csv.DictReader(f))[:1]
    questions_csv = tmp_path / "questions.csv"
    with open(questions_csv, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ID", "Question"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(mc + desc)
    monkeypatch.setattr(infer, "DESC_MAX_NEW_TOKENS", 48)
    # No retrieval: CI builds no index (its dense pass takes minutes of CPU); test_infer covers RAG on a tiny index.
    monkeypatch.setattr("sys.argv", ["04_infer.py", "--out", str(tmp_path / "run"), "--questions",
                                     str(questions_csv), "--model", str(common.STUDENT_BASE.relative_to(common.ROOT)),
                                     "--no-rag"])
    infer.main()
    rows = competition.read_submission(tmp_path / "run" / "submission.csv")
    questions = competition.read_questions(questions_csv)
    assert competition.validate_submission(rows, questions) == []
    answers = dict(rows)
    description = answers[desc[0]["ID"]]
    assert len(description) > 10 and any("\uac00" <= ch <= "\ud7a3" for ch in description)  # Korean prose
    labels = {r["ID"]: dict(kind="mc", Answer=r["Answer"], domain=r["domain"]) for r in mc}
    labels[desc[0]["ID"]] = dict(kind="desc", Answer=desc[0]["Answer"], Keyword=desc[0]["Keyword"])
    s = evaluate.score(answers, labels)
    assert 0.0 <= s["score"] <= 1.0 and s["n_mc"] == 4 and s["n_desc"] == 1
