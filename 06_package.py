"""Generate reports/REPORT.md from the stage reports, and assemble the submission package dist/<PACKAGE_NAME>/.

`report` (`make report`): reads reports/*.md of the stages that have run (STAGES: baseline, retrieval, rerank,
distill, quantize, eval, verify) and the numbered scripts' docstrings; writes reports/REPORT.md (method, data and
licences, development scores per stage, timings, quantization choice, how to reproduce). Never edited by hand.
`package` (`make package`): copies the git-tracked code, requirements.txt and reports, the answering model
and the base student it embeds with, the later stages' artifacts that exist (ARTIFACTS), the checked corpus copy
(data/corpus -> corpus/), the data-provenance note DATA_LICENSES.md and the entry point inference.py into
dist/<PACKAGE_NAME>/ with relative paths, then MANIFEST.sha256 and meta.json. `make package` then runs
`06_verify.py --package` on it. Model files are hard-linked when the file system allows (no second 1 GB copy).
"""
import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import common

# ----------------------------------------------------------------------------- settings
PACKAGE_NAME = "fsku-financial-security-qa"
DIST = common.ROOT / "dist"
# common.py names of question-independent artifacts, copied when defined and finished (DONE). Not 03_rerank's
# output: it is per question and inference.py recomputes it for the test set.
ARTIFACTS = ["INDEX"]
PACKAGE_CORPUS = "corpus"  # package folder of the checked corpus copy; inference.py passes it to prepare_data.py
ENTRY_POINT = "inference.py"
STAGES = [  # report, stage: in pipeline order; REPORT.md takes the ones that exist
    ("baseline.md", "Baseline (no retrieval), option calibration, CPU dtype"),
    ("retrieval.md", "02 retrieval"),
    ("rerank.md", "03 reranking"),
    ("rag.md", "04 with and without retrieved passages"),
    ("gate.md", "04 relevance gate (passages only where retrieval looks sure)"),
    ("distill.md", "01 distillation"),
    ("sweep.md", "01 distillation sweep"),
    ("quantize.md", "05 quantization"),
    ("eval.md", "Final submission on the development set"),
    ("verify.md", "06 fresh-environment reproduction"),
]
SCORE_COLUMN = re.compile(r"score|accuracy|recall|hit|mrr", re.I)  # a table with such a column is a score table
TIMING_HEADING = re.compile(r"time|timing|speed|second|setup", re.I)
QUANT_HEADING = re.compile(r"(?<!multiple )choice|decision|chosen|recommend", re.I)
DTYPE_HEADING = re.compile(r"dtype", re.I)
PROVENANCE = """\
| data / model | where from | licence |
|---|---|---|
| Laws and decrees (`corpus/laws`, `corpus/laws_extended`) | 국가법령정보센터 via the legalize-kr mirror (one Markdown file per law; `corpus/MANIFEST.tsv` gives 공포일자, 시행일자, source path and commit) | statutes are not protected by copyright (저작권법 제7조); the mirror's structure is MIT |
| Administrative rules and notices (`corpus/guidelines`) | 고시 and 규정 (ISMS-P 인증 고시, 전자금융감독규정 2018 version, 검사·제재 규정, 위탁 규정, 관리등급 고시), text extracted from the published PDFs | public works (저작권법 제7조) |
| Development questions (FSKU, used only to measure, never shipped or trained on) | FSKU benchmark by FSI-AI | MIT |
| Student model (answers) | Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF embedded in PyPI wheels, converted to bf16 safetensors by `fetch_models.py` (sha256 in `models/SHA256SUMS`) | Apache-2.0 (Qwen2.5) |
| Teacher model (distillation only, not shipped) | Qwen2.5-Coder-1.5B-Instruct, same route | Apache-2.0 (Qwen2.5) |
| Code | this repository | {code_licence} |
"""
REPRODUCE = """\
From a checkout with the shared data beside it (`../shared`, or set `FSKU_SHARED`):

```bash
make setup        # .venv from the exact pins in requirements.txt
make models       # fetch, check (sha256) and convert the embedded student and teacher
make data         # corpus copy and question set (data/test.csv when present, else the FSKU dev set)
make submission   # every stage up to submission.csv
make eval         # development score -> reports/eval.md
make report       # this file
make package      # dist/{name}/, checked by 06_verify.py --package
make verify       # clean tree only: fresh clone + venv + make submission, answers compared (VERIFY_LIMIT=5: tiny)
```

From the package: put the competition's `test.csv` and `sample_submission.csv` into `data/`, then
`pip install -r requirements.txt && python {entry}` writes `submission.csv` (offline, relative paths only).
"""
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- markdown helpers
def sections(markdown):
    """[(level, heading, body lines)] of a markdown text; text before the first heading has level 0."""
    out, level, heading, body = [], 0, "", []
    in_code = False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        match = None if in_code else re.match(r"^(#{1,6})\s+(.*)$", line)
        if match:
            out.append((level, heading, body))
            level, heading, body = len(match.group(1)), match.group(2).strip(), []
        else:
            body.append(line)
    out.append((level, heading, body))
    return out


