"""Quantization levels of the student measured for score and time; the best one inside the time limit is kept.

Reads the student to quantize (the base student of `make student`, and the merged DistiLLM-2 student of
`make distill` when it exists: both are measured at the REFERENCE level and the distilled one is quantized only
when it wins clearly), the development questions and labels straight from the shared eval folder (common.SHARED:
a data/test.csv in place changes nothing) and the index of `make index`. Each level is built and measured in a
process of its own (clean peak memory): it answers the evaluation subset the way 04_infer.py answers (with
first-stage passages when RAG_PASSAGES > 0) and reranks a few questions; its result is checkpointed in
outputs/05_quantize/<source>-<level>/result.json, so a rerun measures only what changed. Writes
models/student-final/ (the chosen level's weights, its quantization config in config.json or meta.json,
selection.json with the measurements, DONE), which 03_rerank.py and 04_infer.py then use, and reports/quantize.md +
reports/quantize.svg (score against projected time for the test). Run by `make quantize` and
`make quantize-report`.
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import lm

# ----------------------------------------------------------------------------- settings
# Level -> how it is built. dtype: weights (and compute) dtype; config: a transformers quantization config
# (bitsandbytes, torchao) applied while loading and saved with the weights; after_load: quantized at every load
# (no serialised form); devices: where it can run at all.
LEVELS = {
    "bf16": dict(dtype="bfloat16"),
    "fp32": dict(dtype="float32"),
    "fp16": dict(dtype="float16"),
    "bnb-int8": dict(dtype="bfloat16", config="bnb", settings=dict(load_in_8bit=True)),
    "bnb-nf4": dict(dtype="bfloat16", config="bnb", settings=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "bnb-nf4-dq": dict(dtype="bfloat16", config="bnb", settings=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                     bnb_4bit_use_double_quant=True)),
    "torchao-int8wo": dict(dtype="bfloat16", config="torchao", settings=dict(method="Int8WeightOnlyConfig")),
    "torch-int8-dynamic": dict(dtype="float32", after_load="torch-int8-dynamic", devices=("cpu",)),
}
MEASURE = ["bf16", "bnb-nf4", "bnb-int8", "torchao-int8wo", "fp32", "bnb-nf4-dq", "torch-int8-dynamic", "fp16"]
REFERENCE = "bf16"  # full precision for agreement; on a GPU without bf16 use "fp16"
EVAL_MC = 100  # dev multiple-choice questions answered per level, spread evenly (0 = all 498: a GPU setting)
EVAL_DESC = 8  # dev descriptive questions per level (0 = all 54)
RERANK_QUESTIONS = 10  # questions reranked per level for reranker agreement and cost
TEST_MC, TEST_DESC = 500, 15  # the competition test the time is projected for
TIME_LIMIT_HOURS = 4.5  # competition limit for the whole test on one RTX 4090
SAFETY_MARGIN = 0.8  # choose only among levels projected within this share of the limit
SCORE_TOLERANCE = 0.005  # scores this close count as a tie (one question in 100 moves the score 0.005): faster wins
NOISE_Z = 1.0  # ... and so do scores within this many standard errors of the paired MC difference (a 100-question
# subset cannot tell levels 2-3 questions apart: a noisy win must not decide the level)
OUT = common.OUTPUTS / "05_quantize"
# -----------------------------------------------------------------------------

infer = importlib.import_module("04_infer")
rerank = importlib.import_module("03_rerank")


# ----------------------------------------------------------------------------- what is measured
def spread(items, n):
    """n items taken evenly across the list (all of them for n = 0 or n >= len)."""
    if not n or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def eval_set(eval_dir=common.SHARED / "eval"):
    """(questions, labels by id) of the evaluation subset: EVAL_MC multiple choice + EVAL_DESC descriptive."""
    prepare = importlib.import_module("prepare_data")
    rows, labels = prepare.dev_question_set(eval_dir)
    questions = [common.parse_question(r["ID"], r["Question"]) for r in rows]
    chosen = spread([q for q in questions if q.kind == "mc"], EVAL_MC) + \
        spread([q for q in questions if q.kind == "desc"], EVAL_DESC)
    return chosen, {r["ID"]: r for r in labels}


def sources():
    """{name: model dir} of the students that can be quantized: the base, and the distilled one when merged."""
    found = {"base": common.STUDENT_BASE}
    if (common.DISTILLED_MERGED / "DONE").exists():
        found["distilled"] = common.DISTILLED_MERGED
    return found


def level_runnable(level, device):
    """None when the level can run on this device, else the reason it cannot."""
    spec = LEVELS[level]
    if device not in spec.get("devices", (device,)):
        return f"runs on {'/'.join(spec['devices'])} only, not {device}"
    if spec["dtype"] == "bfloat16" and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16"
    package = {"bnb": "bitsandbytes", "torchao": "torchao"}.get(spec.get("config"))
    if package:
        try:
            importlib.import_module(package)
        except ImportError as e:
            return f"{package} cannot be imported ({e})"
    return None


def quantization_config(level):
    """The transformers quantization config of a level, None for plain dtypes and after-load methods."""
    import torch

    spec = LEVELS[level]
    if spec.get("config") == "bnb":
        from transformers import BitsAndBytesConfig

        extra = dict(bnb_4bit_compute_dtype=getattr(torch, spec["dtype"])) if spec["settings"].get("load_in_4bit") \
            else {}
        return BitsAndBytesConfig(**spec["settings"], **extra)
    if spec.get("config") == "torchao":
        from torchao import quantization
        from transformers import TorchAoConfig

        return TorchAoConfig(getattr(quantization, spec["settings"]["method"])())
    return None


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build_level(source_dir, level, out_dir):
    """Save the source student at this level into out_dir (weights, tokenizer, meta.json, DONE)."""
    import torch

    spec = LEVELS[level]
    device = lm.pick_device()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    model = lm.load_model(str(source_dir), device, getattr(torch, spec["dtype"]), quantization_config(level))
    model.save_pretrained(tmp)  # after_load levels: the plain weights; the method is applied at every load
    lm.load_tokenizer(str(source_dir)).save_pretrained(tmp)
    source = Path(source_dir).resolve()
    meta = dict(level=level, source=str(source.relative_to(common.ROOT)) if source.is_relative_to(common.ROOT)
                else source.name,
                source_fingerprint=hashlib.sha256(lm.model_fingerprint(str(source_dir)).encode()).hexdigest()[:16],
                quantization=dict(level=level, **{k: v for k, v in spec.items() if k != "devices"}),
                versions=lm.versions())
    lm.write_json(tmp / "meta.json", meta)
    (tmp / "DONE").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return time.time() - t0


def rerank_orders(model_dir, dtype_name, questions):
    """First-stage candidates reranked by the model at this level: {id: chunk ids best first}, seconds each."""
    import torch

    build_index = importlib.import_module("02_build_index")
    device = lm.pick_device()
    tokenizer = lm.load_tokenizer(str(model_dir))
    model = lm.load_model(str(model_dir), device, getattr(torch, dtype_name))
    index = build_index.load_index().attach_encoder(model, tokenizer)
    hits = index.search_many([q.text for q in questions], k=rerank.CANDIDATES)
    orders, t0 = {}, time.time()
    for q, h in zip(questions, hits):
        order, _, _ = rerank.rerank_question(model, tokenizer, q.text, h)
        orders[q.id] = [h[i][0].id for i in order]
    return orders, (time.time() - t0) / max(len(questions), 1)


def measure_level(model_dir, level, work_dir):
    """Score, speed and memory of one built level on the evaluation subset -> work_dir/measured.json."""
    import torch

    evaluate = importlib.import_module("evaluate")
    questions, labels = eval_set()
    rag = infer.RAG_PASSAGES > 0 and (common.INDEX / "DONE").exists()
    dtype_name = LEVELS[level]["dtype"]
    records, meta = infer.run(questions, work_dir / "answers", str(model_dir), dtype_name, rag=rag)
    rows = infer.submission_rows(questions, records, infer.CALIBRATION, meta["content_free"])
    answers = dict(rows)
    scored = evaluate.score(answers, labels)
    seconds = {kind: [r["seconds"] for r in records if r["kind"] == kind] for kind in ("mc", "desc")}
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    result = dict(level=level, runnable=True, score=scored.get("score"), mc_acc=scored["mc_acc"],
                  desc_score=scored.get("desc_score"), n_mc=scored["n_mc"], n_desc=scored["n_desc"],
                  answers=answers, mc_s=sum(seconds["mc"]) / max(len(seconds["mc"]), 1),
                  desc_s=sum(seconds["desc"]) / max(len(seconds["desc"]), 1), load_s=meta["seconds"]["load"],
                  peak_rss_gib=meta["peak_rss_gib"], peak_gpu_gib=peak_gpu, rag=rag,
                  load_average=meta["load_average"], answered_now=meta["answered_now"])
    if (common.INDEX / "DONE").exists() and RERANK_QUESTIONS:  # measured even when 04 uses no passages
        orders, per_question = rerank_orders(model_dir, dtype_name, spread(questions, RERANK_QUESTIONS))
        result.update(rerank_orders=orders, rerank_s=per_question)
    lm.write_json(work_dir / "measured.json", result)


# ----------------------------------------------------------------------------- across levels
def answer_settings():
    """04's settings that change a level's answers: without passages (RAG_PASSAGES = 0) the other RAG_* settings
    change nothing, so a retrieval experiment does not re-measure every level."""
    settings = common.settings_of(infer)
    if infer.RAG_PASSAGES == 0:
        settings = {k: v for k, v in settings.items() if not k.startswith("RAG_") or k == "RAG_PASSAGES"}
    return settings


def level_key(source_dir, level, indexed):
    """Changes when anything that changes a level's result changes: the source weights, the level, the evaluation
    subset, the settings of the answering (04), reranking (03) and scoring (evaluate) steps and of common (prompts),
    the index (settings and corpus, not its build timings) and the library versions. Like the checkpoint keys of 03
    and 04 it follows settings, not source text: an edit to the code itself does not re-measure (delete
    outputs/05_quantize to force it)."""
    settings = {name: common.settings_of(module) for name, module in (("common", common), ("03", rerank),
                                                               ("evaluate", importlib.import_module("evaluate")))}
    settings["04"] = answer_settings()
    index_meta = json.loads((common.INDEX / "meta.json").read_text(encoding="utf-8")) if indexed else {}
    index = json.dumps({k: index_meta.get(k) for k in ("settings", "corpus", "dense_variant")}, sort_keys=True)
    parts = [lm.model_fingerprint(str(source_dir)), level, json.dumps(LEVELS[level], sort_keys=True),
             str(EVAL_MC), str(EVAL_DESC), str(RERANK_QUESTIONS), index, json.dumps(settings, sort_keys=True),
             json.dumps(lm.versions("bitsandbytes", "torchao"), sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def run_step(args):
    """Run this script in a child process (fresh memory); its failure is the level's, not the sweep's."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=common.ROOT)
    return done.returncode


