"""The Makefile's DAG on a temporary copy of the checkout: `make -n` shows what a change would rebuild."""
import importlib
import json
import os
import shutil
import subprocess
import time

import pytest

import common

STAMPS = [".venv/DONE", "models/student-base/DONE", "models/teacher-base/DONE", "data/prepared/DONE",
          "outputs/00_pairs/DONE", "outputs/01_topk/DONE", "models/student-distilled/DONE", "outputs/02_index/DONE", "outputs/03_rerank/DONE",
          "submission.csv"]  # in pipeline order: each newer than the one before


@pytest.fixture
def checkout(tmp_path):
    """The tracked files (and the working copy's versions of them) in a temporary folder, every artifact stamped
    up to date."""
    if shutil.which("make") is None or not (common.ROOT / ".git").exists():
        pytest.skip("needs make and a git checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=common.ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (common.ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(common.ROOT / name, tmp_path / name)
    past = time.time() - 1000
    for path in tmp_path.rglob("*"):
        os.utime(path, (past, past))
    for i, stamp in enumerate(STAMPS):
        (tmp_path / stamp).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stamp).touch()
        os.utime(tmp_path / stamp, (past + 10 * (i + 1), past + 10 * (i + 1)))
    return tmp_path


def dry_run(folder, target):
    """The scripts `make -n target` would run, in order."""
    out = subprocess.run(["make", "-n", target], cwd=folder, check=True, capture_output=True, text=True).stdout
    return [w for line in out.splitlines() for w in line.split() if w.endswith(".py")]


def set_selection(folder, **config):
    path = folder / "selection.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["config"].update(config)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_an_up_to_date_checkout_rebuilds_nothing(checkout):
    set_selection(checkout, candidate="student", passages=0)
    os.utime(checkout / "selection.json", (time.time() - 2000, time.time() - 2000))
    assert dry_run(checkout, "submission") == []


def test_passages_on_builds_and_reruns_the_index_and_the_reranking(checkout):
    set_selection(checkout, candidate="student", passages=0)
    assert dry_run(checkout, "submission") == ["04_infer.py"]  # the changed selection: answer again, no index
    set_selection(checkout, candidate="student", passages=3, rerank=True)
    assert dry_run(checkout, "submission") == ["02_build_index.py", "03_rerank.py", "04_infer.py"]


def test_first_stage_passages_build_the_index_without_the_reranking(checkout):
    set_selection(checkout, candidate="student", passages=1, rerank=False)
    assert dry_run(checkout, "submission") == ["02_build_index.py", "04_infer.py"]


def test_the_chosen_candidate_is_the_only_model_built(checkout):
    (checkout / "models/teacher-base/DONE").unlink()
    (checkout / "models/student-base/DONE").unlink()
    set_selection(checkout, candidate="teacher", passages=0)
    steps = subprocess.run(["make", "-n", "submission"], cwd=checkout, check=True, capture_output=True,
                           text=True).stdout
    assert "fetch_models.py teacher" in steps and "fetch_models.py student" not in steps


def test_a_changed_chunker_reruns_the_pairs(checkout):
    os.utime(checkout / "retrieval.py")  # now: newer than every stamp
    assert "00_generate_pairs.py" in dry_run(checkout, "pairs")


def make_value(name):
    """The value of a Makefile variable as make expands it in this checkout."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", f"print-value: ; @echo $({name})",
                          "print-value"], cwd=common.ROOT, check=True, capture_output=True, text=True).stdout
    return out.split()


def test_the_distillation_runs_and_flags_agree_with_sweep_distill():
    # make cannot read sweep_distill's dicts, so the Makefile writes the designs, runs and 04 flags out again
    sweep = importlib.import_module("sweep_distill")
    assert make_value("DISTILL_ALL_DESIGNS") == list(sweep.DESIGNS)
    assert make_value("DISTILLED_RUNS") == list(sweep.DISTILL_RUNS)
    assert make_value("CONTEXT_RUNS") == [run for run, design in sweep.DISTILL_RUNS.items() if design == "context"]
    assert make_value("DEV_04")[2:] == sweep.DEV_FLAGS and make_value("EVAL_04")[2:] == sweep.EVAL_FLAGS
