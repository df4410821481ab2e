"""Prepare the corpus and the question set.

Reads the shared corpus (laws, guidelines; default ../shared/corpus, or --corpus-src) and either the user's
data/test.csv (+ data/sample_submission.csv when present) or, without it, the development questions of
../shared/eval. Writes data/corpus/ (a checked copy), data/prepared/questions.csv (ID,Question),
data/prepared/sample_submission.csv (ID,Answer), data/prepared/labels.csv (dev answers only, for `make eval`),
meta.json and a DONE stamp. Run by `make data`.

Only the competition's layout is accepted (competition.read_questions, issue 15): a bad test.csv or
sample_submission.csv stops with `<file> line N (ID): what is wrong, what to do` before anything is written, and
data/prepared is replaced whole only after every check passed. Prints how many questions of each kind there are and
the IDs whose kind was decided from an unusual shape.
"""
import argparse
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
    """The competition's test.csv as rows {ID, Question}, checked by the shared parser (its errors name the line of
    test.csv), with its sample submission's IDs checked against it when the sample is there."""
    parsed = competition.read_questions(test_csv)
    if sample_csv.exists():
        competition.check_sample(sample_csv, parsed, test_csv)
    return [dict(ID=q.id, Question=q.text) for q in parsed]


def stage_questions(folder, questions):
    """Write questions.csv into folder and read it back with the answering step's parser; return the Questions."""
    folder.mkdir(parents=True)
    path = folder / common.QUESTIONS.name
    common.write_csv(path, ["ID", "Question"], questions)
    return competition.read_questions(path)


def replace_dir(src, dst):
    """Put folder src in the place of dst: dst is moved aside, src renamed, the old one removed (a kill leaves one of
    them whole under its own name)."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def summary(parsed, source, corpus_stats):
    """The step's report: counts of each kind, then one line per question whose kind came from an unusual shape."""
    kinds = Counter(q.kind for q in parsed)
    lines = [f"data: {len(parsed)} {source} questions ({kinds['mc']} multiple choice, {kinds['desc']} descriptive); "
             f"corpus {sum(s['files'] for s in corpus_stats.values())} files"]
    unusual = [q for q in parsed if q.note]
    if unusual:
        lines.append(f"data: {len(unusual)} questions whose kind the rule decided from an unusual shape "
                     "(competition.parse_question); check them:")
        lines += [f"  {q.id} ({q.kind}): {q.note}" for q in unusual]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-src", type=Path, default=common.SHARED / "corpus")
    parser.add_argument("--eval-dir", type=Path, default=common.SHARED / "eval")
    args = parser.parse_args()

    # Every check runs before data/prepared is touched: the new files go to a staging folder, renamed at the end.
    if common.USER_TEST.exists():
        source, questions, labels = "test", user_question_set(common.USER_TEST, common.USER_SAMPLE), []
    else:
        source, (questions, labels) = "dev", scoring.dev_question_set(args.eval_dir)
    stage = common.PREPARED.with_name(common.PREPARED.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    parsed = stage_questions(stage, questions)
    corpus_stats = copy_corpus(args.corpus_src, common.CORPUS)
    competition.write_submission(stage / common.SAMPLE.name, [(q.id, "") for q in parsed])
    if labels:
        common.write_csv(stage / common.LABELS.name, scoring.LABEL_FIELDS, labels)
    meta = dict(source=source, questions=len(parsed), kinds=dict(Counter(q.kind for q in parsed)),
                options=dict(Counter(len(q.options) for q in parsed if q.kind == "mc")),
                unusual={q.id: q.note for q in parsed if q.note},
                corpus=corpus_stats, corpus_src=os.path.relpath(args.corpus_src, common.ROOT))
    common.write_json(stage / "meta.json", meta)
    (stage / "DONE").touch()
    replace_dir(stage, common.PREPARED)
    print(summary(parsed, source, corpus_stats))


if __name__ == "__main__":
    main()
