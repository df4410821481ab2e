"""Would a relevance gate help: passages in the prompt only where retrieval looks sure? Written as reports/gate.md.

Reads the `make select` points of the chosen configuration (selection.json, answering.chosen()): 05_quantize.py's
outputs/05_select/<candidate>-<level>-p0 (no passages) and -p<k> (first-stage passages from the index 05 built for
that candidate, outputs/05_select/index-<candidate>; k = PASSAGES or --passages for the gate, every finished k for
the first table), and data/prepared/{questions,labels}.csv. The answers come from the points' records: multiple
choice by answering.calibrated_answers under the chosen calibration (a point may hold more option shifts than that
calibration reads: the others are dropped; where a point lacks shifts it needs, as 05's CPU passage points do, every
point is scored under `batch`, the one-prompt calibration), descriptive by answering.clean_description. A gate at
threshold t answers a question from the point with passages when a BM25 signal of the question is at least t, else
from the point without; the two groups are calibrated separately, as a gated run would have to. No model runs here:
greedy scoring is deterministic, so a gated run would give the same log-probabilities. Reports, per signal, the MC
accuracy at several shares of questions given passages; the gain of a threshold chosen on one half of the questions
and measured on the other (GATE_SPLITS random halvings); the oracle gate, which gives passages exactly where a cited
article is among them; the accuracy without and with passages per domain, and two gates by document (the first
passage from a law; the law domain as an oracle); the descriptive score with and without passages beside the echo
baseline; and, first, every finished passage point against no passages. Run by `make gate-report`.
"""
import argparse
import dataclasses
import importlib
import json
import os
import random
from pathlib import Path

import numpy as np

import answering
import common
import competition
import eval_retrieval
import evaluate
import lm
import retrieval
import scoring

select_step = importlib.import_module("05_quantize")  # the names of its points and indexes

# ----------------------------------------------------------------------------- settings
SELECT = select_step.OUT  # 05_quantize.py's points and indexes (`make select`)
PASSAGES = 1  # the point with passages the gate reads beside the p0 one (one of 05's PASSAGES: the cheapest)
SHARES = [1.0, 0.5, 0.2, 0.1, 0.05, 0.0]  # share of the questions given passages (highest signal first)
GATE_SPLITS = 20  # random halvings for the held-out threshold choice
GRID = 20  # candidate thresholds: quantiles of the signal in steps of 1/GRID
LAW_KINDS = ("법률", "시행령", "시행규칙", "대통령령")  # chunk kinds of a law (retrieval.Chunk.kind; guidelines: 행정규칙)
LAW_DOMAIN = "금융보안법률"  # the labels' domain of the questions about the laws (the per-domain table's oracle gate)
# -----------------------------------------------------------------------------

SIGNALS = {"top": "top BM25 score", "margin": "top minus second BM25 score",
           "ratio": "top / second BM25 score", "per_token": "top BM25 score / query morphemes"}


def point_dirs(config, passages=PASSAGES):
    """(point without passages, point with passages, the index of the latter) of the config's candidate and level,
    named as 05_quantize.py names them."""
    def point(k):
        return SELECT / select_step.point_name(config.candidate, config.level, k)
    return point(0), point(passages), select_step.index_folder(config.candidate, SELECT)


def passage_points(config):
    """{k: folder} of the finished first-stage passage points (k >= 1) of the config's candidate and level."""
    found = {}
    for folder in SELECT.iterdir() if SELECT.exists() else []:
        parsed = select_step.parse_point_name(folder.name)
        if parsed and parsed[:2] == (config.candidate, config.level) and parsed[2] > 0 and not parsed[3] \
                and (folder / "DONE").exists():
            found[parsed[2]] = folder
    return dict(sorted(found.items()))


def load_point(folder):
    """(records by id, meta) of a finished select point; stops with what to run when it is missing."""
    if not (folder / "DONE").exists():
        raise SystemExit(f"{folder} has no finished run: run `make select` (it answers the development set at "
                         f"every point the gate reads: {folder.name} and its index).")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return lm.read_records(folder / meta["predictions"]), meta


def with_chosen_shifts(records, questions, config):
    """The multiple-choice records by id, each with only the option shifts the config's calibration reads."""
    keep = answering.shifts_for(questions, config)
    return {i: dict(r, shifts={s: lp for s, lp in r.get("shifts", {}).items() if int(s) in keep.get(i, [])})
            for i, r in records.items() if r["kind"] == "mc"}


