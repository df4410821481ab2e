"""Check the submission, the code and the requirements; reproduce the submission in a fresh clone.

Check mode (default): reads submission.csv, data/prepared/{questions.csv,sample_submission.csv},
requirements.txt, the code and reports/REPORT.md of this checkout, or of a package folder with --package DIR
(`make package` runs that), and writes nothing. Every problem is listed, then the exit code is 1.
With --reproduce (`make verify`, tiny profile `make verify VERIFY_LIMIT=5`): refuses a dirty tree, clones HEAD into
a temporary folder, builds a fresh venv there from requirements.txt, runs `make setup student data submission`
with the hub offline (the shared data folder and the model wheel cache of this checkout passed in, nothing
fetched again), compares the answers with this checkout's run on the same questions, runs every check on the
clone and prints the time taken. Writes outputs/06_verify/ (logs, meta.json, verify.md) and, for the full
profile only, reports/verify.md.
"""
import argparse
import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import competition

# ----------------------------------------------------------------------------- settings
CODE_SUFFIXES = {".py", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
CODE_NAMES = {"Makefile", "run"}  # run: .ci/run
TEXT_SUFFIXES = CODE_SUFFIXES | {".md", ".txt", ".csv", ".tsv", ".json", ".jinja"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "models", "data", "outputs", "dist", "corpus"}
PATH_SCAN_SKIP = {"tests"}  # tests plant broken paths on purpose and write only under tmp_path
SYSTEM_PATHS = ("/proc/", "/sys/", "/dev/")  # kernel interfaces (memory readings, /dev/null), not files to ship
ALLOW_PRAGMA = "verify: allow"  # a line carrying this comment may name a path outside the package (listed as a note)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
FRESH_STEPS = ["setup", "student", "data", "submission"]  # make targets run and timed one by one in the fresh clone
REFERENCE_STEPS = ["data", "submission"]  # this checkout's venv and models, the same questions (tiny profile)
RUN_SUBMISSION = "outputs/04_infer/submission.csv"  # written by every 04 run, also with a limited question set
# Tiny profile only: question-independent artifacts (common.py names) copied from this checkout into the fresh
# clone instead of rebuilt, so CI stays within minutes (the dense index alone is ~20 min of CPU, distillation hours).
# The full profile rebuilds everything `make submission` depends on. Per-question outputs (03_rerank) are never reused.
VERIFY_REUSE = ["INDEX", "DISTILLED_MERGED", "FINAL"]
VERIFY_OUT = common.OUTPUTS / "06_verify"
VERIFY_REPORT = common.REPORTS / "verify.md"  # full profile only: the tiny CI run does not touch tracked files
REPORT = Path("reports/REPORT.md")  # paths inside a checkout or package, relative to its root
SUBMISSION, QUESTIONS, SAMPLE = (p.relative_to(common.ROOT) for p in (common.SUBMISSION, common.QUESTIONS,
                                                                       common.SAMPLE))
LOG_TAIL = 25  # lines of a failed make step's log printed
# -----------------------------------------------------------------------------

ABS_UNIX_RE = re.compile(r"(?:^|(?<=[\s\"'=(,;\[]))(?:/[A-Za-z0-9_.~-]+)+/?")
ABS_OTHER_RE = re.compile(r"(?:^|(?<=[\s\"'=(,;\[]))(?:~/|[A-Za-z]:\\|file:/)")
PARENT_DIR_RE = re.compile(r"(?:^|(?<=[\s\"'=(,;/\\]))\.\.(?=[/\\]|$|[\s\"')])")
SCRIPT_DIR_RE = re.compile(r"dirname\s+\"?\$\{?(?:0|BASH_SOURCE(?:\[0\])?)\}?\"?\)\"?((?:/\.\.)+)")
PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+(\s*;\s*\S.*)?$")
REMOTE_CODE_RE = re.compile(r"trust[_-]remote[_-]code\s*[=:]\s*(?!False\b|false\b|0\b)\S")
ALLOWED_INDEX_OPTIONS = ("--index-url", "-i", "--extra-index-url")


# ----------------------------------------------------------------------------- files
def is_code(path):
    return path.suffix in CODE_SUFFIXES or path.name in CODE_NAMES


def package_files(root):
    """Relative paths of the files that make up the code of root: git-tracked files in a checkout, else a walk.

    Model weights, data, outputs and venvs (SKIP_DIRS) are not code and are never opened.
    """
    root = Path(root)
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        rels = [Path(p) for p in out.decode("utf-8").split("\0") if p]
    else:
        rels = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return sorted(p for p in rels if not set(p.parts[:-1]) & SKIP_DIRS and (root / p).is_file())


def check_utf8(path):
    """[] when the file decodes as UTF-8 (a BOM is UTF-8 and allowed), else one problem naming the byte."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [f"{path}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); re-save it as UTF-8"]
    return []


# ----------------------------------------------------------------------------- paths and remote code
def first_match(pattern, text):
    """The first match of pattern in text that is not under SYSTEM_PATHS, or None."""
    return next((m for m in pattern.finditer(text) if not m.group(0).startswith(SYSTEM_PATHS)), None)


def _docstring_nodes(tree):
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                nodes.add(id(first.value))
    return nodes


def _string_literals(tree):
    """(line range, text) of every string literal that is not a docstring; f-strings with {} for the fields."""
    skip = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            skip.update(id(v) for v in node.values)
            yield (node.lineno, node.end_lineno), text
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield (node.lineno, node.end_lineno), node.value


def _parent_count(node):
    """How many `.parent` steps lead from node down to ROOT or __file__, and which one ('' when neither)."""
    count = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            count, node = count + 1, node.value
        elif isinstance(node, ast.Attribute) and node.attr == "ROOT":
            return count, "ROOT"
        elif isinstance(node, ast.Name) and node.id == "ROOT":
            return count, "ROOT"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "resolve", "absolute"):
            node = node.func.value
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "__file__":
            return count, "__file__"
        else:
            return count, ""


def python_path_problems(rel, text):
    """(problems, allowed) for one Python file: absolute paths and paths out of the package, trust_remote_code.

    Docstrings and comments are prose and not checked; string literals and ROOT.parent-style expressions are
    (`Path(__file__).parent` may climb as many folders as the file is deep). A finding on a line that carries
    ALLOW_PRAGMA goes to `allowed` instead.
    """
    depth = len(Path(rel).parts) - 1
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        return [f"{rel}:{e.lineno}: does not parse ({e.msg})"], []
    lines = text.splitlines()
    problems, allowed = [], []

    def report(span, message):
        pragma = any(ALLOW_PRAGMA in lines[i - 1] for i in range(span[0], span[1] + 1) if i <= len(lines))
        (allowed if pragma else problems).append(f"{rel}:{span[0]}: {message}")

    for span, value in _string_literals(tree):
        for pattern, what in ((ABS_UNIX_RE, "absolute path"), (ABS_OTHER_RE, "absolute path"),
                              (PARENT_DIR_RE, "path that leaves the package")):
            match = first_match(pattern, value)
            if match:
                report(span, f"{what} {value[max(match.start() - 10, 0):match.end() + 20]!r}")
                break
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            count, base = _parent_count(node)
            if (base == "ROOT" and count >= 1) or (base == "__file__" and count > depth + 1):
                report((node.lineno, node.end_lineno), f"path that leaves the package ({ast.unparse(node)})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "chdir":
            report((node.lineno, node.end_lineno), "os.chdir: paths must come from common, not the current dir")
        elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                report((node.value.lineno, node.value.end_lineno), "trust_remote_code is not False")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                        isinstance(value, ast.Constant) and value.value is False):
                    report((key.lineno, value.end_lineno), "trust_remote_code is not False")
    return problems, allowed


def text_path_problems(rel, text):
    """(problems, allowed) for a Makefile or shell script: the same checks line by line, comments skipped.

    `$(dirname "$0")/..` climbs from the script's own folder and may go up as many levels as the script is deep.
    """
    problems, allowed = [], []
    depth = len(Path(rel).parts) - 1
    for no, line in enumerate(text.splitlines(), 1):
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        script_relative = SCRIPT_DIR_RE.search(code)
        if script_relative and len(script_relative.group(1)) // 3 <= depth:
            code = code.replace(script_relative.group(0), "dirname")
        target = allowed if ALLOW_PRAGMA in line else problems
        for pattern, what in ((ABS_UNIX_RE, "absolute path"), (ABS_OTHER_RE, "absolute path"),
                              (PARENT_DIR_RE, "path that leaves the package"),
                              (REMOTE_CODE_RE, "trust_remote_code is not False")):
            match = first_match(pattern, code)
            if match:
                target.append(f"{rel}:{no}: {what} {code.strip()[:80]!r}")
                break
    return problems, allowed


def check_code(root, files=None):
    """(problems, allowed) over the code of root: UTF-8, absolute paths, paths out of the package, remote code."""
    root = Path(root)
    files = package_files(root) if files is None else files
    problems, allowed = [], []
    for rel in files:
        if rel.suffix not in TEXT_SUFFIXES and rel.name not in CODE_NAMES:
            continue
        bad = check_utf8(root / rel)
        problems += bad
        if bad or not is_code(rel) or set(rel.parts) & PATH_SCAN_SKIP:
            continue
        text = (root / rel).read_text(encoding="utf-8")
        found = python_path_problems(rel, text) if rel.suffix == ".py" else text_path_problems(rel, text)
        problems += found[0]
        allowed += found[1]
    return problems, allowed


# ----------------------------------------------------------------------------- requirements, models, report
def check_requirements(path):
    """Every requirement an exact `name==version` pin installable by name: no ranges, no local paths or URLs."""
    path = Path(path)
    if not path.exists():
        return [f"{path} not found: the package must list its exact requirements"]
    problems = check_utf8(path)
    if problems:
        return problems
    pins = 0
    for no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"{path.name}:{no}: {line!r}"
        if line.startswith("-"):
            option, _, value = line.partition(" ") if " " in line else line.partition("=")
            if option in ALLOWED_INDEX_OPTIONS and value.strip().startswith("https://"):
                continue
            problems.append(f"{where}: option not allowed (local paths, editable or nested files escape the pins)")
        elif "@" in line or "://" in line or line.endswith((".whl", ".tar.gz", ".zip")) or "/" in line:
            problems.append(f"{where}: a direct reference or local path, not a pin from the index")
        elif not PIN_RE.match(line) or "*" in line:
            problems.append(f"{where}: not pinned exactly (write name==version)")
        else:
            pins += 1
    if not pins and not problems:
        problems.append(f"{path}: no requirements listed")
    return problems


def shipped_models():
    """Model ids inference needs: the base student (index encoder and tokenizer) and common.answer_model()."""
    return list(dict.fromkeys([common.STUDENT_MODEL, common.answer_model()]))


def check_models(root, model_ids=None):
    """The models inference loads are local folders inside root (so they load offline), need no remote code and
    decode greedily (so descriptive answers reproduce)."""
    problems = []
    model_ids = shipped_models() if model_ids is None else model_ids
    for model_id in model_ids:
        folder = Path(root) / model_id
        config = folder / "config.json"
        if Path(model_id).is_absolute() or not config.exists():
            problems.append(f"model {model_id!r}: no {config} (a hub id or a folder outside the package cannot "
                            "load with the hub offline; run `make models`)")
            continue
        if "auto_map" in json.loads(config.read_text(encoding="utf-8")):
            problems.append(f"{config}: auto_map needs trust_remote_code; use a built-in architecture")
        generation = folder / "generation_config.json"
        if generation.exists() and json.loads(generation.read_text(encoding="utf-8")).get("do_sample"):
            problems.append(f"{generation}: do_sample is true; answers must be greedy to reproduce")
    return problems


def check_report(root):
    """reports/REPORT.md exists and is not empty."""
    path = Path(root) / REPORT
    if not path.exists() or not path.read_text(encoding="utf-8", errors="replace").strip():
        return [f"{path} missing or empty: run `make report`"]
    return []


# ----------------------------------------------------------------------------- submission
def extra_column_rows(path):
    """IDs of rows with more than two fields (read_submission keeps only the first two)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [r[0] for r in list(csv.reader(f))[1:] if len(r) > 2]


def check_submission(submission, questions_csv, sample_csv):
    """Every problem of a submission against the questions and sample_submission: UTF-8, header, IDs, order,
    row count, option numbers for multiple choice, non-empty descriptive answers. BOM and CRLF are accepted."""
    problems = []
    for path in (submission, questions_csv, sample_csv):
        if not Path(path).exists():
            problems.append(f"{path} not found (run `make data` and `make submission`)")
        else:
            problems += check_utf8(path)
    if problems:
        return problems
    parsed = {}
    for name, path, reader in (("questions", questions_csv, competition.read_questions),
                               ("submission", submission, competition.read_submission),
                               ("sample", sample_csv, competition.read_submission)):
        try:
            parsed[name] = reader(path)
        except SystemExit as e:  # the shared readers stop with a message; here it is one problem among others
            problems.append(str(e))
    if problems:
        return problems
    extra = extra_column_rows(submission)
    if extra:
        problems.append(f"{submission}: {len(extra)} rows with more than two columns (e.g. {extra[:3]})")
    sample_ids = [r[0].strip() for r in parsed["sample"]]
    return problems + competition.validate_submission(parsed["submission"], parsed["questions"], sample_ids)


def check_all(root, submission=None, require_submission=True):
    """(problems, allowed paths) of every check on a checkout or package folder."""
    root = Path(root)
    problems, allowed = check_code(root)
    problems += check_requirements(root / "requirements.txt")
    problems += check_models(root)
    problems += check_report(root)
    submission = Path(submission) if submission else root / SUBMISSION
    if submission.exists() or require_submission:
        problems += check_submission(submission, root / QUESTIONS, root / SAMPLE)
    return problems, allowed


# ----------------------------------------------------------------------------- fresh-environment reproduction
def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def dirty_files(repo):
    """`git status --porcelain` lines: modified, staged or untracked files that a clone of HEAD would lack."""
    return [line for line in git(repo, "status", "--porcelain").splitlines() if line.strip()]


def read_rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def tiny_question_set(rows, limit):
    """The first questions of each kind, in file order: limit // 2 descriptive (at least one), the rest
    multiple choice, so both answer paths are compared."""
    kinds = {r["ID"]: competition.parse_question(r["ID"], r["Question"]).kind for r in rows}
    n_desc = min(max(limit // 2, 1), sum(k == "desc" for k in kinds.values()))
    desc = [r["ID"] for r in rows if kinds[r["ID"]] == "desc"][:n_desc]
    mc = [r["ID"] for r in rows if kinds[r["ID"]] == "mc"][:limit - n_desc]
    keep = set(desc) | set(mc)
    return [r for r in rows if r["ID"] in keep]


def write_question_set(rows, data_dir):
    """Write rows as the user's data/test.csv and a matching sample_submission.csv."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, fields, out in (("test.csv", ["ID", "Question"], rows),
                              ("sample_submission.csv", ["ID", "Answer"], [dict(ID=r["ID"], Answer="") for r in rows])):
        with open(data_dir / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(out)


def clone_env(shared):
    """This environment with the hub offline, the shared data passed in, and no state of the calling make or venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(common.ROOT)))
    env.update(OFFLINE_ENV, FSKU_SHARED=str(Path(shared).resolve()))
    return env


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


def compare_submissions(reference_rows, fresh_rows, questions):
    """(problems, counts): multiple-choice answers identical, descriptive answers identical (greedy decoding)."""
    kinds = {q.id: q.kind for q in questions}
    ref, new = dict(reference_rows), dict(fresh_rows)
    problems, counts = [], dict(mc=0, mc_same=0, desc=0, desc_same=0)
    if [r[0] for r in reference_rows] != [r[0] for r in fresh_rows]:
        problems.append(f"the two runs answered different IDs ({len(reference_rows)} vs {len(fresh_rows)} rows)")
    for qid in [r[0] for r in reference_rows if r[0] in new]:
        kind = kinds.get(qid, "desc")
        same = ref[qid].strip() == new[qid].strip()
        counts[kind] += 1
        counts[kind + "_same"] += same
        if not same:
            what = "multiple-choice answer" if kind == "mc" else "descriptive answer (greedy decoding)"
            problems.append(f"{qid}: {what} differs: reference {ref[qid][:60]!r} vs fresh {new[qid][:60]!r}")
    return problems, counts


sha256_file = common.sha256_file


def same_weights(dir_a, dir_b):
    """True when every *.safetensors file of the two model folders has the same sha256 (None if none found)."""
    files = sorted(p.name for p in Path(dir_a).glob("*.safetensors"))
    if not files:
        return None
    return all((Path(dir_b) / n).exists() and sha256_file(Path(dir_a) / n) == sha256_file(Path(dir_b) / n)
               for n in files)


def reusable_artifacts(names=VERIFY_REUSE):
    """Relative folders of the VERIFY_REUSE artifacts that are finished (DONE) in this checkout."""
    paths = [getattr(common, name, None) for name in names]
    return [p.relative_to(common.ROOT) for p in paths if isinstance(p, Path) and (p / "DONE").exists()]


def link_tree(src, dst):
    """Hard-link every file of src into dst (copy across file systems): a cheap, independent copy."""
    for path in sorted(Path(src).rglob("*")):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


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
    problems, seconds = [], {}
    log_dir = VERIFY_OUT / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    commit = git(common.ROOT, "rev-parse", "HEAD")
    env = clone_env(shared)
    fresh = workdir / "fresh"
    t0 = time.time()
    git(common.ROOT, "clone", "-q", str(common.ROOT), str(fresh))
    seconds["clone"] = round(time.time() - t0, 1)
    questions_rows = read_rows(common.QUESTIONS) if common.QUESTIONS.exists() else None
    if limit:
        if questions_rows is None:
            return [f"{common.QUESTIONS} not found: run `make data` first (the tiny set is taken from it)"], {}
        tiny = tiny_question_set(questions_rows, limit)
        write_question_set(tiny, fresh / "data")
    else:  # full profile: the same inputs as this checkout, i.e. its data/test.csv when the user put one there
        for path in (common.USER_TEST, common.USER_SAMPLE):
            if path.exists():
                (fresh / "data").mkdir(exist_ok=True)
                shutil.copy2(path, fresh / "data" / path.name)
    reused = reusable_artifacts() if limit else []
    for rel in reused:
        link_tree(common.ROOT / rel, fresh / rel)
    make_args = [f"MODEL_WHEELS={Path(wheels).resolve()}"] + [a for rel in reused for a in ("-o", f"{rel}/DONE")]
    for target in FRESH_STEPS:
        seconds[target], problem = run_make(fresh, target, make_args, env, log_dir, "fresh")
        seconds[target] = round(seconds[target], 1)
        if problem:
            return [problem], dict(seconds=seconds, commit=commit, workdir=str(workdir))
    if limit:  # the same questions answered by this checkout's venv and models: the reference
        reference = workdir / "reference"
        git(common.ROOT, "clone", "-q", str(common.ROOT), str(reference))
        write_question_set(tiny, reference / "data")
        (reference / ".venv").symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)
        stamps = ["-o", ".venv/DONE"] + link_working_artifacts(reference)
        t0 = time.time()
        for target in REFERENCE_STEPS:
            _, problem = run_make(reference, target, stamps, env, log_dir, "reference")
            if problem:
                return [problem], dict(seconds=seconds, commit=commit, workdir=str(workdir))
        seconds["reference"] = round(time.time() - t0, 1)
        reference_csv, questions_csv = reference / RUN_SUBMISSION, reference / QUESTIONS
    else:
        reference_csv, questions_csv = common.SUBMISSION, common.QUESTIONS
    questions = competition.read_questions(questions_csv)
    diff, counts = compare_submissions(competition.read_submission(reference_csv),
                                       competition.read_submission(fresh / RUN_SUBMISSION), questions)
    problems += diff
    t0 = time.time()
    weights_same = same_weights(common.resolve_model(common.STUDENT_MODEL), fresh / common.STUDENT_MODEL)
    answer_model = common.answer_model()  # what this checkout answers with; the clone must answer with the same
    if not (fresh / answer_model).exists():
        problems.append(f"this checkout answers with {answer_model}, which `make submission` did not build in the "
                        "fresh clone: add the step that makes it to the submission target's prerequisites")
    seconds["weights_check"] = round(time.time() - t0, 1)
    checks, allowed = check_all(fresh, submission=fresh / RUN_SUBMISSION)
    problems += [f"fresh clone: {p}" for p in checks]
    seconds["total"] = round(time.time() - t_start, 1)
    meta = dict(commit=commit, limit=limit, questions=len(questions), counts=counts, seconds=seconds,
                reused=[str(r) for r in reused], answer_model=answer_model, student_weights_identical=weights_same,
                offline_env=OFFLINE_ENV, allowed_paths=allowed, problems=problems, python=sys.version.split()[0],
                workdir=str(workdir))
    return problems, meta