def measure(source_name, source_dir, level, device, missing_ok=True):
    """result.json of one level, measured now unless a result with the same key exists (missing_ok=False: never
    measure, say what to run instead)."""
    work = OUT / f"{source_name}-{level}"
    key = level_key(source_dir, level, indexed=(common.INDEX / "DONE").exists())
    path = work / "result.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("key") == key:
            return old
    if not missing_ok:
        raise SystemExit(f"05: no current result for {source_name} {level}: run `make quantize` first.")
    base = dict(level=level, source=source_name, key=key, device=device)
    work.mkdir(parents=True, exist_ok=True)
    reason = level_runnable(level, device)
    if reason:
        result = dict(base, runnable=False, reason=reason)
        print(f"05: {source_name} {level}: cannot run here: {reason}")
    else:
        model_dir = work / "model"
        print(f"05: {source_name} {level}: building")
        t0 = time.time()
        failed = run_step(["--build", level, "--source", str(source_dir), "--dir", str(model_dir)])
        build_s = time.time() - t0
        if not failed:
            print(f"05: {source_name} {level}: measuring on the evaluation subset")
            failed = run_step(["--measure", level, "--dir", str(model_dir), "--work", str(work)])
        if failed:
            result = dict(base, runnable=False, reason=f"build or measurement failed (exit {failed}): see the log")
        else:
            measured = json.loads((work / "measured.json").read_text(encoding="utf-8"))
            result = dict(base, **measured, build_s=round(build_s, 1), disk_gib=folder_bytes(model_dir) / 2**30)
        shutil.rmtree(model_dir, ignore_errors=True)  # rebuilt for the chosen level only: disk stays small
    lm.write_json(path, result)
    return result