def scorable(config, questions, runs):
    """The config when every run holds the option shifts its calibration reads, else `batch` (one prompt)."""
    keep = answering.shifts_for(questions, config)
    held = all(set(map(str, keep.get(i, []))) <= set(r.get("shifts", {})) for records in runs
               for i, r in records.items() if r["kind"] == "mc")
    return config if held else dataclasses.replace(config, calibration="batch", permutations=1, pride_share=0.0)


def signals(index, questions):
    """{id: {signal: value}} from the BM25 scores of each question over the index."""
    return {q.id: v for q, v in zip(questions, retrieval.bm25_signals(index, [q.text for q in questions]))}


def gated_answers(ids, use_rag, plain, rag, calibration):
    """MC answers when the questions in use_rag take the run with passages, each group calibrated on its own.
    plain, rag: (records by id, content-free prior) of the two runs."""
    answers = {}
    for (records, content_free), group in ((rag, [i for i in ids if i in use_rag]),
                                           (plain, [i for i in ids if i not in use_rag])):
        if group:
            answers.update(answering.calibrated_answers([records[i] for i in group], calibration, content_free))
    return answers


def accuracy(answers, labels):
    return sum(answers[i] == labels[i]["Answer"] for i in answers) / max(len(answers), 1)


def above(values, ids, threshold):
    return {i for i in ids if values[i] >= threshold}


