"""06_verify.py and inference.py: every check is fed a deliberately broken input and a passing one; a package built
from a tiny checkout (tiny random model) answers from a moved copy, offline, without ../shared, and a planted
absolute path breaks that run; REPORT.md from sample reports; the reproduction flow on a fake pipeline. No network,
no real weights (the slow test at the end runs the tiny `make verify` profile with the real student)."""
import ast
import csv
import importlib
import json
import os
import shutil
import subprocess
import time

import pytest

import common
import competition
from conftest import build_tiny_model

verify = importlib.import_module("06_verify")
inference = importlib.import_module("inference")

QUESTIONS = [
    ("Q1", "다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라"),
    ("Q2", "전자금융거래법상 접근매체가 아닌 것은?\n1 전자식 카드\n2 비밀번호\n3 공인인증서\n4 계좌번호\n5 생체정보"),
    ("Q3", "개인정보 보호법의 목적을 설명하세요."),
    ("Q4", "다음 중 틀린 것은?\n1 가\n2 나\n3 다\n4 라"),
    ("Q5", "정보보호 관리체계의 의미를 서술하시오."),
]
GOOD = [("Q1", "2"), ("Q2", "5"), ("Q3", "개인정보의 처리와 보호에 관한 사항을 정합니다."), ("Q4", "1"),
        ("Q5", "관리적·기술적 보호조치의 체계입니다.")]
GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t"]


def write_csv(path, header, rows, encoding="utf-8", newline="\r\n"):
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.writer(f, lineterminator=newline)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    """questions.csv, sample_submission.csv and the path of submission.csv in tmp_path."""
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


def test_wrong_order_missing_unknown_and_repeated_rows_are_caught(files):
    assert check(files, [GOOD[1], GOOD[0]] + GOOD[2:])
    assert any("Q5" in p for p in check(files, GOOD[:-1]))
    assert any("Q9" in p for p in check(files, GOOD + [("Q9", "1")]))
    assert check(files, GOOD[:2] + [GOOD[1]] + GOOD[2:])


def test_empty_nan_and_out_of_range_answers_are_caught(files):
    problems = check(files, [("Q1", "5"), GOOD[1], ("Q3", "  "), ("Q4", "1.0"), ("Q5", "NaN")])
    assert "Q3: empty answer" in problems and "Q5: empty answer" in problems
    assert any(p.startswith("Q1:") and "1-4" in p for p in problems) and any(p.startswith("Q4:") for p in problems)
    assert not any(p.startswith("Q2:") for p in problems)  # Q2 has five options


def test_bad_header_non_utf8_and_missing_files_are_one_problem_each(files, tmp_path):
    q, s, sub = files
    write_csv(sub, ["id", "answer"], GOOD)
    assert len(verify.check_submission(sub, q, s)) == 1
    assert len(check(files, GOOD, encoding="cp949")) == 1
    assert len(verify.check_submission(tmp_path / "absent.csv", q, s)) == 1


def test_sample_submission_order_mismatch(files):
    q, s, sub = files
    write_csv(s, ["ID", "Answer"], [(i, "") for i, _ in reversed(QUESTIONS)])
    write_csv(sub, ["ID", "Answer"], GOOD)
    assert any("sample_submission" in p for p in verify.check_submission(sub, q, s))


# ----------------------------------------------------------------------------- pins, remote code, model files
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
    (tmp_path / "r.txt").write_text("# nothing\n", encoding="utf-8")
    assert verify.check_requirements(tmp_path / "r.txt")


def test_this_repository_requirements_are_pinned():
    assert verify.check_requirements(common.ROOT / "requirements.txt") == []


@pytest.mark.parametrize("line, bad", [("m = f(x, trust_remote_code=True)", True),
                                       ("m = f(x, trust_remote_code = flag)", True),
                                       ("kw = {'trust_remote_code': True}", True),
                                       ("m = f(x, trust_remote_code=False)", False),
                                       ("# trust_remote_code stays off", False)])
def test_trust_remote_code_is_caught(tmp_path, line, bad):
    (tmp_path / "x.py").write_text(f"import f\n{line}\n", encoding="utf-8")
    problems = verify.check_remote_code(tmp_path)
    assert bool(problems) == bad and all(p.startswith("x.py:2:") for p in problems)


def test_this_repository_passes_the_remote_code_check():
    assert verify.check_remote_code(common.ROOT) == []