def projected_seconds(result, n_mc=TEST_MC, n_desc=TEST_DESC):
    """Time for the test at this level on this device: load + answering + reranking every question (when the
    answers use passages)."""
    rerank_s = result.get("rerank_s", 0.0) if result.get("rag") else 0.0
    return result["load_s"] + n_mc * (result["mc_s"] + rerank_s) + n_desc * (result["desc_s"] + rerank_s)


def agreement(result, reference):
    """Share of multiple-choice answers equal to the reference level's, and of reranked top-1 / top-KEEP sets."""
    out = {}
    ref_answers, answers = reference.get("answers", {}), result.get("answers", {})
    mc = [i for i in ref_answers if i in answers and ref_answers[i].isdigit()]
    if mc:
        out["mc_agree"] = sum(answers[i] == ref_answers[i] for i in mc) / len(mc)
    ref_orders, orders = reference.get("rerank_orders", {}), result.get("rerank_orders", {})
    both = [i for i in ref_orders if i in orders and ref_orders[i] and orders[i]]
    if both:
        out["rerank_top1"] = sum(orders[i][0] == ref_orders[i][0] for i in both) / len(both)
        out["rerank_keep"] = sum(len(set(orders[i][:rerank.KEEP]) & set(ref_orders[i][:rerank.KEEP]))
                                 / len(ref_orders[i][:rerank.KEEP]) for i in both) / len(both)
    return out


