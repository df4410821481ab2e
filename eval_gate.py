"""Would a relevance gate help: passages in the prompt only where retrieval looks sure? Written as reports/gate.md.

Reads two finished 04_infer.py runs of the same model on the development set, one without passages and one with
them (`make rag-report` writes both), the index (`make index`) and data/prepared/{questions,labels}.csv. A gate
at threshold t answers a question from the run with passages when a BM25 signal of the question is at least t,
else from the run without; the two groups are calibrated separately (04's CALIBRATION, each with its own option
prior), as a gated 04 run would have to. No model runs here: the answers are the two runs' records, and greedy
scoring is deterministic, so a gated run would give the same log-probabilities. Reports, per signal, the MC
accuracy at several shares of questions given passages; the gain of a threshold chosen on one half of the
questions and measured on the other (GATE_SPLITS random halvings); and the oracle gate, which gives passages
exactly where a cited article is among them. Run by `make gate-report`.
"""
import argparse
import importlib
import random
from pathlib import Path

import numpy as np

import common
import competition
import evaluate

# ----------------------------------------------------------------------------- settings
PLAIN_RUN = common.OUTPUTS / "baseline" / "student"  # no passages
RAG_RUN = common.OUTPUTS / "baseline" / "rag"  # 3 first-stage passages, same model
SHARES = [1.0, 0.5, 0.2, 0.1, 0.05, 0.0]  # share of the questions given passages (highest signal first)
GATE_SPLITS = 20  # random halvings for the held-out threshold choice
GRID = 20  # candidate thresholds: quantiles of the signal in steps of 1/GRID
# -----------------------------------------------------------------------------

infer = importlib.import_module("04_infer")
build_index = importlib.import_module("02_build_index")
retrieval = importlib.import_module("eval_retrieval")
SIGNALS = {"top": "top BM25 score", "margin": "top minus second BM25 score",
           "ratio": "top / second BM25 score", "per_token": "top BM25 score / query morphemes"}


def signals(index, questions):
    """{id: {signal: value}} from the BM25 scores of each question over the index."""
    tokens = build_index.morphemes(index.kiwi, [q.text for q in questions])
    out = {}
    for q, toks in zip(questions, tokens):
        top = np.sort(index.bm25.scores(toks))[::-1][:2]
        first, second = float(top[0]), float(top[1]) if len(top) > 1 else 0.0
        out[q.id] = dict(top=first, margin=first - second, ratio=first / second if second > 0 else float("inf"),
                         per_token=first / max(len(toks), 1))
    return out


def gated_answers(ids, use_rag, plain, rag):
    """MC answers when the questions in use_rag take the run with passages, each group calibrated on its own.
    plain, rag: (records by id, content-free prior) of the two runs."""
    answers = {}
    for (records, content_free), group in ((rag, [i for i in ids if i in use_rag]),
                                           (plain, [i for i in ids if i not in use_rag])):
        if group:
            answers.update(infer.calibrated_answers([records[i] for i in group], infer.CALIBRATION, content_free))
    return answers


def accuracy(answers, labels):
    return sum(answers[i] == labels[i]["Answer"] for i in answers) / max(len(answers), 1)


def above(values, ids, threshold):
    return {i for i in ids if values[i] >= threshold}


