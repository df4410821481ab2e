"""Single inference entry point: data/test.csv (+ data/sample_submission.csv) -> submission.csv, offline.

Reads the competition's data/test.csv and sample_submission.csv, the committed answering configuration
(selection.json: answering.chosen()), the shipped answering model, the shipped index (outputs/02_index) when the
configuration uses passages, and the corpus (the package's corpus/ folder, else the shared data). Runs, with this
interpreter and the hub offline (common.OFFLINE_ENV): prepare_data.py; only when passages are used, 02_build_index.py
(when no finished index is shipped) and 03_rerank.py; then 04_infer.py. Then checks submission.csv against the
questions and the sample submission (competition.validate_submission) and exits non-zero listing every problem.
Writes data/prepared/, outputs/ and submission.csv. The package's entry point: `python inference.py`; in a development
checkout `make submission` runs the same steps through the Makefile.
"""
import os
import subprocess
import sys
import time

import answering
import common
import competition

# ----------------------------------------------------------------------------- settings
PACKAGE_CORPUS = common.ROOT / "corpus"  # written by `make package`; absent in a development checkout
# -----------------------------------------------------------------------------


def steps(passages, index_done, package_corpus=PACKAGE_CORPUS):
    """The scripts to run with their arguments, in order; prepare_data.py reads the package's corpus when it ships
    one."""
    prepare = ["prepare_data.py"] + (["--corpus-src", str(package_corpus)] if package_corpus.is_dir() else [])
    retrieve = ([] if index_done else [["02_build_index.py"]]) + [["03_rerank.py"]] if passages else []
    return [prepare, *retrieve, ["04_infer.py"]]


def main():
    os.environ.update(common.OFFLINE_ENV)
    config = answering.chosen()
    plan = steps(config.passages, (common.INDEX / "DONE").exists())
    print(f"inference: steps {[s[0] for s in plan]}, offline {common.OFFLINE_ENV}, {config}")
    if not common.USER_TEST.exists():
        print(f"inference: {common.USER_TEST.relative_to(common.ROOT)} not found: answering the development set")
    t0 = time.time()
    for step in plan:
        result = subprocess.run([sys.executable, str(common.ROOT / step[0]), *step[1:]])
        if result.returncode:
            raise SystemExit(f"inference: {step[0]} failed (exit {result.returncode}); see its message above.")
    questions = competition.read_questions(common.QUESTIONS)
    sample_ids = [r[0] for r in competition.read_submission(common.SAMPLE)]
    problems = competition.validate_submission(competition.read_submission(common.SUBMISSION), questions, sample_ids)
    if problems:
        raise SystemExit("inference: submission.csv is invalid:\n  " + "\n  ".join(problems))
    print(f"inference: wrote {common.SUBMISSION.relative_to(common.ROOT)} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