def test_model_checks(tmp_path, tiny_model_dir):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_model_dir, model)
    assert verify.check_model(tmp_path, "models/m") == []
    assert verify.check_model(tmp_path, "models/absent")
    assert verify.check_model(tmp_path, "Qwen/Qwen2.5-0.5B")  # a hub id does not load offline
    assert verify.check_model(tmp_path, str(model))  # an absolute path is outside the package
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps(dict(config, auto_map={"AutoModel": "x.Y"})), encoding="utf-8")
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True}), encoding="utf-8")
    (model / "model.safetensors").unlink()
    (model / "tokenizer.json").unlink()
    problems = verify.check_model(tmp_path, "models/m")
    assert len(problems) == 4
    assert [w in " ".join(problems) for w in ("own code", "do_sample", "weight files", "tokenizer")] == [True] * 4


def test_sharded_weights_must_all_be_there(tmp_path, tiny_model_dir):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_model_dir, model)
    shard_map = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(shard_map), encoding="utf-8")
    assert any("model-00001-of-00002" in p for p in verify.check_model(tmp_path, "models/m"))


# ----------------------------------------------------------------------------- the moved run (fake packages)
ANSWER_FROM_OWN_FOLDER = """\
import csv, pathlib
here = pathlib.Path(__file__).resolve().parent
rows = list(csv.DictReader(open(DATA / "test.csv", encoding="utf-8")))
with open(here / "submission.csv", "w", encoding="utf-8", newline="") as f:
    csv.writer(f).writerows([("ID", "Answer")] + [(r["ID"], ANSWER) for r in rows])
"""


def fake_package(folder, data="here / 'data'", answer="'1' if chr(10) + '1 ' in r['Question'] else '설명'",
                 prelude=""):
    """A package whose inference.py answers data/test.csv in milliseconds: `data` is the expression of its data
    folder, `answer` of each answer, `prelude` runs first."""
    folder.mkdir(parents=True)
    body = ANSWER_FROM_OWN_FOLDER.replace("DATA", f"({data})").replace("ANSWER", f"({answer})")
    (folder / "inference.py").write_text(prelude + body, encoding="utf-8")
    (folder / "data").mkdir()
    return folder


def test_a_package_with_relative_paths_runs_moved_and_is_put_back(tmp_path):
    package = fake_package(tmp_path / "dist" / "pkg")
    before = sorted(p.relative_to(package) for p in package.rglob("*"))
    assert verify.run_moved(package) == []
    assert sorted(p.relative_to(package) for p in package.rglob("*")) == before  # nothing of the run stays
    assert sorted(p.name for p in package.parent.iterdir()) == ["pkg"]  # the temporary folders are gone


def test_an_absolute_path_to_where_the_package_was_built_fails(tmp_path):
    package = fake_package(tmp_path / "dist" / "pkg", data=f"pathlib.Path({str(tmp_path / 'dist' / 'pkg')!r}) / 'data'")
    problems = verify.run_moved(package)
    assert len(problems) == 1 and "failed" in problems[0] and "test.csv" in problems[0]
    assert (package / "inference.py").exists()  # put back after a failed run too


def test_a_path_beside_the_package_or_relative_to_the_working_folder_fails(tmp_path):
    beside = tmp_path / "dist" / "shared"  # ../shared exists beside the built package, not beside the moved copy
    beside.mkdir(parents=True)
    write_csv(beside / "test.csv", ["ID", "Question"], QUESTIONS)
    assert verify.run_moved(fake_package(tmp_path / "dist" / "a", data="here.parent / 'shared'"))
    assert verify.run_moved(fake_package(tmp_path / "dist" / "b", data="pathlib.Path('data')"))


def test_the_run_is_offline_without_shared_data_and_without_the_callers_model_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("FSKU_STUDENT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    prelude = ("import os, pathlib\nenv = os.environ\n"
               "assert env['HF_HUB_OFFLINE'] == env['TRANSFORMERS_OFFLINE'] == '1', 'online'\n"
               "assert not pathlib.Path(env['FSKU_SHARED']).exists(), 'shared data reachable'\n"
               "assert 'FSKU_STUDENT' not in env and 'HF_HUB_CACHE' not in env, 'caller settings leak'\n"
               "assert not any(pathlib.Path(env['HF_HOME']).glob('*')), 'a hub cache'\n")
    assert verify.run_moved(fake_package(tmp_path / "dist" / "pkg", prelude=prelude)) == []