def verify_report(meta):
    """Markdown record of a reproduction run (reports/verify.md for the full profile)."""
    c, s = meta["counts"], meta["seconds"]
    profile = f"tiny profile, {meta['limit']} questions" if meta["limit"] else "full question set"
    lines = ["# Fresh-environment reproduction", "",
             f"Produced by `make verify{' VERIFY_LIMIT=' + str(meta['limit']) if meta['limit'] else ''}` "
             f"at commit `{meta['commit'][:10]}` ({profile}): HEAD cloned into a temporary folder, a fresh venv "
             "from requirements.txt, the student converted from the wheel cache, `make submission` with "
             "`HF_HUB_OFFLINE=1`, answers compared with this checkout's.", "",
             "## Summary", "", "| check | result |", "|---|---|",
             f"| multiple-choice answers identical | {c['mc_same']} / {c['mc']} |",
             f"| descriptive answers identical (greedy) | {c['desc_same']} / {c['desc']} |",
             f"| converted student weights identical (sha256) | {meta['student_weights_identical']} |",
             f"| answering model | `{meta['answer_model']}` |",
             f"| reused from this checkout, not rebuilt | {', '.join(meta['reused']) or 'nothing'} |",
             f"| problems found | {len(meta['problems'])} |", "",
             "## Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {value} |" for step, value in s.items()]
    if meta["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in meta["problems"]]
    return "\n".join(lines) + "\n"


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def finish(problems, allowed, what):
    for line in allowed:
        print(f"06: allowed ({ALLOW_PRAGMA}): {line}")
    if problems:
        print(f"06: {what}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        raise SystemExit(1)
    print(f"06: {what}: no problems")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="check a package folder (dist/NAME) instead of this checkout")
    parser.add_argument("--submission", type=Path, help="submission to check (default: ROOT/submission.csv)")
    parser.add_argument("--reproduce", action="store_true", help="clone HEAD, fresh venv, make submission, compare")
    parser.add_argument("--limit", type=int, default=0, help="tiny profile: answer only this many questions")
    parser.add_argument("--shared", type=Path, default=common.SHARED, help="shared data passed into the clone")
    parser.add_argument("--wheels", type=Path, default=common.WHEELS, help="model wheel cache passed into the clone")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone folders")
    args = parser.parse_args()
    print(f"06: settings {json.dumps(vars(args), default=str)} offline={OFFLINE_ENV}")

    if not args.reproduce:
        root = args.package or common.ROOT
        problems, allowed = check_all(root, args.submission, require_submission=not args.package)
        return finish(problems, allowed, f"checks of {root}")
    dirty = dirty_files(common.ROOT)
    if dirty:
        raise SystemExit("06: the working tree is dirty; a clone of HEAD would not contain these changes. "
                         "Commit or stash them first:\n  " + "\n  ".join(dirty[:20]))
    needed = [common.QUESTIONS, Path(common.resolve_model(common.STUDENT_MODEL)) / "config.json"]
    needed += [] if args.limit else [common.SUBMISSION]  # full profile: this checkout's answers are the reference
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"06: missing {missing}: run `make data`, `make student`"
                         f"{'' if args.limit else ' and `make submission`'} first.")
    workdir = Path(tempfile.mkdtemp(prefix="fsku-verify-"))
    t0 = time.time()
    problems, meta = reproduce(args.limit, workdir, args.shared, args.wheels)
    meta.setdefault("problems", problems)
    write_text(VERIFY_OUT / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False))
    if meta.get("counts"):
        report = verify_report(meta)
        write_text(VERIFY_OUT / "verify.md", report)
        if not args.limit:
            write_text(VERIFY_REPORT, report)
        c, s = meta["counts"], meta["seconds"]
        print(f"06: verify compared {c['mc_same']}/{c['mc']} multiple-choice and {c['desc_same']}/{c['desc']} "
              f"descriptive answers identical in {s['total']:.1f} s "
              f"({', '.join(f'{k} {v}' for k, v in s.items() if k != 'total')})")
    else:
        print(f"06: verify stopped after {time.time() - t0:.1f} s (seconds per step: {meta.get('seconds')})")
    if problems or args.keep:
        print(f"06: kept {workdir} for inspection (delete it when done)")
    else:
        t_clean = time.time()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"06: removed the temporary clones in {time.time() - t_clean:.1f} s; "
              f"verify took {time.time() - t0:.1f} s in all")
    allowed = meta.get("allowed_paths", [])
    finish(problems, allowed, "fresh-environment reproduction")


if __name__ == "__main__":
    main()
