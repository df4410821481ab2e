"""06_verify.py / 06_package.py: the checks catch deliberately broken submissions, code and requirements; the report
is generated from sample stage reports; the package passes its own checks. No network, no real weights (the slow
test at the end runs the tiny `make verify` profile with the real student)."""
import csv
import importlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import common
import competition

verify = importlib.import_module("06_verify")
package = importlib.import_module("06_package")

QUESTIONS = [
    ("Q1", "다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라"),
    ("Q2", "전자금융거래법상 접근매체가 아닌 것은?\n1 전자식 카드\n2 비밀번호\n3 공인인증서\n4 계좌번호\n5 생체정보"),
    ("Q3", "개인정보 보호법의 목적을 설명하세요."),
    ("Q4", "다음 중 틀린 것은?\n1 가\n2 나\n3 다\n4 라"),
    ("Q5", "정보보호 관리체계의 의미를 서술하시오."),
]
GOOD = [("Q1", "2"), ("Q2", "5"), ("Q3", "개인정보의 처리와 보호에 관한 사항을 정합니다."), ("Q4", "1"),
        ("Q5", "관리적·기술적 보호조치의 체계입니다.")]


def write_csv(path, header, rows, encoding="utf-8", newline="\r\n"):
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.writer(f, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    """questions.csv, sample_submission.csv and a valid submission.csv in tmp_path."""
    q = write_csv(tmp_path / "questions.csv", ["ID", "Question"], QUESTIONS)
    s = write_csv(tmp_path / "sample_submission.csv", ["ID", "Answer"], [(i, "") for i, _ in QUESTIONS])
    return q, s, tmp_path / "submission.csv"


def check(files, rows, **kw):
    q, s, sub = files
    write_csv(sub, ["ID", "Answer"], rows, **kw)
    return verify.check_submission(sub, q, s)


# ----------------------------------------------------------------------------- submission
def test_valid_submission_passes_with_crlf_lf_and_bom(files):
    assert check(files, GOOD) == []
    assert check(files, GOOD, newline="\n") == []
    assert check(files, GOOD, encoding="utf-8-sig") == []


def test_wrong_id_order_is_caught(files):
    problems = check(files, [GOOD[1], GOOD[0]] + GOOD[2:])
    assert any("order" in p for p in problems)


def test_missing_row_is_caught(files):
    problems = check(files, GOOD[:-1])
    assert any("4 rows vs 5" in p and "Q5" in p for p in problems)


def test_unknown_and_duplicate_rows_are_caught(files):
    assert any("unknown" in p for p in check(files, GOOD + [("Q9", "1")]))
    assert check(files, GOOD[:2] + [GOOD[1]] + GOOD[2:])


def test_empty_and_nan_answers_are_caught(files):
    rows = [GOOD[0], GOOD[1], ("Q3", "  "), GOOD[3], ("Q5", "NaN")]
    problems = check(files, rows)
    assert "Q3: empty answer" in problems and "Q5: empty answer" in problems


def test_out_of_range_options_are_caught_per_question(files):
    rows = [("Q1", "5"), ("Q2", "5"), GOOD[2], ("Q4", "1.0"), GOOD[4]]
    problems = check(files, rows)
    assert any(p.startswith("Q1:") and "1-4" in p for p in problems)
    assert not any(p.startswith("Q2:") for p in problems)  # Q2 has five options
    assert any(p.startswith("Q4:") for p in problems)


def test_every_problem_is_listed_at_once(files):
    rows = [("Q1", "0"), ("Q2", "9"), ("Q3", ""), ("Q4", "x")]
    problems = check(files, rows)
    assert len(problems) >= 5  # missing row + four bad answers


def test_extra_column_and_bad_header(files):
    q, s, sub = files
    write_csv(sub, ["ID", "Answer", "note"], [r + ("x",) for r in GOOD])
    assert any("more than two columns" in p for p in verify.check_submission(sub, q, s))
    write_csv(sub, ["id", "answer"], GOOD)
    assert any("header" in p for p in verify.check_submission(sub, q, s))


def test_non_utf8_submission_is_caught_not_crashed(files):
    problems = check(files, GOOD, encoding="cp949")
    assert len(problems) == 1 and "not UTF-8" in problems[0]


def test_sample_submission_order_mismatch(files):
    q, s, sub = files
    write_csv(s, ["ID", "Answer"], [(i, "") for i, _ in reversed(QUESTIONS)])
    write_csv(sub, ["ID", "Answer"], GOOD)
    assert any("sample_submission" in p for p in verify.check_submission(sub, q, s))


def test_missing_files_are_problems(tmp_path):
    problems = verify.check_submission(tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv")
    assert len(problems) == 3


# ----------------------------------------------------------------------------- code
def code_problems(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return verify.check_code(tmp_path, [path.relative_to(tmp_path)])


def test_planted_absolute_path_is_caught(tmp_path):
    problems, _ = code_problems(tmp_path, "x.py", 'from pathlib import Path\nDATA = Path("/home/me/fsku/data")\n')
    assert len(problems) == 1 and "x.py:2: absolute path" in problems[0]


@pytest.mark.parametrize("literal", ['"~/data"', '"C:\\\\Users\\\\me"', '"file:///opt/x"', 'f"/work/{name}/x"',
                                     '"/data"', '"cp -r /tmp/a b"'])
def test_other_absolute_forms_are_caught(tmp_path, literal):
    problems, _ = code_problems(tmp_path, "x.py", f"name = 1\nX = {literal}\n")
    assert problems, literal


@pytest.mark.parametrize("literal", ['"/"', '"models/student-base"', 'f"{out}/submission.csv"', 'r"[,/\\s]+"',
                                     '"/proc/self/status"', '"cmd > /dev/null"',
                                     '"https://pypi.org/simple"', '"a / b"', '"..."', '"1/4"'])
def test_relative_paths_and_non_paths_pass(tmp_path, literal):
    problems, _ = code_problems(tmp_path, "x.py", f"out = 1\nX = {literal}\n")
    assert problems == [], literal


def test_docstrings_and_comments_are_prose(tmp_path):
    text = '"""Reads ../shared/corpus and /work/x."""\n# writes /tmp/y\n\n\ndef f():\n    """See /etc/z."""\n'
    assert code_problems(tmp_path, "x.py", text) == ([], [])


def test_paths_leaving_the_package_are_caught(tmp_path):
    for text in ('X = "../shared"\n', "from common import ROOT\nX = ROOT.parent / 'x'\n",
                 "import common\nX = common.ROOT.parent\n",
                 "from pathlib import Path\nX = Path(__file__).resolve().parent.parent\n",
                 "import os\nos.chdir('data')\n"):
        problems, _ = code_problems(tmp_path, "x.py", text)
        assert problems, text


def test_file_parent_may_climb_as_deep_as_the_file(tmp_path):
    text = "from pathlib import Path\nROOT_DIR = Path(__file__).resolve().parent.parent\n"
    assert code_problems(tmp_path, "sub/x.py", text) == ([], [])
    assert code_problems(tmp_path, "x.py", text)[0]


def test_pragma_moves_a_finding_to_allowed(tmp_path):
    text = "from common import ROOT\nX = ROOT.parent / 'shared'  # dev data (verify: allow)\n"
    problems, allowed = code_problems(tmp_path, "x.py", text)
    assert problems == [] and len(allowed) == 1


def test_trust_remote_code_is_caught(tmp_path):
    for text, bad in (("f(x, trust_remote_code=True)\n", True), ("f(x, trust_remote_code=flag)\n", True),
                      ("kw = {'trust_remote_code': True}\n", True), ("f(x, trust_remote_code=False)\n", False)):
        problems, _ = code_problems(tmp_path, "x.py", text)
        assert bool(problems) == bad, text
    assert code_problems(tmp_path, "run.sh", "python x.py --trust_remote_code=true\n")[0]


def test_makefile_and_shell_scripts(tmp_path):
    assert code_problems(tmp_path, "Makefile", "x:\n\tcp /opt/wheels/a.whl .\n")[0]
    assert code_problems(tmp_path, "Makefile", "x: ## help\n\t$(PY) a.py  # /abs in a comment\n") == ([], [])
    assert code_problems(tmp_path, ".ci/run", '#!/usr/bin/env bash\ncd "$(dirname "$0")/.."\n') == ([], [])
    assert code_problems(tmp_path, "run.sh", 'cd "$(dirname "$0")/.."\n')[0]  # the script's parent is outside


def test_non_utf8_code_file_is_caught(tmp_path):
    problems, _ = code_problems(tmp_path, "x.py", "# 한국어 주석\nX = 1\n", encoding="cp949")
    assert len(problems) == 1 and "not UTF-8" in problems[0]


def test_this_repository_passes_the_code_checks():
    problems, allowed = verify.check_code(common.ROOT)
    assert problems == []
    assert all("verify: allow" not in a for a in allowed)  # the listing names the place, not the pragma text


# ----------------------------------------------------------------------------- requirements and models
def test_requirements(tmp_path):
    good = "# comment\ntorch==2.13.0  # why\nfoo[bar]==1.0.0\nbaz==2.0 ; python_version < '3.12'\n" \
           "--extra-index-url https://download.example.org/whl\n"
    (tmp_path / "r.txt").write_text(good, encoding="utf-8")
    assert verify.check_requirements(tmp_path / "r.txt") == []
    bad = ["torch>=2.0", "numpy", "-e .", "./wheels/x-1.0-py3-none-any.whl", "pkg @ file:///opt/x.whl",
           "--find-links /opt/wheels", "-r other.txt", "foo==1.*", "--index-url file:///opt/pypi/simple"]
    (tmp_path / "r.txt").write_text("\n".join(bad) + "\n", encoding="utf-8")
    assert len(verify.check_requirements(tmp_path / "r.txt")) == len(bad)
    (tmp_path / "r.txt").write_bytes("torch==2.13.0  # 고정\n".encode("cp949"))
    assert "not UTF-8" in verify.check_requirements(tmp_path / "r.txt")[0]
    assert verify.check_requirements(tmp_path / "missing.txt")


def test_this_repository_requirements_are_pinned():
    assert verify.check_requirements(common.ROOT / "requirements.txt") == []


def test_model_checks(tmp_path):
    assert verify.check_models(tmp_path, ["models/m"])  # missing
    assert verify.check_models(tmp_path, ["Qwen/Qwen2.5-0.5B"])  # a hub id does not load offline
    m = tmp_path / "models" / "m"
    m.mkdir(parents=True)
    (m / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    assert verify.check_models(tmp_path, ["models/m"]) == []
    (m / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Y"}}), encoding="utf-8")
    (m / "generation_config.json").write_text(json.dumps({"do_sample": True}), encoding="utf-8")
    assert len(verify.check_models(tmp_path, ["models/m"])) == 2


# ----------------------------------------------------------------------------- reproduction helpers
def test_tiny_question_set_has_both_kinds_in_file_order():
    rows = [dict(ID=i, Question=q) for i, q in QUESTIONS]
    tiny = verify.tiny_question_set(rows, 3)
    assert [r["ID"] for r in tiny] == ["Q1", "Q2", "Q3"]
    assert [r["ID"] for r in verify.tiny_question_set(rows, 4)] == ["Q1", "Q2", "Q3", "Q5"]


def test_compare_submissions():
    questions = [competition.parse_question(i, q) for i, q in QUESTIONS]
    assert verify.compare_submissions(GOOD, list(GOOD), questions) == ([], dict(mc=3, mc_same=3, desc=2, desc_same=2))
    changed = [("Q1", "3")] + GOOD[1:4] + [("Q5", "다른 답")]
    problems, counts = verify.compare_submissions(GOOD, changed, questions)
    assert counts["mc_same"] == 2 and counts["desc_same"] == 1
    assert any("Q1: multiple-choice" in p for p in problems) and any("Q5: descriptive" in p for p in problems)
    assert verify.compare_submissions(GOOD, GOOD[:-1], questions)[0]


def test_dirty_tree_is_detected(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert verify.dirty_files(tmp_path) == []
    (tmp_path / "new.py").write_text("x = 1\n", encoding="utf-8")
    assert verify.dirty_files(tmp_path) == ["?? new.py"]


def test_clone_env_is_offline_and_drops_make_state(monkeypatch, tmp_path):
    monkeypatch.setenv("MAKEFLAGS", "-n")
    env = verify.clone_env(tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["FSKU_SHARED"] == str(tmp_path.resolve())
    assert "MAKEFLAGS" not in env


# ----------------------------------------------------------------------------- REPORT.md
BASELINE_MD = """# Baseline: no retrieval

## Summary

| run | score | MC accuracy | descriptive | s/question |
|---|---|---|---|---|
| student | 0.210 | 0.248 | 0.172 | 0.59 |
| teacher | 0.390 | 0.488 | 0.292 | 1.68 |

### student

| metric | value |
|---|---|
| peak RSS (GiB) | 2.10 |

## CPU dtype check (same model, first questions, multiple choice only)

Top-1 option agreement bfloat16 vs float32: **99.0%** over 100 questions.

## Setup times on this machine

| step | seconds |
|---|---|
| make setup (pip with a warm cache) | 67 |
"""
EVAL_MD = ("# Development-set evaluation\n\n## Summary\n\n| run | score | MC accuracy |\n|---|---|---|\n"
           "| 04_infer | 0.250 | 0.300 |\n")


def test_report_is_generated_from_the_stage_reports(tmp_path):
    (tmp_path / "baseline.md").write_text(BASELINE_MD, encoding="utf-8")
    (tmp_path / "eval.md").write_text(EVAL_MD, encoding="utf-8")
    text = package.build_report(tmp_path)
    assert text == package.build_report(tmp_path)  # deterministic: no clock, no machine state
    for heading in ("## Method", "## Data and licences", "## Development scores per stage", "## Timings",
                    "## Quantization choice", "## How to reproduce"):
        assert heading in text
    assert "| student | 0.210 | 0.248 | 0.172 | 0.59 |" in text and "| 04_infer | 0.250 | 0.300 |" in text
    assert "| make setup (pip with a warm cache) | 67 |" in text  # timings section carried over
    assert "**99.0%**" in text.split("## Quantization choice")[1]  # no quantize.md: the dtype check stands in
    assert "저작권법 제7조" in text and "Apache-2.0" in text and "MIT" in text
    assert "`retrieval.md`" in text.split("## Data and licences")[0]  # listed as not run yet
    assert "#### Summary" in text  # stage reports embedded with their headings pushed down
    assert "`04_infer.py`" in text  # method from the scripts' docstrings


def test_report_takes_the_quantization_choice_from_quantize_md(tmp_path):
    (tmp_path / "quantize.md").write_text("# Quantization\n\n## Choice\n\nbnb int8: 0.95 agreement.\n\n## Other\nx\n",
                                          encoding="utf-8")
    text = package.build_report(tmp_path)
    assert "bnb int8: 0.95 agreement." in text.split("## Quantization choice")[1].split("## How")[0]


def test_section_and_table_helpers():
    assert package.section_text(BASELINE_MD, package.DTYPE_HEADING)[1].startswith("Top-1")
    assert package.section_text(BASELINE_MD, package.QUANT_HEADING) is None
    assert package.score_table(BASELINE_MD)[0].startswith("| run | score")
    assert package.demote("# A\n```\n# not a heading\n```\n## B", 2) == "### A\n```\n# not a heading\n```\n#### B"


# ----------------------------------------------------------------------------- package
def test_package_is_built_and_passes_its_checks(tmp_path, monkeypatch, tiny_model_dir):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("common.py", "requirements.txt", "06_verify.py", "06_package.py", "inference.py"):
        shutil.copy2(common.ROOT / name, repo / name)
    (repo / "reports").mkdir()
    (repo / "reports" / "REPORT.md").write_text("# report\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    shutil.copytree(tiny_model_dir, repo / "models" / "student-base")
    (repo / "data" / "corpus" / "laws").mkdir(parents=True)
    (repo / "data" / "corpus" / "laws" / "a.md").write_text("##### 제1조 (목적)\n", encoding="utf-8")
    (repo / "outputs" / "02_index").mkdir(parents=True)
    (repo / "outputs" / "02_index" / "DONE").write_text("", encoding="utf-8")
    for name, value in (("ROOT", repo), ("CORPUS", repo / "data" / "corpus"), ("DATA", repo / "data"),
                        ("REPORTS", repo / "reports"), ("INDEX", repo / "outputs" / "02_index"),
                        ("STUDENT_MODEL", "models/student-base"), ("DISTILLED_MERGED", repo / "models" / "distilled"),
                        ("FINAL", repo / "models" / "final")):
        monkeypatch.setattr(common, name, value, raising=False)
    dest = tmp_path / "dist" / "pkg"
    meta = package.build_package(dest)
    assert meta["model"] == "models/student-base" and meta["artifacts"] == ["outputs/02_index"]
    for rel in ("inference.py", "common.py", "requirements.txt", "reports/REPORT.md", "DATA_LICENSES.md",
                "corpus/laws/a.md", "models/student-base/config.json", "outputs/02_index/DONE", "MANIFEST.sha256"):
        assert (dest / rel).exists(), rel
    assert not (dest / ".git").exists() and (dest / "data").is_dir()
    problems, _ = verify.check_all(dest, require_submission=False)
    assert problems == []
    (dest / "bad.py").write_text('X = "/work/main/data"\n', encoding="utf-8")
    assert verify.check_all(dest, require_submission=False)[0]


# ----------------------------------------------------------------------------- reproduction flow on a fake pipeline
FAKE_MAKEFILE = """\
SHELL := bash
.PHONY: setup student data submission
setup:
	touch setup-ran
student:
	mkdir -p models/student-base && echo '{"model_type": "qwen2"}' > models/student-base/config.json
data:
	mkdir -p data/prepared && cp data/test.csv data/prepared/questions.csv
	cp data/sample_submission.csv data/prepared/sample_submission.csv
submission:
	python3 -c "$$ANSWER" $(MODEL_WHEELS)
"""
FAKE_ANSWER = """\
import csv, os, sys
rows = list(csv.DictReader(open("data/prepared/questions.csv", encoding="utf-8")))
mc = "2" if len(sys.argv) > 1 and os.environ.get("FAKE_DRIFT") else "1"
os.makedirs("outputs/04_infer", exist_ok=True)
with open("outputs/04_infer/submission.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["ID", "Answer"])
    w.writerows([(r["ID"], mc if chr(10) + "1 " in r["Question"] else "설명") for r in rows])
"""


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A committed repo whose make targets fake the pipeline in milliseconds; common points at it."""
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    (repo / "Makefile").write_text(FAKE_MAKEFILE, encoding="utf-8")
    (repo / "requirements.txt").write_text("numpy==2.2.6\n", encoding="utf-8")
    (repo / "reports" / "REPORT.md").write_text("# report\n", encoding="utf-8")
    (repo / ".gitignore").write_text("data/\nmodels/\noutputs/\nsetup-ran\nsubmission.csv\n", encoding="utf-8")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "models" / "student-base").mkdir(parents=True)
    (repo / "models" / "student-base" / "DONE").touch()
    (repo / "data" / "prepared").mkdir(parents=True)
    write_csv(repo / "data" / "prepared" / "q.csv", ["ID", "Question"], QUESTIONS)
    for name, value in (("ROOT", repo), ("MODELS", repo / "models"), ("QUESTIONS", repo / "data" / "prepared" / "q.csv"),
                        ("STUDENT_MODEL", "models/student-base"), ("INDEX", repo / "outputs" / "02_index"),
                        ("DISTILLED_MERGED", repo / "models" / "distilled"), ("FINAL", repo / "models" / "final")):
        monkeypatch.setattr(common, name, value)
    monkeypatch.setattr(verify, "VERIFY_OUT", tmp_path / "out")
    monkeypatch.setenv("ANSWER", FAKE_ANSWER)
    return repo


def test_reproduce_flow_passes_on_a_deterministic_pipeline(fake_repo, tmp_path):
    (fake_repo / "outputs" / "02_index").mkdir(parents=True)
    (fake_repo / "outputs" / "02_index" / "chunks.jsonl").write_text("{}\n", encoding="utf-8")
    (fake_repo / "outputs" / "02_index" / "DONE").touch()
    problems, meta = verify.reproduce(4, tmp_path / "work", tmp_path, tmp_path)
    assert problems == [], problems
    assert meta["reused"] == ["outputs/02_index"]  # tiny profile: the index is passed in, not rebuilt
    assert (tmp_path / "work" / "fresh" / "outputs" / "02_index" / "chunks.jsonl").is_file()
    assert (tmp_path / "work" / "reference" / "outputs" / "02_index").is_symlink()
    assert meta["counts"] == dict(mc=2, mc_same=2, desc=2, desc_same=2)
    assert set(meta["seconds"]) >= {"clone", "setup", "student", "data", "submission", "reference", "total"}
    assert (tmp_path / "work" / "fresh" / "setup-ran").exists()  # the fresh clone built its own environment
    assert not (tmp_path / "work" / "reference" / "setup-ran").exists()  # the reference reused this checkout's
    assert "| multiple-choice answers identical | 2 / 2 |" in verify.verify_report(meta)


def test_reproduce_flow_reports_a_drifting_answer(fake_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DRIFT", "1")  # only the fresh clone gets MODEL_WHEELS, so only its answers change
    problems, meta = verify.reproduce(4, tmp_path / "work", tmp_path, tmp_path)
    assert meta["counts"]["mc_same"] == 0 and len([p for p in problems if "multiple-choice" in p]) == 2


def test_reproduce_flow_stops_at_a_failing_step(fake_repo, tmp_path):
    (fake_repo / "Makefile").write_text(FAKE_MAKEFILE.replace("touch setup-ran", "exit 3"), encoding="utf-8")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "y"], cwd=fake_repo,
                   check=True)
    problems, meta = verify.reproduce(4, tmp_path / "work", tmp_path, tmp_path)
    assert len(problems) == 1 and "`make setup` failed" in problems[0] and "setup" in meta["seconds"]


def test_inference_entry_point_steps(tmp_path, monkeypatch):
    inference = importlib.import_module("inference")
    assert [s[0] for s in inference.STEPS][-1] == "04_infer.py"
    assert "--corpus-src" not in inference.step_command(["prepare_data.py"]) or inference.PACKAGE_CORPUS.is_dir()
    monkeypatch.setattr(inference, "PACKAGE_CORPUS", tmp_path)
    command = inference.step_command(["prepare_data.py"])
    assert command[-2:] == ["--corpus-src", str(tmp_path)] and "python" in Path(command[0]).name
    problems, _ = verify.check_code(common.ROOT, [common.ROOT.joinpath("inference.py").relative_to(common.ROOT)])
    assert problems == []


# ----------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_make_verify_tiny_profile():
    """`make verify VERIFY_LIMIT=3`: clone, fresh venv, student from the wheel cache, answers compared."""
    if verify.dirty_files(common.ROOT):
        pytest.skip("make verify refuses a dirty tree; commit first")
    if not list(common.WHEELS.glob("*.whl")) or not common.QUESTIONS.exists():
        pytest.skip("needs `make student` (wheel cache) and `make data`")
    if not (common.INDEX / "DONE").exists():
        pytest.skip("needs `make index`: the tiny profile reuses the index instead of embedding the corpus twice")
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-C", str(common.ROOT), "verify", "VERIFY_LIMIT=3"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((verify.VERIFY_OUT / "meta.json").read_text(encoding="utf-8"))
    assert meta["counts"]["mc"] + meta["counts"]["desc"] == 3 and meta["problems"] == []
    print(f"make verify VERIFY_LIMIT=3: {time.time() - t0:.0f} s")