def test_an_invalid_submission_of_the_moved_run_is_reported(tmp_path):
    problems = verify.run_moved(fake_package(tmp_path / "dist" / "pkg", answer="'9'"))
    assert problems and all("not an option number" in p or "empty" in p for p in problems)


# ----------------------------------------------------------------------------- a real package from a tiny checkout
@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A committed checkout holding this repository's top-level code, LICENSE and requirements, a tiny random model
    as models/student-base and a one-law corpus copy."""
    repo = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files"], cwd=common.ROOT, capture_output=True, text=True, check=True).stdout
    names = [n for n in listed.split() if "/" not in n and n.endswith(".py")] + ["requirements.txt", "LICENSE"]
    for name in names:
        if (common.ROOT / name).exists():
            shutil.copy2(common.ROOT / name, repo / name)
    for args in (["init", "-q"], ["add", "."], [*GIT_ID, "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    build_tiny_model(repo / "models" / "student-base")
    laws = repo / "data" / "corpus" / "laws"
    laws.mkdir(parents=True)
    (laws / "a.md").write_text("# 테스트법\n\n##### 제1조 (목적)\n이 법은 전자금융거래의 안전성을 확보한다.\n", encoding="utf-8")
    return repo


@pytest.fixture(scope="module")
def package(checkout, tmp_path_factory):
    """The package of the tiny checkout, built once; tests that break it work on a hard-linked copy."""
    dest = tmp_path_factory.mktemp("dist") / "pkg"
    verify.assemble(dest, root=checkout)
    return dest


def broken_copy(package, tmp_path):
    copy = tmp_path / "dist" / package.name
    shutil.copytree(package, copy, copy_function=os.link)
    return copy


def test_the_package_ships_what_inference_needs(package):
    for rel in ("inference.py", "common.py", "04_infer.py", "requirements.txt", "LICENSE", "DATA_LICENSES.md",
                "corpus/laws/a.md", "models/student-base/config.json", "models/student-base/model.safetensors",
                "MANIFEST.sha256", "meta.json"):
        assert (package / rel).is_file(), rel
    assert not (package / "outputs").exists()  # no passages: no index
    assert (package / "data").is_dir() and not any((package / "data").iterdir()) and not (package / ".git").exists()
    note = (package / "DATA_LICENSES.md").read_text(encoding="utf-8")
    assert "MIT (`LICENSE`)" in note and "not chosen" not in note and "Apache-2.0" in note
    meta = json.loads((package / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"] == "models/student-base" and meta["folders"] == ["models/student-base"]


def test_the_package_runs_moved_offline_and_answers_validly(package):
    t0 = time.time()
    assert verify.package_checks(package, "models/student-base") == []
    print(f"moved tiny package: {time.time() - t0:.1f} s")
    assert not (package / "submission.csv").exists()


def test_an_absolute_path_in_the_package_code_breaks_the_run(package, tmp_path):
    copy = broken_copy(package, tmp_path)
    text = (copy / "common.py").read_text(encoding="utf-8")
    assert "ROOT = Path(__file__).resolve().parent\n" in text
    (copy / "common.py").unlink()  # a hard link: write a new file, never into the shared one
    (copy / "common.py").write_text(text.replace("ROOT = Path(__file__).resolve().parent\n",
                                                 f"ROOT = Path({str(copy)!r})\n"), encoding="utf-8")
    problems = verify.run_moved(copy)
    assert len(problems) == 1 and "failed" in problems[0]


def test_a_package_that_needs_the_shared_folder_beside_it_fails(package, tmp_path):
    copy = broken_copy(package, tmp_path)
    shutil.copytree(copy / "corpus", tmp_path / "dist" / "shared" / "corpus")  # ../shared of the built package
    shutil.rmtree(copy / "corpus")
    problems = verify.run_moved(copy)
    assert len(problems) == 1 and "corpus" in problems[0]


def test_the_index_ships_only_when_the_answers_use_passages(checkout, tmp_path):
    selection = checkout / "selection.json"
    index = checkout / "outputs" / "02_index"
    try:
        selection.write_text(json.dumps({"config": {"passages": 3}}), encoding="utf-8")
        with pytest.raises(SystemExit, match="make index"):
            verify.assemble(tmp_path / "pkg", root=checkout)
        index.mkdir(parents=True)
        (index / "chunks.jsonl").write_text("{}\n", encoding="utf-8")
        (index / "DONE").touch()
        meta = verify.assemble(tmp_path / "pkg", root=checkout)
        assert meta["folders"] == ["models/student-base", "outputs/02_index"]
        assert (tmp_path / "pkg" / "outputs" / "02_index" / "DONE").exists()
        assert json.loads((tmp_path / "pkg" / "selection.json").read_text(encoding="utf-8"))["config"]["passages"] == 3
    finally:
        selection.unlink()
        shutil.rmtree(checkout / "outputs", ignore_errors=True)


def test_packaging_says_what_to_run_when_a_part_is_missing(checkout, tmp_path):
    (checkout / "selection.json").write_text(json.dumps({"config": {"candidate": "teacher"}}), encoding="utf-8")
    try:
        with pytest.raises(SystemExit, match="make teacher"):
            verify.assemble(tmp_path / "pkg", root=checkout)
    finally:
        (checkout / "selection.json").unlink()


# ----------------------------------------------------------------------------- inference.py and the import rule
def test_inference_steps(tmp_path):
    names = lambda plan: [s[0] for s in plan]
    assert names(inference.steps(0, False, tmp_path / "absent")) == ["prepare_data.py", "04_infer.py"]
    assert inference.steps(0, False, tmp_path)[0] == ["prepare_data.py", "--corpus-src", str(tmp_path)]
    assert names(inference.steps(3, True, tmp_path))[1:] == ["03_rerank.py", "04_infer.py"]
    assert names(inference.steps(3, False, tmp_path))[1:] == ["02_build_index.py", "03_rerank.py", "04_infer.py"]


@pytest.mark.parametrize("name", ["06_verify.py", "inference.py"])
def test_no_numbered_script_is_imported(name):
    tree = ast.parse((common.ROOT / name).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "")
                 == "import_module" and isinstance(n.args[0], ast.Constant)]
    assert not [m for m in imported if m[:2].isdigit()]


# ----------------------------------------------------------------------------- REPORT.md
SELECTION = {"config": {"candidate": "student", "level": "bnb-nf4", "calibration": "batch", "passages": 0},
             "figures": {"score": 0.4041, "mc_acc": 0.4016, "desc_score": 0.4066, "projected_s": 2100.0,
                         "budget_s": 2700.0}, "device": "cpu", "date": "2026-11-30"}


def test_report_links_the_stage_reports_that_exist(tmp_path):
    for name, text in (("baseline.md", "# Baseline\n"), ("eval.md", "# Eval\n"), ("REPORT.md", "# old\n"),
                       ("extra.md", "intro\n\n## An extra study\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "selection.json").write_text(json.dumps(SELECTION), encoding="utf-8")
    text = verify.report_text(tmp_path, tmp_path / "selection.json")
    assert text == verify.report_text(tmp_path, tmp_path / "selection.json")  # deterministic
    links = [line for line in text.splitlines() if line.startswith("- [")]
    assert [line.split("]")[0][3:] for line in links] == ["eval.md", "baseline.md", "extra.md"]  # pipeline order
    assert links[1] == f"- [baseline.md](baseline.md): {verify.STAGES['baseline.md']}"
    assert links[2].endswith(": An extra study")  # a report the list does not know: its title
    assert "score 0.404 (multiple choice 0.402, descriptive 0.407)" in text and "35 min" in text
    assert "level `bnb-nf4`" in text and "`models/student-base`" in text and len(text.splitlines()) < 30


def test_report_without_a_selection_says_so(tmp_path):
    text = verify.report_text(tmp_path, tmp_path / "selection.json")
    assert "no `selection.json` yet" in text and "- [" not in text


# ----------------------------------------------------------------------------- reproduction flow on a fake pipeline
def test_tiny_question_set_has_both_kinds_in_file_order():
    rows = [dict(ID=i, Question=q) for i, q in QUESTIONS]
    assert [r["ID"] for r in verify.tiny_question_set(rows, 3)] == ["Q1", "Q2", "Q3"]
    assert [r["ID"] for r in verify.tiny_question_set(rows, 4)] == ["Q1", "Q2", "Q3", "Q5"]


def test_compare_submissions():
    questions = [competition.parse_question(i, q) for i, q in QUESTIONS]
    identical = dict(mc=3, mc_same=3, mc_timed=0, desc=2, desc_same=2)
    assert verify.compare_submissions(GOOD, list(GOOD), questions) == ([], identical)
    changed = [("Q1", "3")] + GOOD[1:4] + [("Q5", "다른 답")]
    problems, counts = verify.compare_submissions(GOOD, changed, questions)
    assert counts["mc_same"] == 2 and counts["desc_same"] == 1
    assert any("Q1: multiple-choice" in p for p in problems) and any("Q5: descriptive" in p for p in problems)
    assert verify.compare_submissions(GOOD, GOOD[:-1], questions)[0]
    # a question only one run asked again with passages (its own measured budget) may differ; the others may not
    problems, counts = verify.compare_submissions(GOOD, changed, questions, timed=frozenset({"Q1", "Q5"}))
    assert counts["mc_timed"] == 1 and counts["mc_same"] == 2
    assert not any("Q1:" in p for p in problems) and any("Q5: descriptive" in p for p in problems)


def write_run(folder, budget, asked):
    folder.mkdir(parents=True)
    common.write_json(folder / "meta.json", dict(cascade_budget=budget))
    records = [dict(id=f"Q{i}", kind="mc", **(dict(cascade="plain") if i in asked else {})) for i in range(1, 5)]
    (folder / "predictions-groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


def test_budget_decided_names_the_questions_only_one_budgeted_run_asked_again(tmp_path):
    budget = dict(budget_s=2700.0, unsure=4, asked=2)
    ref, fresh = write_run(tmp_path / "ref", budget, {1, 2}), write_run(tmp_path / "fresh", budget, {1, 2, 3})
    assert verify.budget_decided(ref, fresh) == (dict(reference=2, fresh=3), frozenset({"Q3"}))
    unbudgeted = write_run(tmp_path / "all", None, {1, 2, 3})  # every unsure question fitted: answers must match
    assert verify.budget_decided(ref, unbudgeted) == ({}, frozenset())
    assert verify.budget_decided(ref, tmp_path / "missing") == ({}, frozenset())
    rows = verify.budget_rows(dict(reference=2, fresh=3), 1)
    assert "| 2 / 3 |" in rows[0] and rows[1].endswith("| 1 |") and verify.budget_rows({}, 0) == []


def test_dirty_tree_is_detected(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert verify.dirty_files(tmp_path) == []
    (tmp_path / "new.py").write_text("x = 1\n", encoding="utf-8")
    assert verify.dirty_files(tmp_path) == ["?? new.py"]


def test_child_env_is_offline_and_drops_make_state(monkeypatch, tmp_path):
    monkeypatch.setenv("MAKEFLAGS", "-n")
    env = verify.child_env(tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["FSKU_SHARED"] == str(tmp_path)
    assert "MAKEFLAGS" not in env


FAKE_MAKEFILE = """\
SHELL := bash
.PHONY: setup student data submission
setup:
	touch setup-ran