def paired_se(a, b, labels):
    """Standard error of score(a) - score(b) from the multiple-choice questions both answered: the per-question
    differences in correctness are paired, so agreement between the levels shrinks it. 0 without answers."""
    evaluate = importlib.import_module("evaluate")
    return 0.5 * evaluate.mc_difference(a.get("answers", {}), b.get("answers", {}), labels)[1]  # MC is half the score


def better(a, b, noise=None, tolerance=SCORE_TOLERANCE, z=NOISE_Z):
    """True when a scores above b by more than the tie margin: tolerance, or z paired standard errors."""
    margin = max(tolerance, z * noise(a, b) if noise else 0.0)
    return a["score"] > b["score"] + margin


def select(rows, limit_s=TIME_LIMIT_HOURS * 3600, margin=SAFETY_MARGIN, tolerance=SCORE_TOLERANCE, noise=None,
           z=NOISE_Z):
    """(chosen row, warning or None, tied rows): the best score among runnable levels projected within margin x
    limit. Levels the best does not beat by more than max(tolerance, z x noise(best, level)) are tied with it, and
    the fastest of those wins (then the smallest on disk). When no level fits, the fastest runnable one, with a
    warning."""
    runnable = [r for r in rows if r.get("runnable") and r.get("score") is not None]
    if not runnable:
        raise SystemExit("05: no quantization level could be measured: see the reasons in reports/quantize.md.")
    inside = [r for r in runnable if r["projected_s"] <= limit_s * margin]
    if not inside:
        fastest = min(runnable, key=lambda r: r["projected_s"])
        return fastest, (f"no level is projected within {margin:.0%} of the {limit_s / 3600:.1f} h limit: chose the "
                         f"fastest, {fastest['level']} ({fastest['projected_s'] / 3600:.2f} h). Use a smaller model, "
                         "fewer reranked candidates or a faster device."), [fastest]
    best = max(inside, key=lambda r: r["score"])
    tied = [r for r in inside if not better(best, r, noise, tolerance, z)]
    return min(tied, key=lambda r: (r["projected_s"], r.get("disk_gib") or 0.0)), None, tied