def held_out_gain(values, ids, plain, rag, labels, seed=common.SEED):
    """Mean and SD over GATE_SPLITS halvings of: accuracy of the threshold that is best on one half, measured on
    the other half, minus the no-passage accuracy there (both directions of each halving)."""
    rng, gains = random.Random(seed), []
    ordered = sorted(values[i] for i in ids)
    grid = [ordered[int(len(ordered) * k / GRID)] for k in range(GRID)] + [float("inf")]
    for _ in range(GATE_SPLITS):
        shuffled = list(ids)
        rng.shuffle(shuffled)
        halves = shuffled[:len(ids) // 2], shuffled[len(ids) // 2:]
        for train, test in (halves, halves[::-1]):
            best = max(grid, key=lambda t: accuracy(gated_answers(train, above(values, train, t), plain, rag),
                                                    labels))
            gains.append(accuracy(gated_answers(test, above(values, test, best), plain, rag), labels)
                         - accuracy(gated_answers(test, set(), plain, rag), labels))
    return float(np.mean(gains)), float(np.std(gains))


def load(run_dir):
    _, meta, records = evaluate.load_run(run_dir)
    return {r["id"]: r for r in records if r["kind"] == "mc"}, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make gate-report")
    args = parser.parse_args()

    labels = evaluate.read_labels()
    (plain_records, plain_meta), (rag_records, rag_meta) = load(PLAIN_RUN), load(RAG_RUN)
    if plain_meta["model"] != rag_meta["model"] or not rag_meta.get("rag") or plain_meta.get("rag"):
        raise SystemExit(f"{PLAIN_RUN} and {RAG_RUN} must be runs of one model without and with passages: "
                         "run `make rag-report` first.")
    ids = [i for i in plain_records if i in rag_records and i in labels]
    plain, rag = (plain_records, plain_meta["content_free"]), (rag_records, rag_meta["content_free"])
    index = build_index.load_index()
    questions = [q for q in competition.read_questions(common.QUESTIONS) if q.id in set(ids)]
    values = signals(index, questions)

    none = accuracy(gated_answers(ids, set(), plain, rag), labels)
    lines = ["# Relevance gate: passages only where retrieval looks sure", "",
             f"Produced by `{args.command}`. {len(ids)} development multiple-choice questions, model "
             f"`{rag_meta['model']}`; answers from `{PLAIN_RUN.relative_to(common.ROOT)}` (no passages) and "
             f"`{RAG_RUN.relative_to(common.ROOT)}` ({rag_meta['rag']['passages']} {rag_meta['rag']['method']} "
             f"passages, {rag_meta['rag']['max_tokens']} tokens). Each group calibrated on its own "
             f"(`{infer.CALIBRATION}`). One question = {1 / len(ids):.3f}.", "",
             f"No passages: **{none:.3f}**. Passages for every question: "
             f"**{accuracy(gated_answers(ids, set(ids), plain, rag), labels):.3f}**.", "",
             "| signal | " + " | ".join(f"passages for {s:.0%}" for s in SHARES) + " | held-out gain (mean ± SD) |",
             "|---|" + "---|" * (len(SHARES) + 1)]
    for name, label in SIGNALS.items():
        ranked = sorted(ids, key=lambda i: -values[i][name])
        cells = [accuracy(gated_answers(ids, set(ranked[:round(s * len(ids))]), plain, rag), labels) for s in SHARES]
        mean, sd = held_out_gain({i: values[i][name] for i in ids}, ids, plain, rag, labels)
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {mean:+.3f} ± {sd:.3f} |")

    items, _, _ = retrieval.dev_items(retrieval.catalogue(index.chunks))
    golds = {item["id"]: set(item["golds"]) for item in items}
    hit = {i for i in ids if golds.get(i, set()) & {tuple(k) for k in rag_records[i]["context"]}}
    oracle = accuracy(gated_answers(ids, hit, plain, rag), labels)
    full_plain = gated_answers(ids, set(), plain, rag)
    full_rag = gated_answers(ids, set(ids), plain, rag)
    diff, se = evaluate.mc_difference({i: full_rag[i] for i in hit}, {i: full_plain[i] for i in hit}, labels)
    lines += ["", f"**Oracle gate** (passages exactly for the {len(hit)} questions whose cited article is among their "
              f"passages, of {sum(i in golds for i in ids)} whose `reference` names an article): **{oracle:.3f}**. "
              f"On those {len(hit)} questions, passages change the accuracy by {diff:+.3f} ± {se:.3f} (paired SE; "
              "each run calibrated over all its questions).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    build_index.write_atomic(args.out, "\n".join(lines))
    print(f"eval_gate: -> {args.out}")


if __name__ == "__main__":
    main()
