"""Answer every question with the chosen LLM and write the submission.

Reads data/prepared/questions.csv and sample_submission.csv (`make data`), the answering configuration of
selection.json (answering.chosen(): candidate model, level, calibration, passages, rerank; written by `make select`)
and, when it uses passages, the index (`make index`) and, unless its rerank is false, the reranked chunks (`make
rerank`). Multiple choice: the answer is read from the next-token logits of the option digits in batched prefills,
under the calibration's option shifts (answering.py); descriptive: short greedy Korean generation. Writes
<out>/predictions-<key>.jsonl (checkpoint after every batch, resumed after a kill), <out>/submission.csv,
<out>/meta.json and <out>/DONE; with the default --out also ./submission.csv (UTF-8 with a BOM, as
sample_submission.csv). On a CPU too slow for the chosen passages, passages only where retrieval looks surest
(answering.fitted, run_groups); with a cascade, only where the answer without them is unsure, as many of those as the
time budget affords at the speed measured on this machine (run_cascade). Run by `make submission` (and the report
targets with --model/--out).
"""
import argparse
import dataclasses
from pathlib import Path

import answering
import common
import competition


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="candidate name (student, teacher, distilled) or model folder "
                        "/ hub id; default: selection.json's")
    parser.add_argument("--out", type=Path, default=common.INFER, help="output folder (checkpoint, submission)")
    parser.add_argument("--questions", type=Path, default=common.QUESTIONS)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the level's)")
    parser.add_argument("--level", default=None, help="quantization level (lm.LEVELS); default: selection.json's")
    parser.add_argument("--calibration", default=None, choices=answering.CALIBRATIONS)
    parser.add_argument("--permutations", type=int, default=None, help="cyclic option shifts per question")
    parser.add_argument("--pride-share", type=float, default=None, help="share of questions estimating the prior")
    parser.add_argument("--passages", type=int, default=None, help="retrieved passages per prompt (0: none)")
    parser.add_argument("--no-rerank", action="store_true", help="first-stage passages even when 03 has run")
    parser.add_argument("--cascade", type=float, default=None, help="passages only where the answer without them is "
                        "less sure than this (0: off); --passages or --calibration without it turn a cascade off")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N questions (measurements)")
    parser.add_argument("--mc-only", action="store_true", help="skip descriptive questions (measurements)")
    args = parser.parse_args()

    cascade = args.cascade
    if cascade is None and (args.passages is not None or args.calibration is not None):
        cascade = 0.0  # another passage count or calibration turns the chosen cascade off
    overrides = dict(candidate=args.model, level=args.level, calibration=args.calibration,
                     permutations=args.permutations, pride_share=args.pride_share, passages=args.passages,
                     cascade=cascade)
    config = dataclasses.replace(answering.chosen(fit=True), **{k: v for k, v in overrides.items() if v is not None})
    questions = competition.read_questions(args.questions)
    full = not args.limit and not args.mc_only
    if args.mc_only:
        questions = [q for q in questions if q.kind == "mc"]
    if args.limit:
        questions = questions[:args.limit]
    ranked = answering.reranked_chunks() if config.passages and config.rerank and not args.no_rerank else None
    groups, meta = answering.run_groups(questions, args.out, config, args.dtype, ranked=ranked,
                                        budget_s=answering.budget_seconds())
    rows = answering.grouped_submission_rows(questions, groups, config.calibration)
    sample_ids = None
    if full and args.questions == common.QUESTIONS and common.SAMPLE.exists():
        sample_ids = [r[0] for r in competition.read_submission(common.SAMPLE)]
    problems = competition.validate_submission(rows, questions, sample_ids)
    if problems:
        raise SystemExit("04: the submission would be invalid:\n  " + "\n  ".join(problems[:20]))
    competition.write_submission(args.out / "submission.csv", rows)
    (args.out / "DONE").touch()
    if full and args.out == common.INFER:
        competition.write_submission(common.SUBMISSION, rows)
    print(f"04: answered {len(questions)} questions in {meta['seconds']['answering']:.1f} s "
          f"({meta['seconds']['per_question']:.2f} s/question) -> {args.out / 'submission.csv'}")


if __name__ == "__main__":
    main()
