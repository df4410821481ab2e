"""Hyperparameter sweep of the distillation and the distillation report.

--sweep: for every point of this device's SWEEP_GRID (alpha, beta, tau, loss type, epochs) and SWEEP_EXTRA trains an
adapter with 01_train_distillm.py (SWEEP_STEPS steps, or the point's epochs; on a device that trains from the
teacher's stored top-k, the store at the point's temperature first), merges it, answers the first
SWEEP_EVAL_QUESTIONS development questions with 04_infer.py (EVAL_FLAGS) and scores them with scoring.py; the base
student is answered on the same questions.
Every point is a folder under outputs/01_sweep/ with its own DONE stamps, so a killed sweep resumes; a folder made
from other pairs, questions or settings (its inputs.json) is started again. Writes reports/sweep.md. Run by
`make sweep`.
--report: scores the base student and teacher (outputs/distill/{student,teacher}) and the distilled students
(outputs/distill/<loss>) on the development set and all four on 00's held-out template questions
(outputs/distill/heldout-*), and collects pair-generation throughput (outputs/00_pairs/meta.json), training meta
and the naive vs chunked loss measurement; writes reports/distill.md. Run by `make distill-report`, whose rules
make those runs with EVAL_FLAGS.
Copy the winning values into the settings block of 01_train_distillm.py: `make distill` trains with those.
"""
import argparse
import importlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import answering
import common
import competition
import lm
import scoring

# ----------------------------------------------------------------------------- settings
SWEEP_GRID = dict(cpu=dict(loss_type=["distillm_v2"], alpha=[0.1], beta=[1.0], temperature=[1.0], epochs=[1.0, 2.0]),
                  cuda=dict(loss_type=["distillm_v2"], alpha=[0.1, 0.3], beta=[1.0, 1.5], temperature=[1.0, 2.0]))
# epochs (optional): passes over the pairs (01 --epochs; absent: 01's EPOCHS). cpu: is one pass what limits the kept
# student (reports/distill.md)? alpha 0.1 vs 0.3 at 20 steps made no difference beyond noise (2026-11)
SWEEP_EXTRA = dict(cpu=[], cuda=[dict(loss_type="kd", alpha=0.1, beta=1.0, temperature=1.0)])  # baselines run once
# (cpu: kd and gkd beside distillm_v2 on the same pairs and steps are in reports/distill.md)
SWEEP_STEPS = dict(cpu=None, cuda=None)  # steps per point; None: the point's epochs over the pairs
SWEEP_EVAL_QUESTIONS = 500  # first development questions (multiple choice only) per point: 500 = all 498
SWEEP_KEEP_MERGED = False  # merged models are 1 GB each on the student: delete after scoring
REPORT_CALIBRATION = "batch"  # the option-prior correction of the sweep and the held-out tables
REPORT_CALIBRATIONS = ["batch", "permute"]  # reports/distill.md's development table: both for every run (permute =
# the mean over the cyclic shifts 04 stored, DEV_FLAGS: permute-4)
DISTILL_RUNS = {"distillm_v2": "plain", "kd": "plain", "gkd": "plain", "distillm_v2-context": "context",
                "kd-context": "context", "gkd-context": "context"}  # run (outputs/distill/<name>: 04_infer.py runs
# of merged distilled students, the Makefile's distill-report rules) -> its pair design (01's --target). The first is
# `make distill` (01's TOPK_TARGET, "plain": the teacher as the student sees the question); kd and gkd: the same
# pairs, target and steps; "-context": the other design, the privileged teacher
DESIGNS = dict(plain="plain teacher", context="privileged teacher")  # report names of 01's TOPK_TARGETS
CALIBRATION_NAMES = dict(permute="permute-4")  # report names of REPORT_CALIBRATIONS (others: their own name)
EVAL_FLAGS = ["--passages", "0", "--level", "float", "--calibration", "none"]  # every 04 run of the sweep and of the
# held-out questions alike: no passages, the device's float dtype, raw option scores (calibrated in the reports)
DEV_FLAGS = ["--passages", "0", "--level", "float", "--calibration", "permute", "--permutations", "4"]  # the
# Makefile's development runs: the identity order and 3 cyclic shifts per question (batch and permute-4 from one run)
# -----------------------------------------------------------------------------

