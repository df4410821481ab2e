"""Choose the answering configuration: candidate model x quantization level x option calibration x passages, each
scored on the full development set; the best within the device's time budget is written to selection.json.

Reads the development questions and labels straight from the shared eval folder (common.SHARED; a data/test.csv in
place changes nothing), the candidate models that exist (common.candidates(): the student, the teacher, and the
DistiLLM-2 student once `make distill` has merged it) and builds its own index per passage candidate. Every point is
a 04-style run (answering.run) in a child process of its own (clean peak memory; a failing level is listed, not
fatal), checkpointed in outputs/05_select/<point>/, so a rerun measures only what is missing. Three stages
(`--stages 1,3`, `make select SELECT_STAGES=1,3`: a subset; stage 1 always runs):
  1. every candidate at the "float" level, multiple choice scored under all n cyclic option shifts, so each
     calibration (none, content_free, batch, auto, permute k, pride share) is scored from the same records;
  2. every other level the device runs (LEVELS, or those of `--levels`, `make select SELECT_LEVELS=fp32,bnb-nf4`),
     for the candidates the stage-1 best does not beat beyond the noise, scored under the best stage-1 calibration;
     a level whose first PROBE_QUESTIONS project beyond the budget stops;
  3. PASSAGES for the best point so far, from an index embedded by that candidate, its options scored in the
     PASSAGE_PERMUTATIONS orders of the device: first the first stage's passages (point
     <candidate>-<level>-p<k>, rerank false), then 03's LLM reranking of them (<...>-p<k>-rerank: the development
     questions reranked by 03_rerank.run; its probe reranks RERANK_PROBE of them for the timing), each stopping
     when its probe projects beyond the budget, as in stage 2 (a first-stage point goes on when the cascade at the
     lowest CASCADE threshold, composed from the p0 point's answers and the probe's times, fits). Each first-stage
     passage point and the p0 point of the same candidate and level also make CASCADE points, composed from their
     records with no run of their own
     (answering.Config.cascade: the passages only where the answer without them is unsure; -p<k>-cascade<t>, its
     passage prompt read in the identity order (calibration none) or as the mean of its first k orders (permute-k)).
Projected time of the 515-question test = load + 500 x (s of the identity prompt + (MC prompts per question - 1) x s
of a shifted one) + 15 x descriptive s
(+ building the index for a point with passages, + 515 x reranking s for a reranked point), all measured on this
machine. Choice: the highest score within the budget; a point the best does not beat by more than
max(SCORE_TOLERANCE, NOISE_Z x paired SE) is tied with it, and the fastest tied point wins. Writes selection.json (the
configuration, its figures, the date and the machine: committed, so `make submission` reproduces it without
measuring) and reports/select.md. Run by `make select`; `--rescore` (`make reselect`) runs no model and chooses again
among the points already finished in outputs/05_select (after a change to the choice rule, or a point run on its own).
"""
import argparse
import dataclasses
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import answering
import common
import competition
import lm
import retrieval
import scoring

# ----------------------------------------------------------------------------- settings
LEVELS = dict(cpu=["float", "fp32", "bnb-nf4", "bnb-nf4-dq", "bnb-int8", "torchao-int8wo", "torch-int8-dynamic",
                   "fp16"],
              cuda=["float", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "torchao-int8wo", "fp16"])  # per device kind
PERMUTE_K = [2, 3, 4, 5]  # permute calibrations scored (k cyclic shifts per question, at most its option count)
PRIDE_SHARES = [0.1, 0.2, 0.4]  # pride calibrations scored (share of questions estimating the position prior)
PASSAGES = [1, 3]  # stage 3: passage counts tried for the best point (0 is the stage 1-2 baseline), each first with
# the first stage's passages, then reranked by 03 (on this 2-core CPU the teacher's p1 already projects beyond 45 min
# with its index: reports/gate.md)
RERANK_PROBE = 6  # stage 3: a reranked point's probe reranks this many questions to time 03 (the rest of its probe
# answers with first-stage passages: the same prompt lengths)
PASSAGE_PERMUTATIONS = dict(cpu=2, cuda=0)  # stage 3 scores every question in this many cyclic option orders (0:
# the best calibration's, at least 2): a shifted prompt reuses the passage prompt's cache (answering.answer_mc), so one
# run scores the identity calibrations, permute k and the cascades that compare the passage prompt's permute mean
# (cascade_rows). On this CPU a further order adds 0.73 s to the teacher's 4.1 s passage prompt (2026-12-07): 2 only
BUDGET_HOURS = dict(cpu=0.75, cuda=4.5)  # the whole 515-question test; cpu: what a user waits for (issue 16)
SAFETY_MARGIN = dict(cpu=1.0, cuda=0.8)  # choose only among points projected within this share of the budget
PROBE_QUESTIONS = 24  # every point is first timed on this many MC questions (+ one descriptive batch) in a run of
# its own: a long scoring run that shared the CPU does not set the projected time, and a stage-2 level whose probe
# projects beyond the budget stops there
CASCADE = [0.5, 0.8, 1.0]  # cascade thresholds scored from a candidate's finished p0 and first-stage p<k> points, no
# model run (answering.Config.cascade: passages only where the answer without them is less sure than this)
SCORE_TOLERANCE = 0.005  # scores this close count as a tie: the faster point wins
NOISE_Z = 1.0  # ... and so do scores within this many standard errors of their paired difference
OUT = common.OUTPUTS / "05_select"
# -----------------------------------------------------------------------------
rerank_step = importlib.import_module("03_rerank")
TEST_MC, TEST_DESC, TEST_FIVE = competition.TEST_MC, competition.TEST_DESC, competition.TEST_FIVE


