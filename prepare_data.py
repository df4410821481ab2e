"""Prepare the corpus and the question set.

Reads the shared corpus (laws, guidelines; default ../shared/corpus, or --corpus-src) and either the user's
data/test.csv (+ data/sample_submission.csv when present) or, without it, the development questions of
../shared/eval. Writes data/corpus/ (a checked copy), data/prepared/questions.csv (ID,Question),
data/prepared/sample_submission.csv (ID,Answer), data/prepared/labels.csv (dev answers only, for `make eval`),
meta.json and a DONE stamp. Run by `make data`.
"""
import argparse
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import common
import competition
import scoring

# ----------------------------------------------------------------------------- settings
COPY_PARTS = ["laws", "guidelines", "laws_extended"]  # corpus folders copied (the index reads retrieval.CORPUS_PARTS)
# -----------------------------------------------------------------------------


def copy_corpus(src, dst):
    """Copy the corpus folders, checking every file is non-empty UTF-8; return {part: (files, chars)}."""
    if not src.is_dir():
        raise SystemExit(f"corpus source {src} not found: pass --corpus-src DIR (a folder with laws/).")
    stats = {}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in COPY_PARTS:
        files = sorted(p for p in (src / part).glob("*") if p.suffix in common.CORPUS_SUFFIXES)
        if part == "laws" and not files:
            raise SystemExit(f"{src / part} has no .md/.txt files: the corpus is empty.")
        chars = 0
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"{path} is not UTF-8 ({e}): convert it to UTF-8.") from e
            if not text.strip():
                raise SystemExit(f"{path} is empty: remove it or restore its text.")
            (tmp / part).mkdir(parents=True, exist_ok=True)
            (tmp / part / path.name).write_text(text, encoding="utf-8")
            chars += len(text)
        stats[part] = dict(files=len(files), chars=chars)
    if (src / "MANIFEST.tsv").exists():
        shutil.copy2(src / "MANIFEST.tsv", tmp / "MANIFEST.tsv")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return stats


def user_question_set(test_csv, sample_csv):
    """The competition's test.csv, checked by the shared parser, and its sample submission's IDs."""
    parsed = competition.read_questions(test_csv)
    questions = [dict(ID=r["ID"], Question=r["Question"]) for r in scoring.read_csv(test_csv)]
    if sample_csv.exists():
        sample_ids = [(r.get("ID") or "").strip() for r in scoring.read_csv(sample_csv)]
        if sample_ids != [q.id for q in parsed]:
            raise SystemExit(f"{sample_csv} IDs do not match {test_csv} (count or order): fix or remove it.")
    return questions


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-src", type=Path, default=common.SHARED / "corpus")
    parser.add_argument("--eval-dir", type=Path, default=common.SHARED / "eval")
    args = parser.parse_args()

    corpus_stats = copy_corpus(args.corpus_src, common.CORPUS)
    common.PREPARED.mkdir(parents=True, exist_ok=True)
    if common.USER_TEST.exists():
        source, questions, labels = "test", user_question_set(common.USER_TEST, common.USER_SAMPLE), []
    else:
        source, (questions, labels) = "dev", scoring.dev_question_set(args.eval_dir)
    common.write_csv(common.QUESTIONS, ["ID", "Question"], questions)
    parsed = competition.read_questions(common.QUESTIONS)  # the same check the answering step will make
    common.write_csv(common.SAMPLE, ["ID", "Answer"], [dict(ID=q.id, Answer="") for q in parsed])
    if labels:
        common.write_csv(common.LABELS, scoring.LABEL_FIELDS, labels)
    elif common.LABELS.exists():
        common.LABELS.unlink()
    kinds = Counter(q.kind for q in parsed)
    options = Counter(len(q.options) for q in parsed if q.kind == "mc")
    meta = dict(source=source, questions=len(parsed), kinds=dict(kinds), options=dict(options),
                corpus=corpus_stats, corpus_src=os.path.relpath(args.corpus_src, common.ROOT))
    (common.PREPARED / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    (common.PREPARED / "DONE").touch()
    print(f"data: {len(parsed)} {source} questions ({kinds['mc']} multiple choice, {kinds['desc']} descriptive); "
          f"corpus {sum(s['files'] for s in corpus_stats.values())} files")


if __name__ == "__main__":
    main()