def held_out_gain(values, ids, plain, rag, labels, calibration, seed=common.SEED):
    """Mean and SD over GATE_SPLITS halvings of: accuracy of the threshold that is best on one half, measured on
    the other half, minus the no-passage accuracy there (both directions of each halving)."""
    rng, gains = random.Random(seed), []
    ordered = sorted(values[i] for i in ids)
    grid = [ordered[int(len(ordered) * k / GRID)] for k in range(GRID)] + [float("inf")]

    def acc(group, use_rag):
        return accuracy(gated_answers(group, use_rag, plain, rag, calibration), labels)

    for _ in range(GATE_SPLITS):
        shuffled = list(ids)
        rng.shuffle(shuffled)
        halves = shuffled[:len(ids) // 2], shuffled[len(ids) // 2:]
        for train, test in (halves, halves[::-1]):
            best = max(grid, key=lambda t: acc(train, above(values, train, t)))
            gains.append(acc(test, above(values, test, best)) - acc(test, set()))
    return float(np.mean(gains)), float(np.std(gains))


def gate_lines(ids, values, plain, rag, labels, calibration):
    """The table of MC accuracy per signal and share given passages, with the held-out gain."""
    lines = ["| signal | " + " | ".join(f"passages for {s:.0%}" for s in SHARES) + " | held-out gain (mean ± SD) |",
             "|---|" + "---|" * (len(SHARES) + 1)]
    for name, label in SIGNALS.items():
        ranked = sorted(ids, key=lambda i: -values[i][name])
        cells = [accuracy(gated_answers(ids, set(ranked[:round(s * len(ids))]), plain, rag, calibration), labels)
                 for s in SHARES]
        mean, sd = held_out_gain({i: values[i][name] for i in ids}, ids, plain, rag, labels, calibration)
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {mean:+.3f} ± {sd:.3f} |")
    return lines


def oracle_lines(ids, index, rag_records, plain, rag, labels, calibration):
    """The oracle gate: passages exactly for the questions whose cited article is among them."""
    items, _, _ = eval_retrieval.dev_items(eval_retrieval.catalogue(index.chunks))
    golds = {item["id"]: set(item["golds"]) for item in items}
    hit = {i for i in ids if golds.get(i, set()) & {tuple(k) for k in rag_records[i]["context"]}}
    oracle = accuracy(gated_answers(ids, hit, plain, rag, calibration), labels)
    full_plain = gated_answers(ids, set(), plain, rag, calibration)
    full_rag = gated_answers(ids, set(ids), plain, rag, calibration)
    diff, se = scoring.mc_difference({i: full_rag[i] for i in hit}, {i: full_plain[i] for i in hit}, labels)
    return [f"**Oracle gate** (passages exactly for the {len(hit)} questions whose cited article is among their "
            f"passages, of {sum(i in golds for i in ids)} whose `reference` names an article): **{oracle:.3f}**. "
            f"On those {len(hit)} questions, passages change the accuracy by {diff:+.3f} ± {se:.3f} (paired SE; "
            "each run calibrated over all its questions).", ""]


def domain_lines(ids, rag_records, plain, rag, labels, calibration):
    """Where passages help: MC accuracy without and with them per domain / sub-domain of the labels (read for this
    table only: a test question carries no domain), then two gates by document: passages only where the first
    passage comes from a law rather than a guideline (knowable at test time), and only for the questions of the
    law domain (LAW_DOMAIN, an oracle: the label's domain)."""
    none = gated_answers(ids, set(), plain, rag, calibration)
    full = gated_answers(ids, set(ids), plain, rag, calibration)
    groups = {}
    for i in ids:
        groups.setdefault(f"{labels[i].get('domain', '?')} / {labels[i].get('sub_domain', '?')}", []).append(i)
    lines = ["## Per domain", "", "| domain / sub-domain | questions | no passages | passages | change ± SE |",
             "|---|---|---|---|---|"]
    for name, group in sorted(groups.items()):
        diff, se = scoring.mc_difference({i: full[i] for i in group}, {i: none[i] for i in group}, labels)
        lines.append(f"| {name} | {len(group)} | {accuracy({i: none[i] for i in group}, labels):.3f} | "
                     f"{accuracy({i: full[i] for i in group}, labels):.3f} | {diff:+.3f} ± {se:.3f} |")
    gates = {f"first passage from a law ({'/'.join(LAW_KINDS)}), not a guideline":
             {i for i in ids if rag_records[i]["context"] and rag_records[i]["context"][0][1] in LAW_KINDS},
             f"oracle: the question's domain is {LAW_DOMAIN}":
             {i for i in ids if labels[i].get("domain") == LAW_DOMAIN}}
    lines += ["", "| passages only where | questions with passages | MC accuracy | change vs passages for all ± SE |",
              "|---|---|---|---|"]
    for name, use in gates.items():
        gated = gated_answers(ids, use, plain, rag, calibration)
        diff, se = scoring.mc_difference(gated, full, labels)
        lines.append(f"| {name} | {len(use)} | {accuracy(gated, labels):.3f} | {diff:+.3f} ± {se:.3f} |")
    return lines + [""]


def desc_lines(questions, plain_records, rag_records, labels, passages):
    """Descriptive score without and with passages (paired difference) beside the echo baseline."""
    desc = [q for q in questions if q.kind == "desc"]
    if not desc:
        return []

    def cleaned(records):
        return {q.id: answering.clean_description(records[q.id]["raw"], q.text) for q in desc}

    runs = {"no passages": cleaned(plain_records), f"{passages} passages": cleaned(rag_records),
            "echo baseline (the question as the answer)": evaluate.echo_answers(desc, {q.id for q in desc})}
    lines = [f"## Descriptive answers ({len(desc)} questions, cosine: `{scoring.encoder_name()}`)", "",
             "| answers | cosine | keyword recall | descriptive score |", "|---|---|---|---|"]
    each = {}
    for name, answers in runs.items():
        each[name], parts = scoring.per_question(answers, labels)
        n = len(parts)
        lines.append(f"| {name} | {sum(c for c, _ in parts.values()) / n:.3f} | "
                     f"{sum(k for _, k in parts.values()) / n:.3f} | {sum(each[name].values()) / n:.3f} |")
    diff, se = scoring.paired(each[f"{passages} passages"], each["no passages"])
    return lines + ["", f"Passages change the descriptive score by {diff:+.3f} ± {se:.3f} (paired SE).", ""]


def points_lines(config, questions, labels, plain_dir):
    """One row per finished point (no passages, then each first-stage passage count): MC accuracy under one
    calibration every point holds, its change against no passages, the descriptive score and the seconds per
    multiple-choice prompt."""
    folders = {0: plain_dir, **passage_points(config)}
    runs = {k: load_point(folder) for k, folder in folders.items()}
    cal = scorable(config, questions, [records for records, _ in runs.values()])
    desc = [q for q in questions if q.kind == "desc" and all(q.id in records for records, _ in runs.values())]
    mc, each = {}, {}
    for k, (records, meta) in runs.items():
        mc[k] = answering.calibrated_answers(list(with_chosen_shifts(records, questions, cal).values()),
                                             cal.calibration, meta["content_free"])
        each[k], _ = scoring.per_question({q.id: answering.clean_description(records[q.id]["raw"], q.text)
                                           for q in desc}, labels)
    lines = [f"Every point of the chosen candidate and level (`{cal.calibration}` on all of them):", "",
             "| passages | MC accuracy | change vs none ± SE | descriptive | change vs none ± SE | s per MC prompt |",
             "|---|---|---|---|---|---|"]
    for k, (records, meta) in runs.items():
        mc_diff, mc_se = scoring.mc_difference(mc[k], mc[0], labels)
        desc_diff, desc_se = scoring.paired(each[k], each[0])
        per_prompt = (meta.get("timing") or {}).get("mc_s_per_prompt")
        lines.append(f"| {k} | {accuracy(mc[k], labels):.3f} | {mc_diff:+.3f} ± {mc_se:.3f} | "
                     f"{sum(each[k].values()) / max(len(each[k]), 1):.3f} | {desc_diff:+.3f} ± {desc_se:.3f} | "
                     f"{scoring.fmt(per_prompt, 2)} |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--passages", type=int, default=PASSAGES, help="the passage point the gate reads")
    parser.add_argument("--command", default="make gate-report")
    args = parser.parse_args()

    config = answering.chosen()
    labels = scoring.read_labels(common.LABELS)
    plain_dir, rag_dir, index_dir = point_dirs(config, args.passages)
    (plain_all, plain_meta), (rag_all, rag_meta) = load_point(plain_dir), load_point(rag_dir)
    if plain_meta["model"] != rag_meta["model"] or not rag_meta.get("rag") or plain_meta.get("rag"):
        raise SystemExit(f"{plain_dir} and {rag_dir} must be runs of one model without and with passages: "
                         "run `make select` again.")
    if not (index_dir / "DONE").exists():
        raise SystemExit(f"no index at {index_dir}: run `make select` (it builds the index of the point with "
                         "passages).")
    questions = competition.read_questions(common.QUESTIONS)
    scored = scorable(config, questions, [plain_all, rag_all])
    plain = (with_chosen_shifts(plain_all, questions, scored), plain_meta["content_free"])
    rag = (with_chosen_shifts(rag_all, questions, scored), rag_meta["content_free"])
    ids = [q.id for q in questions if q.id in plain[0] and q.id in rag[0] and q.id in labels]
    index = retrieval.load_index(index_dir)
    values = signals(index, [q for q in questions if q.id in set(ids)])
    cal, info = scored.calibration, rag_meta["rag"]
    why = "the chosen calibration" if scored == config else \
        f"the one-prompt calibration: the passage point lacks the option shifts of the chosen `{config.calibration}`"
    lines = ["# Relevance gate: passages only where retrieval looks sure", "",
             f"Produced by `{args.command}`. {len(ids)} development multiple-choice questions, model "
             f"`{rag_meta['model']}`; answers from the select points `{os.path.relpath(plain_dir, common.ROOT)}` (no "
             f"passages) and `{os.path.relpath(rag_dir, common.ROOT)}` ({info['passages']} {info['method']} passages, "
             f"{info['max_tokens']} tokens, no LLM reranking). Each group calibrated on its own (`{cal}`, {why}). "
             f"One question = {1 / len(ids):.3f}.", ""]
    lines += points_lines(config, questions, labels, plain_dir)
    lines += [f"No passages: **{accuracy(gated_answers(ids, set(), plain, rag, cal), labels):.3f}**. Passages for "
              f"every question: **{accuracy(gated_answers(ids, set(ids), plain, rag, cal), labels):.3f}**.", ""]
    lines += gate_lines(ids, values, plain, rag, labels, cal) + [""]
    lines += oracle_lines(ids, index, rag_all, plain, rag, labels, cal)
    lines += domain_lines(ids, rag_all, plain, rag, labels, cal)
    answered = [q for q in questions if q.id in plain_all and q.id in rag_all and q.id in labels]
    lines += desc_lines(answered, plain_all, rag_all, labels, args.passages)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_text(args.out, "\n".join(lines))
    print(f"eval_gate: -> {args.out}")


if __name__ == "__main__":
    main()