student:
	mkdir -p models/student-base && echo '{"model_type": "qwen2"}' > models/student-base/config.json
	touch models/student-base/model.safetensors models/student-base/tokenizer.json
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
if "FAKE_ASKED" in os.environ:  # a budgeted cascade (04's meta.json and records) that asked these ids again
    import json
    asked = os.environ["FAKE_ASKED"].split(",")
    json.dump(dict(cascade_budget=dict(asked=len(asked))), open("outputs/04_infer/meta.json", "w"))
    with open("outputs/04_infer/predictions-groups.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(id=r["ID"], cascade="passages") if r["ID"] in asked else dict(id=r["ID"]))
                     + chr(10) for r in rows)
"""


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A committed repo whose make targets fake the pipeline in milliseconds; common points at it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Makefile").write_text(FAKE_MAKEFILE, encoding="utf-8")
    (repo / "requirements.txt").write_text("numpy==2.2.6\n", encoding="utf-8")
    (repo / ".gitignore").write_text("data/\nmodels/\noutputs/\nsetup-ran\n", encoding="utf-8")
    for args in (["init", "-q"], ["add", "."], [*GIT_ID, "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "models" / "student-base").mkdir(parents=True)
    (repo / "models" / "student-base" / "DONE").touch()
    (repo / "data" / "prepared").mkdir(parents=True)
    write_csv(repo / "data" / "prepared" / "q.csv", ["ID", "Question"], QUESTIONS)
    models = repo / "models"
    for name, value in (("ROOT", repo), ("MODELS", models), ("QUESTIONS", repo / "data" / "prepared" / "q.csv"),
                        ("STUDENT_MODEL", "models/student-base"), ("STUDENT_BASE", models / "student-base"),
                        ("TEACHER_BASE", models / "teacher-base"), ("DISTILLED", models / "student-distilled"),
                        ("DISTILLED_MERGED", models / "student-distilled-merged"),
                        ("INDEX", repo / "outputs" / "02_index"), ("SELECTION", repo / "selection.json")):
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
    assert meta["counts"] == dict(mc=2, mc_same=2, mc_timed=0, desc=2, desc_same=2) and meta["asked_again"] == {}
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
    subprocess.run(["git", *GIT_ID, "commit", "-qam", "y"], cwd=fake_repo, check=True)
    problems, meta = verify.reproduce(4, tmp_path / "work", tmp_path, tmp_path)
    assert len(problems) == 1 and "`make setup` failed" in problems[0] and "setup" in meta["seconds"]


def test_full_profile_compares_with_this_checkouts_budgeted_cascade(fake_repo, tmp_path, monkeypatch):
    """`make verify` (VERIFY_LIMIT=0): the fresh clone answers this checkout's data/test.csv; the reference is this
    checkout's submission.csv with its 04 records in outputs/04_infer. A multiple-choice answer that differs on a
    question only one budgeted run asked again is counted apart; one that differs elsewhere is a problem."""
    verify.write_question_set([dict(ID=i, Question=q) for i, q in QUESTIONS], fake_repo / "data")
    infer = fake_repo / "outputs" / "04_infer"
    for name, value in (("USER_TEST", fake_repo / "data" / "test.csv"), ("SUBMISSION", fake_repo / "submission.csv"),
                        ("USER_SAMPLE", fake_repo / "data" / "sample_submission.csv"), ("INFER", infer)):
        monkeypatch.setattr(common, name, value)
    monkeypatch.setenv("FAKE_ASKED", "Q4")  # the fresh clone's cascade asks Q4 again, and answers "1" everywhere
    infer.mkdir(parents=True)
    (infer / "meta.json").write_text(json.dumps(dict(cascade_budget=dict(asked=2))), encoding="utf-8")
    (infer / "predictions-groups.jsonl").write_text("".join(json.dumps(dict(id=i, cascade="passages")) + "\n"
                                                            for i in ("Q1", "Q4")), encoding="utf-8")

    def reference(answers):
        common.write_csv(common.SUBMISSION, ["ID", "Answer"],
                         [dict(ID=i, Answer=answers.get(i, "1" if "\n1 " in q else "설명")) for i, q in QUESTIONS])

    reference({"Q1": "2"})  # Q1: asked again by this checkout's run only
    problems, meta = verify.reproduce(0, tmp_path / "work", tmp_path, tmp_path)
    assert problems == [], problems
    assert meta["counts"] == dict(mc=3, mc_same=2, mc_timed=1, desc=2, desc_same=2)
    assert meta["asked_again"] == dict(reference=2, fresh=1)
    reference({"Q4": "2"})  # Q4: asked again by both runs, so its answer must match
    problems, meta = verify.reproduce(0, tmp_path / "work2", tmp_path, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("Q4: multiple-choice answer differs"), problems
    assert meta["counts"]["mc_timed"] == 0


# ----------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_make_verify_tiny_profile():
    """`make verify VERIFY_LIMIT=3`: clone, fresh venv, the answering model from the wheel cache, answers compared."""
    if verify.dirty_files(common.ROOT):
        pytest.skip("make verify refuses a dirty tree; commit first")
    if not list(common.WHEELS.glob("*.whl")) or not common.QUESTIONS.exists():
        pytest.skip("needs `make student` (wheel cache) and `make data`")
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-C", str(common.ROOT), "verify", "VERIFY_LIMIT=3"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((verify.VERIFY_OUT / "meta.json").read_text(encoding="utf-8"))
    assert meta["counts"]["mc"] + meta["counts"]["desc"] == 3 and meta["problems"] == []
    print(f"make verify VERIFY_LIMIT=3: {time.time() - t0:.0f} s")