# ----------------------------------------------------------------------------- the development set
def dev_set():
    """(parsed questions, labels by id) of the whole development set."""
    rows, labels = scoring.dev_question_set(common.SHARED / "eval")
    return [competition.parse_question(r["ID"], r["Question"]) for r in rows], {r["ID"]: r for r in labels}


# ----------------------------------------------------------------------------- points: one answering run each
def point_name(candidate, level, passages, rerank=False):
    return f"{candidate}-{level}-p{passages}" + ("-rerank" if passages and rerank else "")


def parse_point_name(name):
    """(candidate, level, passages, rerank) of a folder named by point_name; None for any other name (an index)."""
    levels = "|".join(map(re.escape, lm.LEVELS))
    match = re.fullmatch(rf"(.+)-({levels})-p(\d+)(-rerank)?", name)
    return match and (match.group(1), match.group(2), int(match.group(3)), bool(match.group(4)))


def index_folder(candidate, out=None):
    """Where 05 builds the index a candidate embeds (one LLM embeds, reranks and answers): out (default OUT)."""
    return (out or OUT) / f"index-{candidate}"


def point_config(candidate, level, passages, n_max, like=None):
    """The Config a point is run with: all n_max shifts ("permute" with n_max, stage 1), or the shifts the
    calibration of the Config `like` needs."""
    if like is None:
        return answering.Config(candidate=candidate, level=level, calibration="permute", permutations=n_max,
                                passages=passages)
    return dataclasses.replace(like, candidate=candidate, level=level, passages=passages)


def as_config(fields):
    """The answering.Config of a row's config fields."""
    names = [f.name for f in dataclasses.fields(answering.Config)]
    return answering.Config(**{name: fields[name] for name in names if name in fields})


def run_point(config, folder, limit=0, index_dir=None):
    """Answer the development set (its first `limit` questions when given) under config in a child process; True
    when it finished."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(dataclasses.asdict(config)),
           "--dir", str(folder), "--limit", str(limit)] + (["--index", str(index_dir)] if index_dir else [])
    return subprocess.run(cmd, cwd=common.ROOT).returncode == 0


def child_point(config_json, folder, limit, index_dir):
    """(child) answering.run over the development set (a timing probe with limit) into folder; DONE when the whole
    set was answered."""
    config = answering.Config(**json.loads(config_json))
    questions, _ = dev_set()
    if limit:  # a timing probe: the first `limit` multiple-choice questions and one batch of descriptive ones
        questions = ([q for q in questions if q.kind == "mc"][:limit]
                     + [q for q in questions if q.kind == "desc"][:answering.DESC_BATCH])
    ranked = None
    if config.passages and config.rerank:
        reading = rerank_step.to_rerank(questions)
        ranked = reranked(config, reading[:RERANK_PROBE] if limit else reading, index_dir, folder)
    answering.run(questions, folder, config, ranked=ranked, index_dir=index_dir)
    if not limit:
        (folder / "DONE").touch()


def reranked(config, questions, index_dir, folder):
    """(child) 03's LLM reranking of the questions' first-stage candidates (03_rerank.run, checkpointed in
    folder/rerank) -> {id: kept chunk ids}; its seconds per question -> folder/rerank.json."""
    records, meta = rerank_step.run(questions, folder / "rerank", config, index_dir=index_dir)
    common.write_text(folder / "rerank.json", json.dumps(dict(
        questions=len(questions), mode=meta["mode"], candidates=retrieval.RERANK_CANDIDATES,
        s_per_question=meta["seconds"]["per_question"], tokens_per_question=meta["tokens_per_question"])))
    return {r["id"]: r["chunks"][:retrieval.RERANK_KEEP] for r in records}


def build_index(candidate, folder):
    """An index embedded by the candidate (one LLM embeds, reranks and answers), built by 02_build_index.py."""
    if not (folder / "DONE").exists():
        subprocess.run([sys.executable, str(common.ROOT / "02_build_index.py"), "--model", candidate, "--out",
                        str(folder)], cwd=common.ROOT, check=True)
    return folder


def load_point(folder):
    """(records by id, meta) of a finished point, None when it has not finished. meta's timing, load and load
    average are its probe's (folder/probe) when there is one."""
    if not (folder / "DONE").exists():
        return None
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    now = stale_key(meta)
    if now:
        print(f"05: {folder.name} was answered under other weights, prompts or option logits (key {meta['key']}, "
              f"now {now}): left out; run its point again (`make select`)")
        return None
    probe = folder / "probe" / "meta.json"
    if probe.exists():
        timed = json.loads(probe.read_text(encoding="utf-8"))
        meta = dict(meta, timing=timed["timing"], load_average=timed["load_average"],
                    seconds=dict(meta["seconds"], load=timed["seconds"]["load"]))
    return lm.read_records(folder / meta["predictions"]), dict(meta, rerank_s=rerank_seconds(folder / "probe"))


