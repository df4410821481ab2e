"""Single inference entry point: data/test.csv (+ data/sample_submission.csv) -> submission.csv, offline.

Reads the competition's data/test.csv and sample_submission.csv, the shipped models (common.answer_model() and
the base student), the shipped index (outputs/02_index) when there is one, and the corpus (the package's corpus/
folder, else the shared data). Runs the answering steps in STEPS, in order, with this Python interpreter, the hub
offline and relative paths only; then checks submission.csv against the questions and the sample submission
(06_verify.check_submission) and exits non-zero listing every problem. Writes data/prepared/, outputs/ and
submission.csv. The package's entry point: `python inference.py`. In a development checkout `make submission`
runs the same steps through the Makefile.
"""
import importlib
import os
import subprocess
import sys
import time

import common

# ----------------------------------------------------------------------------- settings
STEPS = [  # script and arguments, in order; a stage that lands adds its answering-time script here
    ["prepare_data.py"],  # data/test.csv -> data/prepared/ (questions.csv, sample_submission.csv)
    ["03_rerank.py"],  # the shipped index's candidates per question, reranked by the answering model
    ["04_infer.py"],  # answers, with the reranked passages in the prompt -> submission.csv
]
PACKAGE_CORPUS = common.ROOT / "corpus"  # written by `make package`; absent in a development checkout
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# -----------------------------------------------------------------------------


def step_command(step):
    """The command line of one step; prepare_data.py reads the package's corpus when it ships one."""
    args = list(step[1:])
    if step[0] == "prepare_data.py" and PACKAGE_CORPUS.is_dir():
        args += ["--corpus-src", str(PACKAGE_CORPUS)]
    return [sys.executable, str(common.ROOT / step[0])] + args


def main():
    os.environ.update(OFFLINE_ENV)
    print(f"inference: steps {[s[0] for s in STEPS]}, offline {OFFLINE_ENV}, model {common.STUDENT_MODEL}")
    if not common.USER_TEST.exists():
        print(f"inference: {common.USER_TEST.relative_to(common.ROOT)} not found: answering the development set")
    t0 = time.time()
    for step in STEPS:
        if not (common.ROOT / step[0]).exists():
            print(f"inference: {step[0]} not present, skipped")
            continue
        result = subprocess.run(step_command(step), cwd=common.ROOT)
        if result.returncode:
            raise SystemExit(f"inference: {step[0]} failed (exit {result.returncode}); see its message above.")
    verify = importlib.import_module("06_verify")
    problems = verify.check_submission(common.SUBMISSION, common.QUESTIONS, common.SAMPLE)
    if problems:
        raise SystemExit("inference: submission.csv is invalid:\n  " + "\n  ".join(problems))
    print(f"inference: wrote {common.SUBMISSION.relative_to(common.ROOT)} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