SWEEP_DIR = common.OUTPUTS / "01_sweep"
DISTILL_DIR = common.OUTPUTS / "distill"


def grid_points(grid=None, extra=None):
    """Every combination of the grid (SWEEP_GRID of this device unless given) plus the extra points (SWEEP_EXTRA of
    this device unless given), each with a folder name."""
    kind = lm.device_kind(lm.pick_device()) if grid is None or extra is None else None
    grid = grid or SWEEP_GRID[kind]
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    points += [dict(p) for p in (SWEEP_EXTRA[kind] if extra is None else extra)]
    for p in points:
        p["name"] = f"{p['loss_type']}-a{p['alpha']}-b{p['beta']}-t{p['temperature']}" + (
            f"-e{p['epochs']}" if p.get("epochs") else "")
    return points


def run(cmd):
    print("sweep: " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def fresh_folder(folder, inputs):
    """Create folder for these inputs (a dict), after deleting it when it was made from other inputs: the DONE
    stamps inside are only reused for the same pairs, questions and settings."""
    stamp = folder / "inputs.json"
    if folder.exists() and (not stamp.exists() or json.loads(stamp.read_text(encoding="utf-8")) != inputs):
        print(f"sweep: {folder} was made from other pairs, questions or settings: starting it again", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common.write_json(stamp, inputs)


def question_inputs(n_questions):
    """What a point's answers depend on besides its training: the questions and how the option logits are read (a
    point answered under lm.OPTION_LOGITS "model" is run again)."""
    return dict(questions=common.sha256_file(common.QUESTIONS)[:12], n_questions=n_questions,
                option_logits=lm.OPTION_LOGITS)


def train_and_answer(point, steps, n_questions):
    """Adapter, merged model and 04 answers of one grid point (each step skipped when its DONE exists)."""
    folder = SWEEP_DIR / point["name"]
    fresh_folder(folder, dict(point, steps=steps, pairs=common.sha256_file(common.PAIRS / "pairs.jsonl")[:12],
                              **question_inputs(n_questions)))
    adapter, merged, answers = folder / "adapter", folder / "merged", folder / "eval"
    if not (answers / "DONE").exists():
        if not (merged / "DONE").exists():
            trainer = [sys.executable, common.ROOT / "01_train_distillm.py", "--temperature", point["temperature"]]
            run(trainer + ["--store-topk"])  # the teacher's top-k at this temperature (a stamp where it is loaded)
            run(trainer + ["--loss-type", point["loss_type"], "--alpha1", point["alpha"], "--alpha2", point["alpha"],
                           "--beta", point["beta"], *(["--max-steps", steps] if steps else []),
                           *(["--epochs", point["epochs"]] if point.get("epochs") else []), "--out", adapter,
                           "--merge", merged])
        run([sys.executable, common.ROOT / "04_infer.py", "--model", merged, "--out", answers, "--mc-only",
             "--limit", n_questions, *EVAL_FLAGS])
    if not SWEEP_KEEP_MERGED and merged.exists():
        shutil.rmtree(merged)
    return answers


def base_answers(n_questions):
    fresh_folder(SWEEP_DIR / "base-student", dict(model=str(common.STUDENT_MODEL), **question_inputs(n_questions)))
    answers = SWEEP_DIR / "base-student" / "eval"
    if not (answers / "DONE").exists():
        run([sys.executable, common.ROOT / "04_infer.py", "--model", "student", "--out", answers, "--mc-only",
             "--limit", n_questions, *EVAL_FLAGS])
    return answers


def training_meta(folder):
    path = Path(folder) / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def sweep_report(points, labels, command):
    """reports/sweep.md: every point against the base student on the same questions, all with REPORT_CALIBRATION
    (04's "auto" could calibrate one point and not another), the change with its paired standard error."""
    steps = SWEEP_STEPS[lm.device_kind(lm.pick_device())]
    base_run = scoring.load_run(base_answers(SWEEP_EVAL_QUESTIONS))
    ids = {r["id"] for r in base_run[2]}
    base = subset_answers(base_run, ids)
    base_acc = scoring.score(base, labels)["mc_acc"]
    rows = []
    for p in points:
        run = scoring.load_run(train_and_answer(p, steps, SWEEP_EVAL_QUESTIONS))
        answers, raw = subset_answers(run, ids), subset_answers(run, ids, "none")
        diff, se = scoring.mc_difference(answers, base, labels)
        t = training_meta(SWEEP_DIR / p["name"] / "adapter")
        first, last = loss_ends(t.get("history"))
        rows.append((scoring.score(answers, labels)["mc_acc"], p, t, diff, se,
                     scoring.score(raw, labels)["mc_acc"], scoring.most_frequent(raw), first, last))
    raw_base = subset_answers(base_run, ids, "none")
    each = f"{steps} LoRA steps" if steps else "LoRA steps for its epochs (01's EPOCHS unless the point sets them)"
    lines = ["# Distillation sweep", "", f"Produced by `{command}`. Each point: {each} on "
             f"the {training_meta(common.PAIRS).get('pairs', '?')} pairs of outputs/00_pairs, scored on the first "
             f"{len(ids)} development questions (multiple choice only), "
             f"calibration `{REPORT_CALIBRATION}` for every row (raw = no calibration). Change: MC accuracy minus the "
             "base student's on the same questions, with the paired standard error of that difference "
             f"(one question = {1 / max(len(ids), 1):.3f}).", "",
             f"Base student on the same questions: MC accuracy **{base_acc:.3f}**, raw "
             f"{scoring.score(raw_base, labels)['mc_acc']:.3f}, most frequent raw answer "
             f"{scoring.most_frequent(raw_base)}.", "",
             "| loss | alpha | beta | tau | epochs | steps | MC accuracy | change ± SE | raw MC | most frequent raw "
             "answer | loss first → last 10% | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for acc, p, t, diff, se, raw_acc, top, first, last in sorted(rows, key=lambda r: -r[0]):
        lines.append(f"| {p['loss_type']} | {p['alpha']} | {p['beta']} | {p['temperature']} | "
                     f"{p.get('epochs') or '–'} | {t.get('max_steps', '–')} | {acc:.3f} | "
                     f"{diff:+.3f} ± {se:.3f} | {raw_acc:.3f} | {top} | {scoring.fmt(first, 4)} → "
                     f"{scoring.fmt(last, 4)} | {t.get('seconds', {}).get('per_step', '–')} |")
    return lines + [""]


def gap_closed(student, teacher, distilled):
    """Share of the teacher-student gap a distilled student closes (None when there is no gap)."""
    return None if teacher is None or student is None or teacher == student else (distilled - student) / (
        teacher - student)


def measurement_lines():
    rows = []
    for name in ("naive", "chunked"):
        path = DISTILL_DIR / f"measure-{name}.json"
        if path.exists():
            rows.append((name, json.loads(path.read_text(encoding="utf-8"))))
    if not rows:
        return ["Loss-step measurement not run (`make distill-measure`).", ""]
    m0 = rows[0][1]
    lines = [f"## Loss step: naive full logits vs chunked (batch {m0['batch']} x {m0['length']} tokens)", "",
             f"Random token ids, the second half of each sequence is the answer; {m0['batch'] // 2} teacher-answer + "
             f"{m0['batch'] // 2} student-answer sequences, `{m0['loss_type']}`, LoRA r{m0.get('lora_r', 16)}, "
             f"student {m0['student_dtype']}, teacher bf16 no-grad, gradient checkpointing "
             f"{m0['gradient_checkpointing']}. s/step: mean over the steps after the first (warm-up) when there are "
             "several. Command: `make distill-measure` (`01_train_distillm.py --measure FILE [--chunk 0]`).", "",
             "| loss | s/step | step times (s) | process peak RSS GiB | RSS after loading GiB | peak RSS during the "
             "steps GiB | step overhead GiB |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} (chunk={m['chunk']}) | {m['seconds_per_step']} | {m['step_seconds']} | "
                     f"{m['peak_rss_gib']} | {m.get('loaded_rss_gib', '–')} | {m.get('step_peak_rss_gib', '–')} | "
                     f"{m.get('step_overhead_gib') if m.get('weights_paged_in') else '– (weights not paged in)'} |")
    if len(rows) == 2:
        a, b = rows[0][1], rows[1][1]
        lines += ["", f"Process peak chunked / naive: **{b['peak_rss_gib'] / a['peak_rss_gib']:.2f}**."]
        if a.get("weights_paged_in") and b.get("weights_paged_in"):  # older files read RSS before paging in
            lines += [f"Memory a training step adds on top of the loaded models (peak during the steps minus RSS "
                      f"after loading; the kernel's peak mark is reset after loading): chunked / naive "
                      f"**{b['step_overhead_gib'] / a['step_overhead_gib']:.2f}** (target <= 0.5). The weights of both "
                      "models (about 4.5 GiB in bf16) are resident in either version, so the whole-process ratio "
                      "cannot reach 0.5 on this pair of models."]
        lines += ["", f"Loss of the first step: naive {a['losses'][0]:.4f}, chunked {b['losses'][0]:.4f} (same random "
                  "batch and seed: the two implementations agree on the real models too).", ""]
    return lines + [""]


def subset_answers(run, ids, calibration=None):
    """Answers of a loaded 04 run (scoring.load_run) on the question ids only, multiple choice re-calibrated on that
    subset from the raw log-probabilities (REPORT_CALIBRATION unless given), so runs answered on different subsets
    (--limit, --mc-only) compare fairly."""
    answers, meta, records = run
    records = [r for r in records if r["id"] in ids]
    subset = {r["id"]: answers[r["id"]] for r in records if r["kind"] == "desc"}
    subset.update(answering.calibrated_answers(records, calibration or REPORT_CALIBRATION,
                                                    meta.get("content_free")))
    return subset


def loss_ends(history, share=0.1):
    """(mean loss of the first, of the last share of the logged micro-batches), (None, None) without history."""
    if not history:
        return None, None
    k = max(1, int(len(history) * share))
    return (sum(h["loss"] for h in history[:k]) / k, sum(h["loss"] for h in history[-k:]) / k)


def pairs_lines(pairs_meta):
    """The pairs section of reports/distill.md from outputs/00_pairs/meta.json (nothing when absent): counts per
    template kind and how often the teacher (as the student sees the question, and with the source passage) and the
    student put the most probability on the key."""
    if not pairs_meta:
        return []
    r, acc = pairs_meta["timed_batches"], pairs_meta.get("key_accuracy") or {}
    lines = ["## Pairs (00_generate_pairs.py, `make pairs`)", "",
             f"{pairs_meta['pairs']} pairs ({pairs_meta['mc_pairs']} multiple choice, {pairs_meta['desc_pairs']} "
             f"descriptive; {pairs_meta.get('with_teacher_context', 0)} with a privileged teacher prompt) from "
             f"{pairs_meta['attempts']} question attempts; dropped: "
             f"{json.dumps(pairs_meta['dropped'], ensure_ascii=False)}. Questions written by: "
             f"{pairs_meta.get('this_run', {}).get('writer', 'teacher')}.", ""]
    if acc:
        lines += ["Most likely option = the key (share of the questions) and the mean probability of the key, on every "
                  "multiple-choice question the models answered. *Teacher* reads the prompt the student sees (design "
                  "1's target, `--target plain`); *teacher + passage* reads the same question with the evidence lines "
                  "of its source chunk (design 2's target, `--target context`); chance is 0.20-0.25.", "",
                  "| template | questions | teacher | teacher + passage | student | P(key): teacher | teacher + "
                  "passage | student |", "|---|---|---|---|---|---|---|---|"]
        rows = [("all", acc)] + sorted((pairs_meta.get("key_accuracy_per_template") or {}).items())
        for name, a in rows:
            lines.append(f"| {name} | {a['n']} | {scoring.fmt(a['teacher'])} | {scoring.fmt(a['teacher_context'])} | "
                         f"{scoring.fmt(a['student'])} | {scoring.fmt(a['teacher_key_probability'])} | "
                         f"{scoring.fmt(a['teacher_context_key_probability'])} | "
                         f"{scoring.fmt(a['student_key_probability'])} |")
        lines.append("")
    if r["batches"]:
        lines += [f"Throughput over {r['batches']} batches: {r['answers']} questions, each answered by the teacher "
                  f"({r['teacher_answers_per_minute']}/min), the teacher with the passage "
                  f"({r.get('teacher_context_answers_per_minute') or '–'}/min) and the student "
                  f"({r['student_answers_per_minute']}/min): **{r.get('questions_per_minute_all_models') or '–'} "
                  f"questions/minute** for all three; "
                  + (f"question writing {r['questions_per_minute']} questions/minute"
                     if r.get("questions_per_minute") else "questions from templates (no generation)")
                  + f". Answering time summed over the batches of every run (a killed run resumes): "
                  f"{(r['mc_answer_seconds'] + r['desc_answer_seconds']) / 60:.1f} min; the last run "
                  f"{pairs_meta.get('this_run', {}).get('seconds', '–')} s in all; peak RSS "
                  f"{pairs_meta['peak_rss_gib']} GiB (both models loaded). Command: `make pairs`.", ""]
    return lines


def calibrated(run, ids, calibration):
    """subset_answers under a calibration, "raw" = none."""
    return subset_answers(run, ids, "none" if calibration == "raw" else calibration)


def compare(done, labels, calibrations=None):
    """Per run name of done [(name, 04 run folder)], over the questions every run answered: per calibration
    (REPORT_CALIBRATIONS unless given, plus "raw"), scoring.score of its answers with the share of the
    teacher-student MC gap closed (closed_mc) and the MC change against the base student with its paired standard
    error (change); the descriptive score's change with its paired SE (desc_change); the most frequent raw answer."""
    loaded = {name: scoring.load_run(folder) for name, folder in done}
    ids = set.intersection(*(set(run[0]) for run in loaded.values())) if loaded else set()
    out = {}
    for calibration in list(calibrations or REPORT_CALIBRATIONS) + ["raw"]:
        answers = {name: calibrated(run, ids, calibration) for name, run in loaded.items()}
        scores = {name: scoring.score(a, labels) for name, a in answers.items()}
        base, teacher = scores.get("base student"), scores.get("teacher")
        for name, s in scores.items():
            s["closed_mc"] = gap_closed(base["mc_acc"], teacher["mc_acc"], s["mc_acc"]) if base and teacher else None
            s["change"] = scoring.mc_difference(answers[name], answers["base student"], labels) \
                if base and name != "base student" else None
            out.setdefault(name, {})[calibration] = s
        if calibration == "raw":
            for name, a in answers.items():
                mc = {i: x for i, x in a.items() if labels.get(i, {}).get("kind") == "mc"}
                out[name]["raw_top"] = scoring.most_frequent(mc)
    desc = {name: {i: x for i, x in calibrated(run, ids, "raw").items() if labels.get(i, {}).get("kind") == "desc"}
            for name, run in loaded.items()}
    each = {name: scoring.per_question(a, labels)[0] for name, a in desc.items() if a}
    for name in out:
        out[name]["desc_change"] = scoring.paired(each[name], each["base student"]) \
            if name in each and "base student" in each and name != "base student" else None
    return out


def change_text(change):
    return "–" if change is None else f"{change[0]:+.3f} ± {change[1]:.3f}"


def target_met(s):
    """(met, reasons) of issue 17's target (scoring.target_shortfalls) for one run's compare() entry: under every
    REPORT_CALIBRATIONS the MC change, and the descriptive change once."""
    reasons = [f"{calibration}: {reason}" for calibration in REPORT_CALIBRATIONS
               for reason in scoring.target_shortfalls(s[calibration]["change"])]
    reasons += scoring.target_shortfalls(desc_change=s.get("desc_change"))
    return not reasons, reasons


def heldout_lines(names):
    """The in-distribution check: base student, teacher and the distilled runs names on 00's held-out template
    questions (articles no pair asks about), calibrated with REPORT_CALIBRATION, overall and per template kind."""
    runs = [(name, DISTILL_DIR / f"heldout-{folder}") for name, folder in
            [("base student", "student"), ("teacher", "teacher")] + [(run_label(n), n) for n in names]]
    done = [(name, folder) for name, folder in runs if (folder / "DONE").exists()]
    if not done or not common.HELDOUT_KEYS.exists():
        return ["Held-out template questions: not answered (`make distill-report` answers them after `make pairs`).",
                ""]
    kinds = {q.id: template_kind(q.stem) for q in competition.read_questions(common.HELDOUT)}
    keys = scoring.read_labels(common.HELDOUT_KEYS)
    labels = {i: dict(k, domain=k.get("template") or kinds.get(i, "")) for i, k in keys.items()}  # per kind
    scores = {name: s[REPORT_CALIBRATION] | dict(raw_mc=s["raw"]["mc_acc"], raw_top=s["raw_top"])
              for name, s in compare(done, labels, [REPORT_CALIBRATION]).items()}
    n = next(iter(scores.values()))["n_mc"]
    lines = ["## Held-out template questions (in distribution)", "",
             f"{n} template multiple-choice questions that `make pairs` writes after the pairs "
             f"({os.path.relpath(common.HELDOUT, common.ROOT)}): the same templates, option counts and shuffling, on "
             "sampled articles that no pair asks about (their sentences can still be distractors in a pair), asked "
             f"without the passage. Calibration `{REPORT_CALIBRATION}`; one question = {1 / max(n, 1):.3f}.", "",
             "| model | MC accuracy | gap closed (MC) | MC change vs base | raw MC | most frequent raw answer |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | not run ({folder.name}) | | | | |" for name, folder in runs if (name, folder) not in done]
    for name, s in scores.items():
        lines.append(f"| {name} | {scoring.fmt(s['mc_acc'])} | {scoring.fmt(s['closed_mc'], 2)} | "
                     f"{change_text(s['change'])} | {scoring.fmt(s['raw_mc'])} | {s['raw_top']} |")
    names = sorted({k for s in scores.values() for k in s["per_domain"]})
    lines += ["", "Per template kind (00's TEMPLATE_STEMS), MC accuracy (questions):", "",
              "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, s in scores.items():
        cells = [f"{s['per_domain'][k][0]:.3f} ({s['per_domain'][k][1]})" if k in s["per_domain"] else "–"
                 for k in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def template_kind(stem):
    """The TEMPLATE_STEMS kind of 00_generate_pairs whose wording the stem has (placeholders match anything);
    "other"."""
    stems = importlib.import_module("00_generate_pairs").TEMPLATE_STEMS
    for kind, text in stems.items():
        pattern = "".join(".+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{\w+\})", text) if part)
        if re.fullmatch(pattern, stem.strip()):
            return kind
    return "other"


def run_label(name):
    """The report's name of a distilled run (DISTILL_RUNS): its loss and its pair design (the target its adapter was
    trained on, else the one the Makefile trains it on)."""
    target = (training_meta(adapter_folder(name)) or {}).get("topk_target") or DISTILL_RUNS[name]
    return f"student + {name.partition('-')[0]} ({DESIGNS.get(target, target)})"


def adapter_folder(name):
    """The adapter of a distilled run: `make distill`'s for the first of DISTILL_RUNS, outputs/distill/adapter-<name>
    for the others."""
    return common.DISTILLED if name == next(iter(DISTILL_RUNS)) else DISTILL_DIR / f"adapter-{name}"


def dev_lines(scores, command_flags):
    """The development table: per run MC accuracy under each REPORT_CALIBRATIONS with its change against the base
    student, the descriptive score with its change, the score and the raw MC."""
    any_s = next(iter(scores.values()))
    cal = REPORT_CALIBRATIONS
    names = CALIBRATION_NAMES
    lines = ["## Development score", "",
             f"All runs scored on the same {any_s[cal[0]]['n_mc']} multiple-choice and "
             f"{any_s[cal[0]].get('n_desc', 0)} descriptive development questions, 04_infer.py with "
             f"`{' '.join(command_flags)}` (one run per model: the 4 cyclic option shifts are stored, so every "
             "calibration is scored from the same records). MC under " + " and ".join(
                 f"`{names.get(c, c)}`" for c in cal) + "; change = MC accuracy minus the base student's ± the "
             "paired standard error over the same questions. Descriptive = 0.6 × e5 cosine + 0.4 × keyword recall "
             f"({any_s[cal[0]].get('encoder', '?')}), change ± its paired SE. Score = 0.5 MC ({names.get(cal[0], cal[0])}) "
             "+ 0.5 descriptive. Raw MC = no calibration.", "",
             "| model | " + " | ".join(f"MC {names.get(c, c)} | change" for c in cal) + " | descriptive | change | "
             "score | raw MC |", "|---" * (2 * len(cal) + 5) + "|"]
    for name, s in scores.items():
        cells = [f"{scoring.fmt(s[c]['mc_acc'])} | {change_text(s[c]['change'])}" for c in cal]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {scoring.fmt(s[cal[0]].get('desc_score'))} | "
                     f"{change_text(s.get('desc_change'))} | {scoring.fmt(s[cal[0]].get('score'))} | "
                     f"{scoring.fmt(s['raw']['mc_acc'])} |")
    checked = [label for label in map(run_label, DISTILL_RUNS) if label in scores and "base student" in scores]
    if checked:
        lines += ["", f"**Target (issue 17)**: beat the base student by >= {scoring.TARGET_GAIN:.2f} MC and >= {scoring.TARGET_Z:g} "
                  "paired SE under " + " and ".join(names.get(c, c) for c in cal) + ", descriptive not lower (not "
                  "below −1 SE); the issue asks it of distillm_v2, the other losses are checked alike:", ""]
    for name in checked:
        met, reasons = target_met(scores[name])
        lines.append(f"- {name}: " + ("**met**" if met else "**not met** (" + "; ".join(reasons) + ")"))
    return lines + [""]


def loss_lines(done, labels):
    """distillm_v2 against each other loss of the same pair design (DISTILL_RUNS): the paired MC difference under
    each REPORT_CALIBRATIONS, over the questions both answered."""
    folders = dict(done)
    v2_of = {design: name for name, design in DISTILL_RUNS.items() if name.partition("-")[0] == "distillm_v2"}
    loaded = {}

    def run(name):  # the 04 run of a distilled run, loaded once; None when it has not run
        folder = folders.get(run_label(name))
        if folder is not None and name not in loaded:
            loaded[name] = scoring.load_run(folder)
        return loaded.get(name)

    rows = []
    for name, design in DISTILL_RUNS.items():
        v2 = v2_of.get(design)
        if v2 is None or name == v2 or run(v2) is None or run(name) is None:
            continue
        ids = set(run(v2)[0]) & set(run(name)[0])
        cells = [change_text(scoring.mc_difference(calibrated(run(v2), ids, c), calibrated(run(name), ids, c), labels))
                 for c in REPORT_CALIBRATIONS]
        rows.append(f"| {DESIGNS.get(design, design)} | {name.partition('-')[0]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["distillm_v2 minus each other loss on the same pairs, target and steps (MC accuracy ± paired SE):", "",
            "| design | other loss | " + " | ".join(CALIBRATION_NAMES.get(c, c) for c in REPORT_CALIBRATIONS) + " |",
            "|---" * (2 + len(REPORT_CALIBRATIONS)) + "|", *rows, ""]


def training_lines(names):
    lines = ["## Training runs", "", "Every run: the same pairs and steps; the teacher's distribution comes from the "
             "stored top-k (`make topk`), so no teacher is loaded in training. Loss: mean over the first and the last "
             "10% of the logged micro-batches (one micro-batch is a few pairs, so single values are noisy).", "",
             "| adapter | loss | target | steps | pairs | s/step | train s | loss, first 10% | loss, last 10% | "
             "peak RSS GiB |", "|---" * 10 + "|"]
    for name in names:
        t = training_meta(adapter_folder(name))
        if t:
            first, last = loss_ends(t.get("history", []))
            lines.append(f"| {adapter_folder(name).relative_to(common.ROOT)} | {t['loss_config']['loss_type']} | "
                         f"{t.get('topk_target') or t.get('teacher_source', 'model')} | {t['max_steps']} | "
                         f"{t['n_pairs']} | {t['seconds']['per_step']} | {t['seconds']['train']} | "
                         f"{scoring.fmt(first, 4)} | {scoring.fmt(last, 4)} | {t['peak_rss_gib']} |")
    return lines + [""]


def distill_report(labels, command, designs):
    """reports/distill.md's lines: base student, teacher and the distilled runs of the pair designs asked."""
    names = [name for name, design in DISTILL_RUNS.items() if design in designs]
    runs = [("base student", DISTILL_DIR / "student"), ("teacher", DISTILL_DIR / "teacher")]
    runs += [(run_label(name), DISTILL_DIR / name) for name in names]
    done = [(name, folder) for name, folder in runs if (folder / "DONE").exists()]
    lines = ["# Distillation: DistiLLM-2 vs kd and gkd, two pair designs", "", f"Produced by `{command}`.", ""]
    left = [DESIGNS[design] for design in DESIGNS if design not in designs]
    if left:
        lines += [f"Design not in this report: {', '.join(left)} (`make distill-report` runs every design).", ""]
    missing = [f"Not run: {name} ({folder.relative_to(common.ROOT)})." for name, folder in runs
               if (name, folder) not in done]
    lines += missing + ([""] if missing else [])
    lines += dev_lines(compare(done, labels), DEV_FLAGS) + loss_lines(done, labels) if done \
        else ["No development runs yet.", ""]
    lines += heldout_lines(names)
    lines += pairs_lines(training_meta(common.PAIRS))
    lines += training_lines(names)
    return lines + measurement_lines()


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"sweep_distill: wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the report (analysis)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make sweep")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS),
                        help="--report: the pair designs whose distilled runs it reports (default: all)")
    args = parser.parse_args()
    labels = scoring.read_labels()
    lines = (sweep_report(grid_points(), labels, args.command) if args.sweep
             else distill_report(labels, args.command, args.designs))
    if args.notes and args.notes.exists():
        lines += [args.notes.read_text(encoding="utf-8")]
    write(args.out, lines)


if __name__ == "__main__":
    main()