def stale_key(meta):
    """The config key a point's run would have now when it differs from the one it was answered under (the model's
    weights, the prompts or lm.OPTION_LOGITS changed since), else None. Older metas without a key are not checked."""
    if not meta.get("key"):
        return None
    key = answering.config_key(meta["model"], meta["dtype"], meta["config"]["level"], meta.get("rag"))
    return key if key != meta["key"] else None


def rerank_seconds(probe):
    """The reranking seconds per question a probe timed (0.0 without passages)."""
    path = probe / "rerank.json"
    return json.loads(path.read_text(encoding="utf-8"))["s_per_question"] if path.exists() else 0.0


def index_seconds(index_dir):
    """The seconds 02 took to build the index at index_dir (`make submission` builds it first); 0.0 without an index
    or a recorded time."""
    if not index_dir:
        return 0.0
    meta = json.loads((Path(index_dir) / "meta.json").read_text(encoding="utf-8"))
    return (meta.get("seconds") or {}).get("total", 0.0)


def probe_point(config, folder, index_dir=None):
    """Time a point on PROBE_QUESTIONS questions in folder/probe; its meta (None when the probe failed)."""
    probe = folder / "probe"
    if not run_point(config, probe, PROBE_QUESTIONS, index_dir) or not (probe / "meta.json").exists():
        return None
    return dict(json.loads((probe / "meta.json").read_text(encoding="utf-8")), rerank_s=rerank_seconds(probe),
                index_s=index_seconds(index_dir))


# ----------------------------------------------------------------------------- calibrations scored offline
def scored_in(records, k):
    """Whether every multiple-choice record has its first min(k, n) option orders (the identity and k - 1 shifts)."""
    return all(len(r.get("shifts", {})) + 1 >= min(k, len(r["logprobs"])) for r in records if r["kind"] == "mc")


def calibration_variants(records, questions):
    """{name: (Config fields of the calibration, records as that calibration would have them)} for every
    calibration the records allow: identity-based ones always; permute k and pride share when shifts are there."""
    n_max = max(len(q.options) for q in questions if q.kind == "mc")
    out = {m: (dict(calibration=m, permutations=1, pride_share=0.0), records)
           for m in ("none", "content_free", "batch", "auto")}
    for k in PERMUTE_K:
        if 2 <= k <= n_max and scored_in(records, k):
            out[f"permute-{k}"] = (dict(calibration="permute", permutations=k, pride_share=0.0),
                                   [answering.only_shifts(r, range(1, k)) for r in records])
    if scored_in(records, n_max):
        for share in PRIDE_SHARES:
            estimate = answering.pride_questions(questions, share)
            out[f"pride-{share}"] = (dict(calibration="pride", permutations=n_max, pride_share=share),
                                     [answering.only_shifts(r, range(1, 99) if r["id"] in estimate else ())
                                      for r in records])
    return out