def section_text(markdown, pattern):
    """Heading and body (with its subsections) of the first section whose heading matches pattern, or None."""
    parts = sections(markdown)
    for i, (level, heading, body) in enumerate(parts):
        if level and pattern.search(heading):
            lines = list(body)
            for sub_level, sub_heading, sub_body in parts[i + 1:]:
                if sub_level <= level:
                    break
                lines += ["#" * sub_level + " " + sub_heading] + sub_body
            return heading, "\n".join(lines).strip()
    return None


def tables(markdown):
    """Every markdown table as a list of its lines (header, separator, rows)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.strip().startswith("|"):
            current.append(line.strip())
        else:
            if len(current) >= 3 and re.match(r"^\|[\s:|-]+\|$", current[1]):
                found.append(current)
            current = []
    return found


def score_table(markdown):
    """The first table whose header names a score column, or None."""
    for table in tables(markdown):
        if SCORE_COLUMN.search(table[0]):
            return table
    return None


def demote(markdown, levels):
    """Push every heading down by `levels` (for embedding a report inside another)."""
    out, in_code = [], False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        out.append(re.sub(r"^(#{1,6})(\s)", lambda m: "#" * min(len(m.group(1)) + levels, 6) + m.group(2), line)
                   if not in_code else line)
    return "\n".join(out)


def script_summaries(root):
    """(script, first docstring paragraph) of the numbered scripts and the entry point, in file order."""
    import ast

    out = []
    for path in sorted(root.glob("[0-9][0-9]_*.py")) + [root / ENTRY_POINT]:
        if path.exists():
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            out.append((path.name, " ".join(doc.split("\n\n")[0].split())))
    return out


# ----------------------------------------------------------------------------- report
def build_report(reports_dir, root=common.ROOT):
    """REPORT.md text from the stage reports present in reports_dir (deterministic: no clock, no machine state)."""
    reports_dir = Path(reports_dir)
    present = [(name, stage, (reports_dir / name).read_text(encoding="utf-8"))
               for name, stage in STAGES if (reports_dir / name).exists()]
    missing = [f"`{name}` ({stage})" for name, stage in STAGES if not (reports_dir / name).exists()]
    lines = ["# FSKU financial-security QA: submission report", "",
             "Generated by `make report` (06_package.py) from the stage reports in `reports/`; do not edit by hand.",
             "", "## Method", ""]
    lines += [f"- `{name}`: {summary}" for name, summary in script_summaries(root)]
    lines += ["", f"Stage reports present: {', '.join(f'`{n}`' for n, _, _ in present) or 'none'}."]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}."]
    lines += ["", "## Data and licences", "", provenance(root), "## Development scores per stage", "",
              "Every score is measured on the FSKU development set (never used for training or prompts).", ""]
    for name, stage, text in present:
        table = score_table(text)
        if table:
            lines += [f"### {stage} (`reports/{name}`)", ""] + table + [""]
    lines += ["## Timings", "", "Seconds per question are in the score tables above; the stage reports add:", ""]
    for name, stage, text in present:
        for level, heading, body in sections(text):
            if level and TIMING_HEADING.search(heading):
                lines += [f"### {heading} (`reports/{name}`)", "", "\n".join(body).strip(), ""]
    lines += ["## Quantization choice", ""]
    quant = dict((n, t) for n, _, t in present).get("quantize.md")
    found = section_text(quant, QUANT_HEADING) if quant else None
    if found:
        lines += [f"From `reports/quantize.md`, {found[0]}:", "", found[1], ""]
    else:
        lines += [f"No quantization stage has run: the answering model runs in `{common.CPU_DTYPE}` on CPU "
                  "(`common.CPU_DTYPE`).", ""]
        baseline = dict((n, t) for n, _, t in present).get("baseline.md")
        dtype = section_text(baseline, DTYPE_HEADING) if baseline else None
        if dtype:
            lines += [f"From `reports/baseline.md`, {dtype[0]}:", "", dtype[1], ""]
    lines += ["## How to reproduce", "", REPRODUCE.format(name=PACKAGE_NAME, entry=ENTRY_POINT),
              "## Stage reports", ""]
    for name, stage, text in present:  # the report's own title gives way to the stage heading
        body = re.sub(r"^# (.*)\n", r"*\1*\n", text.lstrip(), count=1)
        lines += [f"### {stage} (`reports/{name}`)", "", demote(body, 2).strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def provenance(root):
    """The provenance table, naming the code's licence file when the repository has one."""
    licence = "see `LICENSE`" if (Path(root) / "LICENSE").exists() else "not chosen yet (no LICENSE file)"
    return PROVENANCE.format(code_licence=licence)


def write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- package
def tracked_files(root=None):
    root = root or common.ROOT
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return [Path(p) for p in out.decode("utf-8").split("\0") if p and (root / p).is_file()]


