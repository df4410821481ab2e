"""Reranking quality and cost on the development law questions, written as reports/rerank.md.

Reads outputs/02_index/ (`make index`), data/prepared/{questions,labels}.csv and the answering configuration of
selection.json (answering.chosen(): its model reranks and answers). Takes the first EVAL_QUESTIONS development
questions whose `reference` names a law article (eval_retrieval.py parses it), reranks their first-stage candidates
pointwise and listwise by running 03_rerank.py on them (checkpointed under outputs/eval_rerank/<mode>/), and reports
recall@1/3/5 and MRR of the first stage, each reranker alone and blended (retrieval.blend), the seconds and tokens
per question on this CPU, the projected cost for 515 questions on a GPU, and the multiple-choice accuracy of the
answers (answering.run) on the same questions with first-stage vs reranked passages. Run by `make rerank-report`.
"""
import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import answering
import common
import competition
import eval_retrieval
import lm
import retrieval
import scoring

# ----------------------------------------------------------------------------- settings
EVAL_QUESTIONS = 60  # law questions measured on this CPU (about 15 s each on a quiet CPU); all of them on a GPU
KS = (1, 3, 5)
MODES = ["pointwise", "listwise"]
BLENDS = [1.0, 0.7, 0.5]  # weight of the LLM score against the first stage (retrieval.RERANK_BLEND is the default)
ANSWER_PASSAGES = 3  # passages in the answer prompt for the score comparison when the chosen answers read none
TEST_QUESTIONS = 515  # the competition test
# Assumed prefill throughput on one RTX 4090 (bf16, tokens/s), used only for the projection: not measured here.
GPU_PREFILL_TOKENS_PER_S = {"0.5B": 60_000, "7B": 9_000}
OUT = common.OUTPUTS / "eval_rerank"
# -----------------------------------------------------------------------------


def ranks_of(orders, items, chunks):
    """First rank (1-based) of a gold article in each question's ordered chunk ids, None when absent."""
    return [eval_retrieval.first_rank([chunks[i].key for i in order], item["golds"])
            for order, item in zip(orders, items)]


def summary(ranks):
    n = len(ranks)
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in KS}
    out["MRR"] = sum(1 / r for r in ranks if r is not None) / n
    return out


def table_row(name, m, extra=""):
    return f"| {name} | " + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in KS) + f" | {m['MRR']:.3f} |{extra}"


def rerank(questions, mode):
    """(03_rerank.py's full records in question order, its meta) for the questions, reranked in mode by a
    03_rerank.py process (its checkpoint under OUT/mode makes a rerun cheap)."""
    out = OUT / mode
    out.mkdir(parents=True, exist_ok=True)
    common.write_text(out / "ids.txt", "\n".join(q.id for q in questions) + "\n")
    subprocess.run([sys.executable, str(common.ROOT / "03_rerank.py"), "--mode", mode, "--out", str(out),
                    "--ids", str(out / "ids.txt")], cwd=common.ROOT, check=True)
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    records = lm.read_records(out / f"ranked-{meta['key']}.jsonl")
    return [records[q.id] for q in questions], meta


def recall_lines(items, results, metas, chunks):
    """The recall table (first stage, each mode alone and blended) and the cost table."""
    first = [r["first_stage"] for r in results[MODES[0]]]
    lines = ["| order | " + " | ".join(f"recall@{k}" for k in KS) + " | MRR |", "|---|" + "---|" * (len(KS) + 1),
             table_row(f"first stage ({retrieval.SEARCH_METHOD})", summary(ranks_of(first, items, chunks)))]
    for mode in MODES:
        for weight in BLENDS:
            orders = [[r["first_stage"][i] for i in retrieval.blend(r["llm_scores"], r["first_scores"], weight)]
                      if r["llm_scores"] else r["first_stage"] for r in results[mode]]
            label = f"{mode}, LLM only" if weight == 1.0 else f"{mode}, blend {weight}"
            lines.append(table_row(label, summary(ranks_of(orders, items, chunks))))
    lines += ["", "| mode | s/question (this CPU) | tokens/question | failures | projected 515 q on a 4090 |",
              "|---|---|---|---|---|"]
    for mode in MODES:
        m = metas[mode]
        tokens = m["tokens_per_question"] * TEST_QUESTIONS
        projected = ", ".join(f"{size}: {tokens / tps / 60:.1f} min" for size, tps in GPU_PREFILL_TOKENS_PER_S.items())
        lines.append(f"| {mode} | {m['seconds']['per_question']:.2f} | {m['tokens_per_question']:.0f} | "
                     f"{m['failures']} | {projected} |")
    rates = ", ".join(f"{k} {v:,} tokens/s" for k, v in GPU_PREFILL_TOKENS_PER_S.items())
    return lines + ["", "The projection multiplies the measured tokens per question by 515 and divides by an assumed "
                    f"4090 prefill rate ({rates}); it is an estimate for the time budget, not a GPU measurement.", ""]


def score_lines(questions, results, config):
    """MC accuracy of the chosen answerer on the measured questions with first-stage vs reranked passages."""
    labels = scoring.read_labels()
    config = dataclasses.replace(config, passages=config.passages or ANSWER_PASSAGES, cascade=0.0)
    calibration = f"permute-{config.permutations}" if config.calibration == "permute" else config.calibration
    lines = ["## Answers with first-stage vs reranked passages (the same questions)", "",
             f"The chosen model with {config.passages} passage(s) (at most {answering.RAG_MAX_TOKENS} tokens) in every "
             f"prompt (no cascade), blend {retrieval.RERANK_BLEND}, calibration `{calibration}` (batch calibration "
             f"falls back to the content-free prior on fewer than {answering.BATCH_MIN} questions).", "",
             "| passages | MC accuracy | questions | s/question |", "|---|---|---|---|"]
    variants = [("first stage", None)] + [(mode, {r["id"]: r["chunks"] for r in results[mode]}) for mode in MODES]
    for name, ranked in variants:
        records, meta = answering.run(questions, OUT / f"answers-{name.replace(' ', '-')}", config, ranked=ranked)
        answers = dict(answering.submission_rows(questions, records, config.calibration, meta["content_free"]))
        acc = sum(answers[q.id] == labels[q.id]["Answer"] for q in questions) / len(questions)
        lines.append(f"| {name} | {acc:.3f} | {len(questions)} | {meta['seconds']['per_question']:.2f} |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make rerank-report")
    args = parser.parse_args()

    index = retrieval.load_index()
    items, _, _ = eval_retrieval.dev_items(eval_retrieval.catalogue(index.chunks))
    items = items[:EVAL_QUESTIONS]
    by_id = {q.id: q for q in competition.read_questions(common.QUESTIONS)}
    questions = [by_id[item["id"]] for item in items]
    config = answering.chosen()
    results, metas = {}, {}
    for mode in MODES:
        results[mode], metas[mode] = rerank(questions, mode)
    lines = [f"# Reranking with the answering LLM ({config.model})", "",
             f"Produced by `{args.command}`. {len(items)} development law questions whose `reference` names an "
             f"article (the first {EVAL_QUESTIONS} of them), {retrieval.RERANK_CANDIDATES} first-stage "
             f"({retrieval.SEARCH_METHOD}) candidates each, passages cut to {retrieval.RERANK_PASSAGE_TOKENS} tokens. "
             "A hit is a chunk of the cited law and article.", ""]
    lines += recall_lines(items, results, metas, index.chunks)
    lines += score_lines(questions, results, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_text(args.out, "\n".join(lines))
    print(f"rerank: wrote {args.out}")


if __name__ == "__main__":
    main()