def test_prompts_per_question(fields):
    """Multiple-choice prompts per test question under a calibration (the test mixes 4 and 5 options); 1 for a
    cascade, whose composed timing is already the whole question's (cascade_rows)."""
    five = TEST_FIVE / TEST_MC
    if fields.get("cascade"):
        return 1.0
    if fields["calibration"] == "permute":
        return (1 - five) * min(fields["permutations"], 4) + five * min(fields["permutations"], 5)
    if fields["calibration"] == "pride":
        estimated = max(fields["pride_share"], answering.BATCH_MIN // 5 / (TEST_MC / 2))
        return 1 + estimated * ((1 - five) * 3 + five * 4)
    return 1.0


def projected_seconds(meta, fields, rerank_s=0.0):
    """Time for the 515-question test under these calibration fields: the index build (meta's index_s, passages
    only) + load + MC prompts + descriptive answers, with the per-prompt and per-question times this point measured
    (and reranking per question that reads passages for a reranked point)."""
    timing = meta.get("timing") or {}
    mc_s = answering.mc_question_seconds(timing, test_prompts_per_question(fields))
    desc_s = timing.get("desc_s_per_question") or 0.0
    desc_rerank_s = rerank_s if answering.DESC_PASSAGES else 0.0
    return (meta.get("index_s", 0.0) + meta["seconds"]["load"] + TEST_MC * (mc_s + rerank_s)
            + TEST_DESC * (desc_s + desc_rerank_s))


def score_point(name, records, meta, questions, labels, desc_cache):
    """Rows (one per calibration) of a finished point: answers, per-question scores, score, projected time."""
    by_id = {r["id"]: r for r in records.values()}
    recs = [by_id[q.id] for q in questions]
    desc_answers = {q.id: answering.clean_description(by_id[q.id]["raw"], q.text) for q in questions
                    if q.kind == "desc"}
    key = (name, meta["key"])
    if key not in desc_cache:  # descriptive answers do not depend on the calibration: embedded once per point
        desc_cache[key] = scoring.per_question(desc_answers, labels)
    desc_each, parts = desc_cache[key]
    rows = []
    for cal, (fields, variant) in calibration_variants(recs, questions).items():
        answers = answering.calibrated_answers(variant, fields["calibration"], meta["content_free"])
        each = dict(desc_each, **{i: float(a == labels[i]["Answer"]) for i, a in answers.items()})
        mc = [each[i] for i in answers]
        desc = list(desc_each.values())
        rows.append(dict(point=name, calibration=cal, config=dict(meta["config"], **fields), each=each,
                         answers=dict(desc_answers, **answers), mc_acc=sum(mc) / len(mc),
                         desc_score=sum(desc) / len(desc) if desc else None,
                         cosine=sum(c for c, _ in parts.values()) / len(parts) if parts else None,
                         keyword_recall=sum(k for _, k in parts.values()) / len(parts) if parts else None,
                         score=scoring.W_MC * sum(mc) / len(mc) + scoring.W_DESC * (sum(desc) / len(desc)
                                                                                    if desc else 0.0),
                         projected_s=projected_seconds(meta, fields, meta.get("rerank_s", 0.0)),
                         load_s=meta["seconds"]["load"],
                         dtype=meta["dtype"], device=meta["device"],
                         peak_gib=meta.get("peak_gpu_gib") or meta.get("peak_rss_gib"),
                         load_average=meta.get("load_average"), timing=meta.get("timing")))
    return rows


# ----------------------------------------------------------------------------- the choice
def beats(a, b, labels, tolerance=SCORE_TOLERANCE, z=NOISE_Z):
    """True when row a scores above row b by more than max(tolerance, z x the paired standard error)."""
    diff, se = scoring.score_difference(a["each"], b["each"], labels)
    return diff > max(tolerance, z * se)


def select(rows, labels, budget_s):
    """(chosen row, rows tied with the best, warning or None): the best score among rows projected within the
    budget; rows the best does not beat beyond the noise are tied with it and the fastest of them wins. When none
    fits, the fastest row, with a warning."""
    if not rows:
        raise SystemExit("05: nothing was measured: see the messages above.")
    inside = [r for r in rows if r["projected_s"] <= budget_s]
    if not inside:
        fastest = min(rows, key=lambda r: r["projected_s"])
        return fastest, [fastest], (f"no point is projected within the budget ({budget_s / 60:.0f} min): chose the "
                                    f"fastest, {fastest['point']} {fastest['calibration']}")
    best = max(inside, key=lambda r: r["score"])
    tied = [r for r in inside if not beats(best, r, labels)]
    return min(tied, key=lambda r: r["projected_s"]), tied, None


def alternatives(rows, labels, chosen, n=8):
    """Configurations a slower machine falls back to (answering.chosen rescales their times): the chosen one, then
    the best score in each faster time band, each with its score and projected time."""
    faster = sorted((r for r in rows if r["projected_s"] < chosen["projected_s"]), key=lambda r: -r["score"])
    out, limit = [chosen], chosen["projected_s"]
    for r in faster:
        if r["projected_s"] < limit and len(out) < n:
            out.append(r)
            limit = r["projected_s"]
    return [dict(config=r["config"], score=round(r["score"], 4), projected_s=round(r["projected_s"], 1))
            for r in out]


def dev_seconds(row, labels):
    """Measured time of the row's configuration for the whole development set (load, prompts, descriptive)."""
    timing, n_mc = row["timing"] or {}, sum(labels[i]["kind"] == "mc" for i in row["each"])
    prompts = test_prompts_per_question(row["config"]) if row["config"]["calibration"] != "permute" \
        or row["config"].get("cascade") else min(row["config"]["permutations"], 4)  # dev items have four options
    return (row["load_s"] + n_mc * answering.mc_question_seconds(timing, prompts)
            + (len(row["each"]) - n_mc) * (timing.get("desc_s_per_question") or 0.0))


def write_selection(chosen, tied, rows, labels, budget_s, device, command):
    """selection.json: the configuration, its dev figures, the alternatives for slower machines, the machine."""
    best = max(rows, key=lambda r: r["score"])
    diff, se = scoring.score_difference(best["each"], chosen["each"], labels)
    measured = json.loads(common.MACHINE.read_text(encoding="utf-8")) if common.MACHINE.exists() else {}
    selection = dict(
        config=dataclasses.asdict(as_config(chosen["config"])),
        figures=dict(score=round(chosen["score"], 4), mc_acc=round(chosen["mc_acc"], 4),
                     desc_score=None if chosen["desc_score"] is None else round(chosen["desc_score"], 4),
                     cosine=None if chosen["cosine"] is None else round(chosen["cosine"], 4),
                     keyword_recall=None if chosen["keyword_recall"] is None else round(chosen["keyword_recall"], 4),
                     encoder=scoring.encoder_name(), best_score=round(best["score"], 4),
                     best_minus_chosen=round(diff, 4), best_minus_chosen_se=round(se, 4), dtype=chosen["dtype"],
                     projected_s=round(chosen["projected_s"], 1), budget_s=budget_s, points=len(rows),
                     asked_share=None if chosen.get("asked_share") is None else round(chosen["asked_share"], 4),
                     passages_projected_s=None if chosen.get("passages_projected_s") is None
                     else round(chosen["passages_projected_s"], 1),
                     per_question_s=round(dev_seconds(chosen, labels) / len(chosen["each"]), 3),
                     tied=[f"{r['point']} {r['calibration']}" for r in tied]),
        alternatives=alternatives(rows, labels, chosen), device=device,
        machine=dict(common.machine(), cpu_dtype=measured.get("cpu_dtype"), gflops=measured.get("gflops")),
        date=time.strftime("%Y-%m-%d"), command=command)
    common.write_json(common.SELECTION, selection)
    return selection


# ----------------------------------------------------------------------------- the report
def candidate_lines(rows, labels):
    """Each candidate's best point within any time, and its gap to the best one (the student-teacher gap)."""
    best = {}
    for r in rows:
        name = r["config"]["candidate"]
        if name not in best or r["score"] > best[name]["score"]:
            best[name] = r
    top = max(best.values(), key=lambda r: r["score"])
    lines = ["Each candidate at its best point (any time); gap = the best candidate's minus its own, ± paired SE:", "",
             "| candidate | best point | calibration | score | MC acc | desc | gap: score | gap: MC |",
             "|" + "---|" * 8]
    for name, r in sorted(best.items(), key=lambda kv: -kv[1]["score"]):
        diff, se = scoring.score_difference(top["each"], r["each"], labels)
        mc_diff, mc_se = scoring.mc_difference(top["answers"], r["answers"], labels)
        lines.append(f"| {name} | {r['point']} | {r['calibration']} | {r['score']:.3f} | {r['mc_acc']:.3f} | "
                     f"{scoring.fmt(r['desc_score'])} | {diff:+.3f} ± {se:.3f} | {mc_diff:+.3f} ± {mc_se:.3f} |")
    lines += [f"| {name} | not measured: no finished point in {OUT.name} | – | – | – | – | – | – |"
              for name in common.candidates() if name not in best]  # the gap table never drops a candidate silently
    return lines + [""]


def distill_lines(rows, labels):
    """The distilled student minus its base at every point and calibration both were scored at, against issue 17's
    target (scoring.target_shortfalls)."""
    def setting(r):  # (level, passages, rerank, calibration); None for a composed row (a cascade)
        parsed = parse_point_name(r["point"])
        return parsed and (parsed[1:], r["calibration"])
    base = {setting(r): r for r in rows if r["config"]["candidate"] == "student" and setting(r)}
    lines = []
    for r in rows:
        other = base.get(setting(r)) if r["config"]["candidate"] == "distilled" else None
        if other is None:
            continue
        mc, mc_se = scoring.mc_difference(r["answers"], other["answers"], labels)
        desc = {kind: {i: v for i, v in each.items() if labels[i]["kind"] == "desc"}
                for kind, each in (("a", r["each"]), ("b", other["each"]))}
        d, d_se = scoring.paired(desc["a"], desc["b"]) if desc["a"] and desc["b"] else (0.0, 0.0)
        met = not scoring.target_shortfalls((mc, mc_se), (d, d_se))
        lines.append(f"| {r['point']} | {r['calibration']} | {other['mc_acc']:.3f} | {r['mc_acc']:.3f} | "
                     f"{mc:+.3f} ± {mc_se:.3f} | {d:+.3f} ± {d_se:.3f} | {'met' if met else 'not met'} |")
    if not lines:
        return []
    return [f"The distilled student minus its base at the same point (issue 17's target: MC >= +{scoring.TARGET_GAIN} "
            f"and >= {scoring.TARGET_Z:g} paired SE, descriptive not below -1 SE):", "",
            "| point | calibration | base MC | distilled MC | MC change ± SE | descriptive change ± SE | target |",
            "|" + "---|" * 7] + lines + [""]


def report(rows, chosen, tied, warning, labels, budget_s, stopped, skipped, command):
    """reports/select.md: every point x calibration with its score, paired SE against the choice and time."""
    n_mc = sum(1 for i in chosen["each"] if labels[i]["kind"] == "mc")
    n_desc = len(chosen["each"]) - n_mc
    lines = ["# Choosing the answering configuration (05_quantize.py)", "",
             f"Command: `{command}`. Device: {chosen['device']}. Development set: {n_mc} multiple-choice + {n_desc} "
             f"descriptive questions (all of them). Descriptive cosine: `{scoring.encoder_name()}`. Budget for the "
             f"515-question test: {budget_s / 60:.0f} min (projected from times measured on this machine; load "
             "average in the last column: above 2 means other jobs shared the two cores and the time is an upper "
             "bound).", "",
             f"**Chosen: {chosen['point']}, calibration {chosen['calibration']}**: score {chosen['score']:.3f} "
             f"(MC {chosen['mc_acc']:.3f}, descriptive {scoring.fmt(chosen['desc_score'])}), projected "
             f"{chosen['projected_s'] / 60:.1f} min. Tied with the best (within max({SCORE_TOLERANCE}, {NOISE_Z} × "
             f"paired SE)): {', '.join(r['point'] + ' ' + r['calibration'] for r in tied)}.", ""]
    if warning:
        lines += [f"**Warning:** {warning}", ""]
    echo = scoring.score({i: labels[i]["Question"] for i in chosen["each"] if labels[i]["kind"] == "desc"}, labels)
    if echo.get("desc_score") is not None:
        lines += [f"Echo baseline (each descriptive question answered with its own text): descriptive "
                  f"{echo['desc_score']:.3f} (cosine {echo['cosine']:.3f}, keyword recall {echo['keyword_recall']:.3f})."
                  " The descriptive columns below read against it.", ""]
    lines += candidate_lines(rows, labels) + distill_lines(rows, labels)
    lines += ["| point | calibration | score | Δ vs chosen ± SE | MC acc | desc | cosine | keyword recall | dtype | "
              "s/prompt | desc s/q | projected min | peak GiB | load |", "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: -r["score"]):
        diff, se = scoring.score_difference(r["each"], chosen["each"], labels)
        mark = " **(chosen)**" if r is chosen else ""
        timing = r["timing"] or {}
        lines.append(f"| {r['point']}{mark} | {r['calibration']} | {r['score']:.3f} | {diff:+.3f} ± {se:.3f} | "
                     f"{r['mc_acc']:.3f} | {scoring.fmt(r['desc_score'])} | {scoring.fmt(r['cosine'])} | "
                     f"{scoring.fmt(r['keyword_recall'])} | {r['dtype']} | {scoring.fmt(timing.get('mc_s_per_prompt'), 2)} "
                     f"| {scoring.fmt(timing.get('desc_s_per_question'), 1)} | {r['projected_s'] / 60:.1f} | "
                     f"{scoring.fmt(r['peak_gib'], 2)} | {scoring.fmt(r['load_average'], 1)} |")
    if stopped or skipped:
        lines += ["", "## Not measured to the end", ""]
        lines += [f"- {name}: {why}" for name, why in stopped + skipped]
    lines += ["", "Calibrations: none (raw option logits), content_free (Zhao et al. 2021), batch (mean predicted "
              "distribution, Zhou et al. 2024), auto (batch only when one option takes more than half of the raw "
              "answers), permute-k (mean over k cyclic option shifts), pride-s (position prior estimated from all "
              "shifts of a share s of the questions, then removed from the rest; Zheng et al. 2024). Projected "
              f"prompts per test question assume {TEST_FIVE} of the {TEST_MC} multiple-choice items have five "
              "options. A point with passages (-p<k>: the first stage's k best passages; -p<k>-rerank: 03's LLM "
              "reranking of them) counts building its index (02, embedded by the candidate) in its projected time. "
              "-p<k>-cascade<t>: composed from the p0 and p<k> points' records, no run of its own: the passages only "
              "for the multiple-choice questions whose top option takes less than t without them, answered from the "
              "surer of the two prompts: the p<k> prompt in the identity order (calibration none) or as the mean of "
              "its first k option orders (permute-k; a shifted prompt reuses the identity prompt's cache up to the "
              "options); time = the p0 prompt + the asked share x the p<k> prompt in its orders. s/prompt: the "
              "identity prompt (of a cascade row: its composed seconds per multiple-choice question).",
              ""]
    common.write_text(common.REPORTS / "select.md", "\n".join(lines))


# ----------------------------------------------------------------------------- stages
def measure(questions, labels, device, budget_s, desc_cache, stages=(1, 2, 3), levels=None):
    """Run the given stages (stage 1 always: the others start from its best point), stage 2 over the given levels
    (default: LEVELS of the device); return (rows, stopped, skipped)."""
    n_max = max(len(q.options) for q in questions if q.kind == "mc")
    rows, stopped, skipped = [], [], []
    present = {name: model for name, model in common.candidates().items()
               if Path(common.resolve_model(model)).exists()}
    print(f"05: candidates {sorted(present)} on {device}, budget {budget_s / 60:.0f} min")

    def within_budget(config, name, index_dir=None, plain=None):
        """The point's probe meta when the projected time of its cheapest reading (the identity order: its records
        give the one-prompt calibrations and a cascade whatever else they score) fits the budget, or, for a
        first-stage passage point with plain (the finished p0 point of its candidate and level), when its cheapest
        cascade does (the lowest CASCADE threshold: passages only for the questions p0 is unsure of); None (listed)
        when neither does."""
        timed = probe_point(config, OUT / name, index_dir)
        if timed is None:
            skipped.append((name, "its timing probe failed: see the log above"))
            return None
        one_prompt = dict(dataclasses.asdict(config), calibration="none", permutations=1, pride_share=0.0)
        projected = projected_seconds(timed, one_prompt, timed["rerank_s"])
        if projected > budget_s and plain is not None:
            records, plain_meta = plain
            share = len(answering.unsure([answering.only_shifts(r, ()) for r in records.values()],
                                         min(CASCADE))) / sum(q.kind == "mc" for q in questions)
            timing, seconds = cascade_timing(plain_meta, timed, share, 1)
            cascade_s = projected_seconds(dict(timed, timing=timing, seconds=seconds),
                                          dict(one_prompt, cascade=min(CASCADE)))
            if cascade_s <= budget_s:
                print(f"05: {name} projects to {projected / 60:.0f} min, its cascade {min(CASCADE)} (passages for "
                      f"{share:.0%} of the MC questions) to {cascade_s / 60:.0f} min: measured in full for the cascades")
                return timed
        if projected > budget_s:
            parts = [f"building the index {timed['index_s'] / 60:.0f} min"] if timed["index_s"] else []
            parts += [f"LLM reranking {(TEST_MC + TEST_DESC) * timed['rerank_s'] / 60:.0f} min"] if timed["rerank_s"] \
                else []
            of_which = f", of which {' and '.join(parts)}" if parts else ""
            stopped.append((name, f"projected {projected / 60:.0f} min{of_which} after {PROBE_QUESTIONS} questions, "
                            f"over the {budget_s / 60:.0f} min budget"))
            return None
        return timed

    def finished(config, name, index_dir=None, timed=None):
        """The point probed (unless timed already) and run on the whole set: (records, meta), or None."""
        folder = OUT / name
        if timed is None and probe_point(config, folder, index_dir) is None:
            skipped.append((name, "its timing probe failed: see the log above"))
            return None
        if not run_point(config, folder, 0, index_dir):
            skipped.append((name, "the run failed: see its log above"))
            return None
        records, meta = load_point(folder)
        return records, dict(meta, index_s=index_seconds(index_dir))

    points = {}  # name: (records, meta) of every finished point, for the cascades

    def scored(name, done):
        points[name] = done
        return score_point(name, *done, questions, labels, desc_cache)

    stage1 = {}
    for candidate in present:  # stage 1: every candidate at the float level, all shifts
        name = point_name(candidate, "float", 0)
        done = finished(point_config(candidate, "float", 0, n_max), name)
        if done:
            stage1[candidate] = scored(name, done)
            rows += stage1[candidate]
    if not rows:
        raise SystemExit("05: no candidate could be measured: run `make models`, then see the messages above.")
    best = max(rows, key=lambda r: r["score"])
    best_config = as_config(best["config"])
    flag = ",".join(map(str, sorted(set(stages) | {1})))
    if 2 not in stages:
        skipped.append(("stage 2 (levels)", f"not run (`05_quantize.py --stages {flag}`)"))
    # stage 2: the other levels, for candidates tied with the best
    for candidate, cand_rows in stage1.items() if 2 in stages else ():
        top = max(cand_rows, key=lambda r: r["score"])
        if top is not best and beats(best, top, labels):
            skipped.append((f"{candidate} at other levels", f"its best float score {top['score']:.3f} is below "
                            f"{best['point']} {best['calibration']} ({best['score']:.3f}) beyond the noise"))
            continue
        for level in LEVELS[lm.device_kind(device)]:
            name = point_name(candidate, level, 0)
            if level == "float":
                continue
            if levels is not None and level not in levels:
                skipped.append((name, f"not run (`05_quantize.py --levels {','.join(levels)}`)"))
                continue
            reason = lm.level_runnable(level, device)
            if reason:
                skipped.append((name, f"cannot run here: {reason}"))
                continue
            config = point_config(candidate, level, 0, n_max, like=best_config)
            timed = within_budget(config, name)
            done = timed and finished(config, name, timed=timed)
            if done:
                rows += scored(name, done)
    best = max(rows, key=lambda r: r["score"])
    if 3 not in stages:
        skipped.append(("stage 3 (passages)", f"not run (`05_quantize.py --stages {flag}`)"))
        return rows, stopped, skipped
    candidate, level = best["config"]["candidate"], best["config"]["level"]
    for passages in PASSAGES:  # stage 3: passages for the best point, first-stage then reranked
        index_dir = build_index(candidate, index_folder(candidate))
        like = as_config(best["config"])
        orders = PASSAGE_PERMUTATIONS[lm.device_kind(device)]
        if not orders:  # the best calibration's orders, at least two
            orders = max(2, like.permutations if like.calibration == "permute" else 1)
        like = dataclasses.replace(like, calibration="permute", permutations=orders, pride_share=0.0)
        for rerank in (False, True):
            name = point_name(candidate, level, passages, rerank)
            config = dataclasses.replace(point_config(candidate, level, passages, n_max, like=like), rerank=rerank)
            plain = None if rerank else points.get(point_name(candidate, level, 0))  # cascades: first stage only
            timed = within_budget(config, name, index_dir, plain)
            if timed is None:  # reranking only adds time
                break
            done = finished(config, name, index_dir=index_dir, timed=timed)
            if done:
                rows += scored(name, done)
    return rows + cascade_rows(points, questions, labels, desc_cache), stopped, skipped


def finished_points():
    """{name: (records by id, meta)} of every point finished in OUT (named as point_name names them); a point with
    passages counts the build time of its candidate's index there (meta's index_s)."""
    points = {}
    for folder in sorted(OUT.iterdir()) if OUT.exists() else []:
        parsed = parse_point_name(folder.name)
        done = load_point(folder) if parsed and folder.is_dir() else None
        if done:
            records, meta = done
            points[folder.name] = records, dict(meta, index_s=index_seconds(index_folder(parsed[0]) if parsed[2]
                                                                           else None))
    return points


def cascade_rows(points, questions, labels, desc_cache):
    """Rows of the cascades (CASCADE thresholds) of every finished first-stage passage point with the p0 point of its
    candidate and level, composed from their records as answering.run_cascade composes them: the p0 prompt in the
    identity order, the passage prompt in it (calibration none) or as the mean of its first k orders (permute-k, for
    every k of PERMUTE_K its records were scored under). Time per multiple-choice question = the p0 prompt + the
    asked share x the passage prompt in its orders, both loads counted."""
    rows, order = [], [q.id for q in questions]
    n_mc = sum(q.kind == "mc" for q in questions)
    for name, (records, meta) in points.items():
        candidate, level, passages, rerank = parse_point_name(name)
        plain_point = points.get(point_name(candidate, level, 0))
        if not passages or rerank or plain_point is None or plain_point[1]["model"] != meta["model"]:
            continue
        plain_records, plain_meta = plain_point
        plain = [answering.only_shifts(plain_records[i], ()) for i in order]
        orders = [1] + [k for k in PERMUTE_K if scored_in([records[i] for i in order], k)]
        for threshold, k in ((t, k) for t in CASCADE for k in orders):
            asked = answering.unsure(plain, threshold)
            again = [answering.only_shifts(records[i], range(1, k)) for i in order if i in asked]
            # the merged records as calibration none reads them: a passage record by its orders' mean
            merged = [dict(r, logprobs=answering.permutation_mean(r), shifts={}) if r.get("cascade") == "passages"
                      else r for r in answering.cascade_merge(plain, again)]
            share = len(asked) / n_mc
            fields = dict(calibration="permute", permutations=k) if k > 1 else dict(calibration="none", permutations=1)
            timing, seconds = cascade_timing(plain_meta, meta, share,
                                             test_prompts_per_question(dict(fields, pride_share=0.0)))
            composed = dict(meta, config=dict(meta["config"], cascade=threshold), timing=timing,
                            content_free=plain_meta["content_free"], key=plain_meta["key"], seconds=seconds)
            suffix = f"-cascade{threshold}"
            for row in score_point(f"{name}{suffix}", {r["id"]: r for r in merged}, composed, questions, labels,
                                   desc_cache):
                if row["calibration"] == "none":  # the one reading of the composed records
                    rows.append(dict(row, calibration="none" if k == 1 else f"permute-{k}",
                                     config=dict(row["config"], **fields), asked_share=share,
                                     passages_projected_s=projected_seconds(meta, dict(row["config"], **fields,
                                                                                       cascade=0.0))))
    return rows


def cascade_timing(plain_meta, meta, share, prompts):
    """(timing, seconds) of a cascade composed from a p0 point's meta and a passage point's (or its probe's): per
    multiple-choice question the p0 prompt in the identity order + share x the passage prompt in `prompts` orders;
    descriptive questions as p0 answers them; both models' loads."""
    timing = dict(plain_meta.get("timing") or {}, mc_s_per_shift=None)
    timing["mc_s_per_prompt"] = answering.mc_question_seconds(timing, 1) + share * answering.mc_question_seconds(
        meta.get("timing") or {}, prompts)
    return timing, dict(meta["seconds"], load=meta["seconds"]["load"] + plain_meta["seconds"]["load"])


def rescored(questions, labels, desc_cache):
    """Rows of every point finished in OUT and of their cascades, no model run."""
    points = finished_points()
    rows = [row for name, (records, meta) in points.items()
            for row in score_point(name, records, meta, questions, labels, desc_cache)]
    if not rows:
        raise SystemExit(f"05: no finished point in {OUT}: run `make select` first.")
    return rows + cascade_rows(points, questions, labels, desc_cache)


def level_list(text):
    """The quantization levels of a --levels value ("fp32,bnb-nf4"): names of lm.LEVELS."""
    levels = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [level for level in levels if level not in lm.LEVELS]
    if not levels or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: give levels of {', '.join(lm.LEVELS)} separated by commas")
    return levels


def stage_list(text):
    """The stages of a --stages value ("1,3")."""
    stages = tuple(sorted({int(s) for s in text.split(",") if s.strip()})) if text.replace(",", "").isdigit() else ()
    if not stages or not set(stages) <= {1, 2, 3}:
        raise argparse.ArgumentTypeError(f"{text!r}: give stage numbers 1-3 separated by commas, e.g. 1,3")
    return stages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", help="(child step) answer the dev set under this Config (JSON) into --dir")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--index", type=Path, default=None)
    parser.add_argument("--stages", type=stage_list, default=(1, 2, 3),
                        help="the stages to run, comma-separated (default 1,2,3; stage 1 always runs)")
    parser.add_argument("--levels", type=level_list, default=None,
                        help="stage 2: only these levels, comma-separated (default: every level of LEVELS the device "
                             "runs)")
    parser.add_argument("--rescore", action="store_true",
                        help="run no model: choose among the points already finished in outputs/05_select")
    parser.add_argument("--command", default="make select")
    args = parser.parse_args()
    if args.point:
        child_point(args.point, args.dir, args.limit, args.index)
        return
    device = lm.pick_device()
    kind = lm.device_kind(device)
    budget_s = BUDGET_HOURS[kind] * 3600 * SAFETY_MARGIN[kind]
    questions, labels = dev_set()
    t0 = time.time()
    if args.rescore:
        rows, stopped = rescored(questions, labels, {}), []
        skipped = [("every other point", "not run: `05_quantize.py --rescore` chose among the finished points of "
                    f"{OUT.parent.name}/{OUT.name} only (the last full `make select`: git log -p reports/select.md)")]
    else:
        rows, stopped, skipped = measure(questions, labels, device, budget_s, {}, args.stages, args.levels)
    chosen, tied, warning = select(rows, labels, budget_s)
    if warning:
        print(f"05: WARNING: {warning}")
    write_selection(chosen, tied, rows, labels, budget_s, device, args.command)
    report(rows, chosen, tied, warning, labels, budget_s, stopped, skipped, args.command)
    print(f"05: chose {chosen['point']} with {chosen['calibration']} (score {chosen['score']:.3f}, projected "
          f"{chosen['projected_s'] / 60:.1f} min) from {len(rows)} points in {time.time() - t0:.0f} s -> "
          f"{common.SELECTION.name}, reports/select.md")


if __name__ == "__main__":
    main()