def save_final(source_name, source_dir, row):
    """Rebuild the chosen level into models/student-final, its measurements in selection.json."""
    tmp = common.MODELS / "student-final.build"
    failed = run_step(["--build", row["level"], "--source", str(source_dir), "--dir", str(tmp)])
    if failed:
        raise SystemExit(f"05: rebuilding the chosen level {row['level']} failed: see the log above.")
    # The measurements go beside meta.json, not into it: meta.json is the model's fingerprint for the checkpoints of
    # 03 and 04, and the same weights re-selected with new timings must not make them answer again.
    chosen = {k: v for k, v in row.items() if k not in ("answers", "rerank_orders")}
    lm.write_json(tmp / "selection.json", dict(chosen=dict(chosen, source_name=source_name), settings=dict(
        TIME_LIMIT_HOURS=TIME_LIMIT_HOURS, SAFETY_MARGIN=SAFETY_MARGIN, SCORE_TOLERANCE=SCORE_TOLERANCE,
        NOISE_Z=NOISE_Z, EVAL_MC=EVAL_MC, EVAL_DESC=EVAL_DESC)))
    shutil.rmtree(common.FINAL, ignore_errors=True)
    tmp.replace(common.FINAL)


# ----------------------------------------------------------------------------- report
def svg_plot(rows, limit_s, margin, chosen_level):
    """Score against projected hours, one numbered point per level (names in a legend on the right: on a fast
    device the points crowd together), the limit and the margin as vertical lines."""
    w, h, pad, legend = 820, 360, 56, 200
    points = [(r["projected_s"] / 3600, r["score"], r["level"]) for r in rows]
    x_max = max([limit_s / 3600 * 1.1] + [p[0] * 1.1 for p in points])
    ys = [p[1] for p in points] or [0.0]
    y_lo, y_hi = min(ys) - 0.05, max(ys) + 0.05

    def px(x):
        return pad + (w - legend - 2 * pad) * x / x_max

    def py(y):
        return h - pad - (h - 2 * pad) * (y - y_lo) / (y_hi - y_lo or 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - legend - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{(w - legend) / 2}" y="{h - 16}" text-anchor="middle">projected hours for '
             f'{TEST_MC + TEST_DESC} questions</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">dev score</text>']
    for tick in range(int(x_max) + 1):
        parts.append(f'<text x="{px(tick):.1f}" y="{h - pad + 14}" text-anchor="middle">{tick}</text>')
    for frac in (0.0, 0.5, 1.0):
        y = y_lo + frac * (y_hi - y_lo)
        parts.append(f'<text x="{pad - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x, style, label in ((limit_s / 3600, "red", f"{limit_s / 3600:.1f} h limit"),
                            (limit_s * margin / 3600, "orange", f"{margin:.0%} margin")):
        parts.append(f'<line x1="{px(x):.1f}" y1="{pad}" x2="{px(x):.1f}" y2="{h - pad}" stroke="{style}" '
                     f'stroke-dasharray="{"" if style == "red" else "4 3"}"/>')
        parts.append(f'<text x="{px(x) + 3:.1f}" y="{pad - 6}" fill="{style}">{label}</text>')
    for i, (x, y, level) in enumerate(points, 1):
        colour = "green" if level == chosen_level else "steelblue"
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}"/>')
        parts.append(f'<text x="{px(x) + 5:.1f}" y="{py(y) - 5:.1f}" fill="{colour}">{i}</text>')
        parts.append(f'<text x="{w - legend + 10}" y="{pad + 16 * i}" fill="{colour}">{i}  {level}  {y:.3f}  '
                     f'{x:.2f} h</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def report(rows, reference, chosen, warning, tied, source_name, source_rows, command):
    """The markdown report: one table row per level (runnable or not), the selection, how it was measured."""
    first = next((r for r in rows if r.get("runnable")), {})
    lines = ["# Quantization levels of the student (05_quantize.py)", "",
             f"Command: `{command}`. Device: {first.get('device', '–')}; load average at the runs: "
             f"{', '.join(fmt(r.get('load_average'), 1) for r in rows if r.get('runnable'))}.", "",
             f"Evaluation subset: {first.get('n_mc', 0)} multiple-choice + {first.get('n_desc', 0)} descriptive "
             f"development questions spread evenly over the shared eval folder (EVAL_MC={EVAL_MC}, "
             f"EVAL_DESC={EVAL_DESC}), "
             f"answered {'with first-stage retrieved passages' if first.get('rag') else 'without retrieval'} "
             f"(04_infer.py RAG_PASSAGES={infer.RAG_PASSAGES}); reranker agreement and cost on {RERANK_QUESTIONS} "
             "of them. Score = 0.5 × MC accuracy + 0.5 × "
             "descriptive (cosine term: evaluate.py's scorer). Agreement is with the "
             f"{REFERENCE} reference: same MC option, same reranked top-1, share of the kept top-{rerank.KEEP}.", "",
             f"Projected time = load + {TEST_MC} × (MC s/q + rerank s/q) + {TEST_DESC} × (descriptive s/q + "
             "rerank s/q), measured on this device (retrieval included in the answer times; rerank s/q counts only "
             "when the answers use passages).", ""]
    lines += ["## Levels", "",
              "| level | score | MC acc | desc | MC agree | rerank top-1 | rerank top-3 | MC s/q | desc s/q | "
              "rerank s/q | load s | peak RSS GiB | disk GiB | projected h |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("runnable"):
            lines.append(f"| {r['level']} | not run: {r.get('reason')} |" + " |" * 12)
            continue
        a = agreement(r, reference)
        mark = " **(chosen)**" if r is chosen else ""
        lines.append(f"| {r['level']}{mark} | {fmt(r['score'])} | {fmt(r['mc_acc'])} | {fmt(r.get('desc_score'))} | "
                     f"{fmt(a.get('mc_agree'), 2)} | {fmt(a.get('rerank_top1'), 2)} | {fmt(a.get('rerank_keep'), 2)} | "
                     f"{fmt(r['mc_s'], 2)} | {fmt(r['desc_s'], 2)} | {fmt(r.get('rerank_s'), 2)} | "
                     f"{fmt(r['load_s'], 1)} | {fmt(r.get('peak_gpu_gib') or r['peak_rss_gib'], 2)} | "
                     f"{fmt(r.get('disk_gib'), 2)} | {fmt(r['projected_s'] / 3600, 2)} |")
    lines += ["", "![score against projected time](quantize.svg)", ""]
    if source_rows:
        lines += ["## Source student (reference level)", "", "| source | score | MC acc | descriptive |",
                  "|---|---|---|---|"]
        lines += [f"| {r['source']} | {fmt(r.get('score'))} | {fmt(r.get('mc_acc'))} | {fmt(r.get('desc_score'))} |"
                  for r in source_rows]
        lines += ["", f"Quantized: **{source_name}** (the distilled student must beat the base beyond the tie "
                  "margin of the selection rule below; otherwise the base is kept).", ""]
    lines += ["## Chosen level", "",
              f"Rule: the highest score among levels projected within {SAFETY_MARGIN:.0%} of the "
              f"{TIME_LIMIT_HOURS} h limit; a level the best does not beat by more than max({SCORE_TOLERANCE}, "
              f"{NOISE_Z} × the standard error of their paired MC difference) is tied with it, and the fastest "
              f"tied level wins. Tied with the best score here: {', '.join(r['level'] for r in tied)}. Chosen: "
              f"**{chosen['level']}** (score {fmt(chosen['score'])}, projected {chosen['projected_s'] / 3600:.2f} h) "
              "-> models/student-final.", ""]
    if warning:
        lines += [f"**Warning:** {warning}", ""]
    return "\n".join(lines)


def collect(device, noise, missing_ok=True):
    """Measure every level (reference first, for each source) and return (source name, dir, rows, source rows).
    The distilled student is quantized only when it beats the base beyond the tie margin (see select)."""
    found = sources()
    source_rows = [measure(name, path, REFERENCE, device, missing_ok) for name, path in found.items()]
    name = "base"
    if len(source_rows) > 1:
        base, distilled = source_rows
        if distilled.get("score") is not None and (base.get("score") is None or better(distilled, base, noise)):
            name = "distilled"
    levels = [REFERENCE] + [lv for lv in MEASURE if lv != REFERENCE]
    rows = [measure(name, found[name], level, device, missing_ok) for level in levels]
    for r in rows:
        if r.get("runnable"):
            r["projected_s"] = projected_seconds(r)
    return name, found[name], rows, source_rows if len(source_rows) > 1 else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", help="(child step) save --source at this level into --dir")
    parser.add_argument("--measure", help="(child step) measure the level built in --dir into --work")
    parser.add_argument("--source", type=Path)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the measured results")
    parser.add_argument("--command", default="make quantize")
    args = parser.parse_args()
    if args.build:
        build_level(args.source, args.build, args.dir)
        return
    if args.measure:
        measure_level(args.dir, args.measure, args.work)
        return

    unknown = [lv for lv in [REFERENCE, *MEASURE] if lv not in LEVELS]
    if unknown:
        raise SystemExit(f"05: unknown levels {unknown}: MEASURE and REFERENCE take names from LEVELS.")
    if not (common.STUDENT_BASE / "DONE").exists():
        raise SystemExit("05: no base student: run `make student` first.")
    device = lm.pick_device()
    print(f"05: levels {[REFERENCE] + [lv for lv in MEASURE if lv != REFERENCE]} on {device}; settings "
          + json.dumps(dict(EVAL_MC=EVAL_MC, EVAL_DESC=EVAL_DESC, RERANK_QUESTIONS=RERANK_QUESTIONS,
                            TIME_LIMIT_HOURS=TIME_LIMIT_HOURS, SAFETY_MARGIN=SAFETY_MARGIN,
                            SCORE_TOLERANCE=SCORE_TOLERANCE)))
    labels = eval_set()[1]

    def noise(a, b):
        return paired_se(a, b, labels)

    name, source_dir, rows, source_rows = collect(device, noise, missing_ok=not args.report_only)
    reference = rows[0]
    limit_s = TIME_LIMIT_HOURS * 3600
    chosen, warning, tied = select(rows, limit_s, noise=noise)
    if warning:
        print(f"05: WARNING: {warning}")
    if not args.report_only:
        save_final(name, source_dir, chosen)
        (common.FINAL / "DONE").touch()
    common.REPORTS.mkdir(exist_ok=True)
    measured = [r for r in rows if r.get("runnable")]
    (common.REPORTS / "quantize.svg").write_text(svg_plot(measured, limit_s, SAFETY_MARGIN, chosen["level"]),
                                                 encoding="utf-8")
    text = report(rows, reference, chosen, warning, tied, name, source_rows, args.command)
    tmp = common.REPORTS / "quantize.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, common.REPORTS / "quantize.md")
    print(f"05: chose {chosen['level']} of the {name} student (score {chosen['score']:.3f}, projected "
          f"{chosen['projected_s'] / 3600:.2f} h) -> {common.FINAL}; report -> reports/quantize.md")


if __name__ == "__main__":
    main()