def link_or_copy(src, dst):
    """Hard-link src to dst (same file system), else copy with metadata."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src, dst, link=True):
    """Copy the files of src into dst (hard links for weights and indexes, which are replaced, never edited)."""
    for path in sorted(Path(src).rglob("*")):
        if path.is_file() and not path.name.endswith(".tmp"):
            target = dst / path.relative_to(src)
            if link:
                link_or_copy(path, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def artifact_dirs(names=ARTIFACTS):
    """Relative folders of the artifacts that common.py defines and that are finished (a stage not built is
    skipped)."""
    out = []
    for name in names:
        path = getattr(common, name, None)
        if isinstance(path, Path) and (path / "DONE").exists():
            out.append(path.relative_to(common.ROOT))
    return out


def model_dirs():
    """Folders of the models inference loads: common.answer_model() and the base student (index encoder)."""
    ids = list(dict.fromkeys([common.answer_model(), common.STUDENT_MODEL]))
    dirs = [Path(common.resolve_model(i)) for i in ids]
    missing = [str(d) for d in dirs if not (d / "config.json").exists()]
    if missing:
        raise SystemExit(f"models {missing} not found locally: run `make models` (and the stage that builds them).")
    return dirs


sha256_file = common.sha256_file


def data_note(model_dirs):
    """DATA_LICENSES.md: the provenance table plus the facts of the shipped models."""
    lines = ["# Data and model provenance", "", provenance(common.ROOT),
             f"Answering model: `{common.answer_model()}`. Shipped model folders:", ""]
    for model_dir in model_dirs:
        meta = Path(model_dir) / "meta.json"
        m = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
        source = (f"from wheel `{m['package']}` {m.get('version')} ({m.get('parts')} parts), GGUF `{m.get('gguf')}` "
                  f"sha256 `{m.get('gguf_sha256')}`" if "package" in m else "built by this pipeline (see its meta.json)")
        lines.append(f"- `{Path(model_dir).relative_to(common.ROOT)}`: {source}.")
    return "\n".join(lines) + "\n"


def build_package(dest):
    """Assemble the package into dest (via dest.tmp, replaced at the end); return its meta."""
    t0 = time.time()
    models = model_dirs()
    if not (common.CORPUS / "laws").is_dir():
        raise SystemExit(f"{common.CORPUS} not found: run `make data` first (the package ships the checked corpus).")
    if not common.REPORTS.joinpath("REPORT.md").exists():
        raise SystemExit("reports/REPORT.md not found: run `make report` first.")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = tracked_files()
    for rel in files:  # copied, never linked: an in-place edit of the checkout must not change the package
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(common.ROOT / rel, tmp / rel)
    write_text(tmp / "reports" / "REPORT.md", common.REPORTS.joinpath("REPORT.md").read_text(encoding="utf-8"))
    for model_dir in models:
        copy_tree(model_dir, tmp / model_dir.relative_to(common.ROOT))
    artifacts = artifact_dirs()
    for rel in artifacts:
        copy_tree(common.ROOT / rel, tmp / rel)
    copy_tree(common.CORPUS, tmp / PACKAGE_CORPUS, link=False)
    (tmp / common.DATA.relative_to(common.ROOT)).mkdir(exist_ok=True)
    write_text(tmp / "DATA_LICENSES.md", data_note(models))
    manifest = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_text(tmp / "MANIFEST.sha256", "".join(f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}\n"
                                                for p in manifest))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=common.ROOT, capture_output=True, text=True).stdout
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=common.ROOT, capture_output=True,
                                text=True).stdout.strip())
    meta = dict(name=dest.name, commit=commit.strip(), dirty_tree=dirty, code_files=len(files),
                model=common.answer_model(), models=[str(d.relative_to(common.ROOT)) for d in models], artifacts=[str(a) for a in artifacts], corpus=PACKAGE_CORPUS,
                entry_point=ENTRY_POINT, files=len(manifest) + 1,
                bytes=sum(p.stat().st_size for p in manifest), seconds=round(time.time() - t0, 1))
    write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["report", "package"], nargs="?", default="package")
    parser.add_argument("--out", type=Path, default=None, help="report file or package folder")
    args = parser.parse_args()
    print(f"06: {args.what}, PACKAGE_NAME={PACKAGE_NAME}, ARTIFACTS={ARTIFACTS}")
    if args.what == "report":
        out = args.out or common.REPORTS / "REPORT.md"
        text = build_report(common.REPORTS)
        write_text(out, text)
        print(f"06: wrote {out} ({len(text.splitlines())} lines)")
        return
    dest = args.out or DIST / PACKAGE_NAME
    meta = build_package(dest)
    print(f"06: packaged {meta['files']} files ({meta['bytes'] / 2**30:.2f} GiB; model {meta['model']}, "
          f"artifacts {meta['artifacts'] or 'none'}) into {dest} in {meta['seconds']} s"
          + (" (WARNING: from a dirty tree)" if meta["dirty_tree"] else ""))
    verify = importlib.import_module("06_verify")
    problems, allowed = verify.check_all(dest, require_submission=False)
    verify.finish(problems, allowed, f"checks of the package {dest}")


if __name__ == "__main__":
    main()
