"""Reranking quality and cost on the development law questions, written as reports/rerank.md.

Reads outputs/02_index/ (`make index`), data/prepared/{questions,labels}.csv and the answering model. Takes the
first EVAL_QUESTIONS development questions whose `reference` names a law article (eval_retrieval.py parses it),
reranks their first-stage candidates pointwise and listwise with 03_rerank.py (checkpointed under
outputs/eval_rerank/), and reports recall@1/3/5 and MRR of the first stage, each reranker alone and blended,
the seconds and tokens per question on this CPU, the projected cost for 515 questions on a GPU, and the
multiple-choice accuracy of the answers on the same questions with first-stage vs reranked passages.
Run by `make rerank-report`.
"""
import argparse
import importlib
import time
from pathlib import Path

import common
import competition

# ----------------------------------------------------------------------------- settings
EVAL_QUESTIONS = 60  # law questions measured on this CPU (about 15 s each on a quiet CPU); all of them on a GPU
KS = (1, 3, 5)
MODES = ["pointwise", "listwise"]
BLENDS = [1.0, 0.7, 0.5]  # weight of the LLM score against the first stage (03_rerank.BLEND is the default)
ANSWER_PASSAGES = 3  # passages in the answer prompt for the score comparison (04's RAG_PASSAGES may be 0: no passages)
TEST_QUESTIONS = 515  # the competition test
# Assumed prefill throughput on one RTX 4090 (bf16, tokens/s), used only for the projection: not measured here.
GPU_PREFILL_TOKENS_PER_S = {"0.5B": 60_000, "7B": 9_000}
OUT = common.OUTPUTS / "eval_rerank"
# -----------------------------------------------------------------------------

rerank = importlib.import_module("03_rerank")
retrieval = importlib.import_module("eval_retrieval")
build_index = importlib.import_module("02_build_index")


def ranks_of(orders, items, chunks):
    """First rank (1-based) of a gold article in each question's ordered chunk ids, None when absent."""
    return [retrieval.first_rank([chunks[i].key for i in order], item["golds"]) for order, item in zip(orders, items)]


def summary(ranks):
    n = len(ranks)
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in KS}
    out["MRR"] = sum(1 / r for r in ranks if r is not None) / n
    return out


def table_row(name, m, extra=""):
    return f"| {name} | " + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in KS) + f" | {m['MRR']:.3f} |{extra}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make rerank-report")
    args = parser.parse_args()

    index = build_index.load_index()
    docs = retrieval.catalogue(index.chunks)
    items, _, _ = retrieval.dev_items(docs)
    items = items[:EVAL_QUESTIONS]
    by_id = {q.id: q for q in competition.read_questions(common.QUESTIONS)}
    questions = [by_id[item["id"]] for item in items]
    model_id = common.answer_model()
    results, metas = {}, {}
    for mode in MODES:
        t0 = time.time()
        records, meta = rerank.run(questions, OUT / mode, model_id, mode)
        metas[mode] = dict(meta, wall=time.time() - t0)
        results[mode] = records
    first = [r["first_stage"] for r in results[MODES[0]]]
    lines = [f"# Reranking with the answering LLM ({model_id})", "",
             f"Produced by `{args.command}`. {len(items)} development law questions whose `reference` names an "
             f"article (the first {EVAL_QUESTIONS} of them), {rerank.CANDIDATES} fused first-stage candidates each, "
             f"passages cut to {rerank.PASSAGE_TOKENS} tokens. A hit is a chunk of the cited law and article.", "",
             "| order | " + " | ".join(f"recall@{k}" for k in KS) + " | MRR |", "|---|" + "---|" * (len(KS) + 1),
             table_row("first stage (fused)", summary(ranks_of(first, items, index.chunks)))]
    for mode in MODES:
        records = results[mode]
        for weight in BLENDS:
            orders = [[r["first_stage"][i] for i in rerank.blend(r["llm_scores"], r["first_scores"], weight)]
                      if r["llm_scores"] else r["first_stage"] for r in records]
            label = f"{mode}, LLM only" if weight == 1.0 else f"{mode}, blend {weight}"
            lines.append(table_row(label, summary(ranks_of(orders, items, index.chunks))))
    lines += ["", "| mode | s/question (this CPU) | tokens/question | failures | projected 515 q on a 4090 |",
              "|---|---|---|---|---|"]
    for mode in MODES:
        m = metas[mode]
        tokens = m["tokens_per_question"] * TEST_QUESTIONS
        projected = ", ".join(f"{size}: {tokens / tps / 60:.1f} min" for size, tps in GPU_PREFILL_TOKENS_PER_S.items())
        lines.append(f"| {mode} | {m['seconds']['per_question']:.2f} | {m['tokens_per_question']:.0f} | "
                     f"{m['failures']} | {projected} |")
    lines += ["", "The projection multiplies the measured tokens per question by 515 and divides by an assumed "
              "4090 prefill rate (" + ", ".join(f"{k} {v:,} tokens/s" for k, v in GPU_PREFILL_TOKENS_PER_S.items())
              + "); it is an estimate for the time budget, not a GPU measurement.", ""]
    lines += score_lines(questions, results, model_id)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    print(f"rerank: wrote {args.out}")


def score_lines(questions, results, model_id):
    """MC accuracy of the answering model on the measured questions with first-stage vs reranked passages."""
    infer = importlib.import_module("04_infer")
    evaluate = importlib.import_module("evaluate")
    labels = evaluate.read_labels()
    infer.RAG_PASSAGES = ANSWER_PASSAGES  # the same override as 04_infer.py --passages
    lines = ["## Answers with first-stage vs reranked passages (the same questions)", "",
             f"{infer.RAG_PASSAGES} passages ({infer.RAG_MAX_TOKENS} tokens) in the prompt, blend {rerank.BLEND}, "
             f"calibration `{infer.CALIBRATION}` (batch calibration falls back to the content-free prior on fewer than "
             f"{infer.BATCH_MIN} questions).", "",
             "| passages | MC accuracy | questions | s/question |", "|---|---|---|---|"]
    variants = [("first stage", None)] + [(mode, {r["id"]: r["chunks"] for r in results[mode]}) for mode in MODES]
    for name, ranked in variants:
        records, meta = infer.run(questions, OUT / f"answers-{name.replace(' ', '-')}", model_id, rag=True,
                                  ranked=ranked)
        answers = dict(infer.submission_rows(questions, records, infer.CALIBRATION, meta["content_free"]))
        acc = sum(answers[q.id] == labels[q.id]["Answer"] for q in questions) / len(questions)
        lines.append(f"| {name} | {acc:.3f} | {len(questions)} | {meta['seconds']['per_question']:.2f} |")
    return lines + [""]


if __name__ == "__main__":
    main()
