"""Competition score of one or more answer runs on the development set, written as a markdown report.

Reads data/prepared/labels.csv (`make data` without data/test.csv) and, per run folder (04_infer.py --out),
submission.csv, meta.json and the raw predictions. Score = 0.5 x multiple-choice accuracy + 0.5 x descriptive,
descriptive = 0.6 x cosine similarity (answer vs reference) + 0.4 x keyword recall. Writes the report given by
--out. Run by `make eval` (reports/eval.md) and `make baseline-report` (reports/baseline.md).
"""
import argparse
import csv
import difflib
import importlib
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import common
import competition

# ----------------------------------------------------------------------------- settings
# The competition's sentence encoder is not reachable offline. Default: TF-IDF over character 2-3-grams, a
# lexical stand-in with no model; set a directory of any transformers sentence encoder to use it instead
# (mean pooling over the last hidden state).
SCORER_ENCODER = "char-ngram"
NGRAMS = (2, 3)
W_MC, W_DESC, W_COS, W_KW = 0.5, 0.5, 0.6, 0.4
CALIBRATIONS = ["none", "content_free", "batch", "auto"]
COPY_SPAN_CHARS = 40  # a descriptive answer sharing this many characters verbatim with its passages counts as copied
# -----------------------------------------------------------------------------

infer = importlib.import_module("04_infer")


def normalise_text(text):
    return re.sub(r"\s+", "", str(text)).lower()


def keywords_of(keyword_field):
    """Keywords of a reference: split on commas, slashes and spaces."""
    return [k for k in re.split(r"[,/\s]+", str(keyword_field or "")) if k]


def keyword_recall(answer, keywords):
    """Fraction of the keywords found in the answer (whitespace and case ignored); 0 for no keywords."""
    if not keywords:
        return 0.0
    text = normalise_text(answer)
    return sum(normalise_text(k) in text for k in keywords) / len(keywords)


def char_ngrams(text):
    grams = Counter()
    for word in str(text).split():
        for n in NGRAMS:
            grams.update(word[i:i + n] for i in range(max(len(word) - n + 1, 1)))
    return grams


def char_ngram_cosines(answers, references):
    """Cosine of TF-IDF character n-gram vectors of each (answer, reference) pair, idf fitted on both sides."""
    docs = [char_ngrams(t) for t in list(answers) + list(references)]
    df = Counter(g for d in docs for g in d)
    idf = {g: math.log((1 + len(docs)) / (1 + c)) + 1 for g, c in df.items()}

    def vector(d):
        v = {g: tf * idf[g] for g, tf in d.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {g: x / norm for g, x in v.items()}

    half = len(answers)
    out = []
    for a, r in zip(docs[:half], docs[half:]):
        va, vr = vector(a), vector(r)
        out.append(sum(x * vr.get(g, 0.0) for g, x in va.items()))
    return out


def encoder_cosines(answers, references, encoder_dir):
    """Cosine of mean-pooled hidden states of a transformers encoder directory."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).eval()

    @torch.no_grad()
    def embed(texts):
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return (embed(answers) * embed(references)).sum(-1).tolist()


def cosines(answers, references, encoder=SCORER_ENCODER):
    if encoder == "char-ngram":
        return char_ngram_cosines(answers, references)
    return encoder_cosines(answers, references, encoder)


def read_labels(path=common.LABELS):
    if not Path(path).exists():
        raise SystemExit(f"{path} not found: scoring needs the development labels (`make data` without "
                         "data/test.csv); the competition test has no public answers.")
    with open(path, encoding="utf-8", newline="") as f:
        return {r["ID"]: r for r in csv.DictReader(f)}


def load_run(run_dir):
    """(submission answers by id, meta, raw prediction records) of a 04_infer.py output folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "DONE").exists():
        raise SystemExit(f"{run_dir} has no finished run: run 04_infer.py --out {run_dir} first.")
    answers = dict(competition.read_submission(run_dir / "submission.csv"))
    meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    records = [r for r in infer.load_checkpoint(run_dir / meta["predictions"]).values() if r["id"] in answers]
    return answers, meta, records


def score(answers, labels, encoder=SCORER_ENCODER):
    """Competition score of answers {id: answer} over the labelled ids they cover."""
    mc = [i for i in answers if labels.get(i, {}).get("kind") == "mc"]
    desc = [i for i in answers if labels.get(i, {}).get("kind") == "desc"]
    correct = {i: answers[i].strip() == labels[i]["Answer"].strip() for i in mc}
    per_domain = defaultdict(list)
    for i in mc:
        per_domain[labels[i]["domain"]].append(correct[i])
    result = dict(n_mc=len(mc), n_desc=len(desc), mc_acc=sum(correct.values()) / len(mc) if mc else None,
                  per_domain={d: (sum(v) / len(v), len(v)) for d, v in sorted(per_domain.items())})
    if desc:
        cos = cosines([answers[i] for i in desc], [labels[i]["Answer"] for i in desc], encoder)
        kw = [keyword_recall(answers[i], keywords_of(labels[i]["Keyword"])) for i in desc]
        result.update(cosine=sum(cos) / len(cos), keyword_recall=sum(kw) / len(kw))
        result["desc_score"] = W_COS * result["cosine"] + W_KW * result["keyword_recall"]
    if mc and desc:
        result["score"] = W_MC * result["mc_acc"] + W_DESC * result["desc_score"]
    return result


def mc_difference(a, b, labels):
    """(MC accuracy of answers a minus answers b, its standard error) over the multiple-choice questions both
    answered: the per-question differences in correctness are paired, so agreement between the runs shrinks the
    error. Error 0 with fewer than 2 such questions."""
    ids = [i for i in a if i in b and labels.get(i, {}).get("kind") == "mc"]
    d = [(a[i] == labels[i]["Answer"]) - (b[i] == labels[i]["Answer"]) for i in ids]
    mean = sum(d) / max(len(d), 1)
    if len(d) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def most_frequent(answers):
    """The most frequent answer and its share, e.g. "1 (96%)"; "–" for no answers."""
    if not answers:
        return "–"
    option, count = Counter(answers.values()).most_common(1)[0]
    return f"{option} ({count / len(answers):.0%})"


def calibration_table(records, meta, labels):
    """Accuracy and answer spread per calibration mode, from the raw option log-probabilities."""
    rows = []
    for mode in CALIBRATIONS:
        answers = infer.calibrated_answers(records, mode, meta.get("content_free"))
        if not answers:
            continue
        acc = sum(answers[i] == labels[i]["Answer"] for i in answers) / len(answers)
        name = f"auto → {infer.auto_mode(records)}" if mode == "auto" else mode
        rows.append((name, acc, len(answers), most_frequent(answers)))
    return rows


def dtype_agreement(run_a, run_b):
    """Top-1 agreement and mean max |Δp| over options between two runs' raw predictions."""
    _, meta_a, rec_a = load_run(run_a)
    _, meta_b, rec_b = load_run(run_b)
    b_by_id = {r["id"]: r for r in rec_b if r["kind"] == "mc"}
    pairs = [(r["logprobs"], b_by_id[r["id"]]["logprobs"]) for r in rec_a if r["id"] in b_by_id]
    agree = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in pairs)
    diff = [max(abs(math.exp(x) - math.exp(y)) for x, y in zip(infer.normalise(a), infer.normalise(b)))
            for a, b in pairs]
    return dict(n=len(pairs), agree=agree / len(pairs), max_dp=sum(diff) / len(diff), meta_a=meta_a, meta_b=meta_b)


def passages_by_key(index_dir=common.INDEX):
    """{(law, kind, article): [chunk texts without their header line]} of the index, {} without one."""
    out = defaultdict(list)
    if (Path(index_dir) / "chunks.jsonl").exists():
        for chunk in importlib.import_module("02_build_index").read_chunks(index_dir):
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


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def run_section(name, answers, meta, records, labels):
    s = score(answers, labels)
    lines = [f"### {name}", "",
             f"model `{meta['model']}` on {meta['device']} ({meta['dtype']}), calibration `{meta['calibration']}`", "",
             "| metric | value |", "|---|---|",
             f"| **competition score** (0.5 MC + 0.5 descriptive) | **{fmt(s.get('score'))}** |",
             f"| multiple-choice accuracy ({s['n_mc']} questions) | {fmt(s['mc_acc'])} |",
             f"| descriptive score ({s['n_desc']} questions) | {fmt(s.get('desc_score'))} |",
             f"| descriptive cosine ({SCORER_ENCODER}) | {fmt(s.get('cosine'))} |",
             f"| descriptive keyword recall | {fmt(s.get('keyword_recall'))} |",
             f"| seconds per question | {fmt(meta['seconds']['per_question'], 2)} |",
             f"| prefill tokens/s | {fmt(meta.get('prefill_tokens_per_s'), 0)} |",
             f"| generated tokens/s (batch {meta['settings']['DESC_BATCH']}) | "
             f"{fmt(meta.get('generated_tokens_per_s'), 1)} |",
             f"| peak RSS (GiB) | {fmt(meta['peak_rss_gib'], 2)} |",
             f"| load average at the end (2 cores; > 2 means other jobs shared the CPU) | "
             f"{fmt(meta.get('load_average'), 1)} |", "",
             "| domain | accuracy | questions |", "|---|---|---|"]
    if meta.get("rag"):
        checked, copied, longest = copy_check(answers, records, passages_by_key())
        lines.insert(-3, f"| descriptive answers sharing ≥ {COPY_SPAN_CHARS} characters verbatim with their passages "
                         f"(of {checked} with passages; longest shared span) | {copied} ({longest} characters) |")
    lines += [f"| {d} | {acc:.3f} | {n} |" for d, (acc, n) in s["per_domain"].items()]
    lines += ["", "| calibration | MC accuracy | questions | most frequent answer |", "|---|---|---|---|"]
    lines += [f"| {m} | {acc:.3f} | {n} | {top} |" for m, acc, n, top in calibration_table(records, meta, labels)]
    return lines + [""], s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a 04_infer.py output folder (repeatable)")
    parser.add_argument("--speed", nargs="+", metavar="RUN",
                        help="runs on the same questions for the speed table; the first two are one model in fp32 "
                             "and in another dtype, compared option by option")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--command", default="make eval", help="the command that produced the report")
    args = parser.parse_args()

    labels = read_labels()
    title = "Baseline: no retrieval" if args.speed else "Development-set evaluation"
    lines = [f"# {title}", "", f"Produced by `{args.command}`. Labels: `{common.LABELS.relative_to(common.ROOT)}` "
             f"(FSKU development set, never used for training or prompts). Chance on 4 options is 0.25.", "",
             f"Descriptive cosine encoder: `{SCORER_ENCODER}` (TF-IDF over character {NGRAMS[0]}-{NGRAMS[-1]}-grams: "
             "the competition's encoder is not available offline; set `SCORER_ENCODER` in evaluate.py to a "
             "sentence-encoder directory to swap it).", ""]
    sections, summary = [], ["## Summary", "", "| run | score | MC accuracy | descriptive | s/question |",
                             "|---|---|---|---|---|"]
    for run_dir in args.run:
        answers, meta, records = load_run(run_dir)
        section, s = run_section(Path(run_dir).name, answers, meta, records, labels)
        sections += section
        summary.append(f"| {Path(run_dir).name} | {fmt(s.get('score'))} | {fmt(s['mc_acc'])} | "
                       f"{fmt(s.get('desc_score'))} | {fmt(meta['seconds']['per_question'], 2)} |")
    lines += summary + [""] + sections
    if args.speed:
        d = dtype_agreement(*args.speed[:2])
        lines += ["## Speed on this CPU and the CPU dtype check (first questions, multiple choice only)", "",
                  "| run | model | dtype | s/question | prefill tokens/s | peak RSS GiB | load average |",
                  "|---|---|---|---|---|---|---|"]
        for run_dir in args.speed:
            m = json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
            lines.append(f"| {Path(run_dir).name} | `{m['model']}` | {m['dtype']} | "
                         f"{fmt(m['seconds']['per_question'], 2)} | {fmt(m.get('prefill_tokens_per_s'), 0)} | "
                         f"{fmt(m['peak_rss_gib'], 2)} | {fmt(m.get('load_average'), 1)} |")
        lines += ["", f"Top-1 option agreement {d['meta_b']['dtype']} vs {d['meta_a']['dtype']}: "
                  f"**{d['agree']:.1%}** over {d['n']} questions; mean of the largest |Δp| per question "
                  f"{d['max_dp']:.3f}. A load average above 2 means other jobs shared the two cores during the "
                  "run: the times are then upper bounds.", ""]
        lines += setup_lines()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    print(f"eval: wrote {args.out}")


def setup_lines():
    """Times of `make setup` and `make models` as recorded by those steps."""
    lines = ["## Setup times on this machine", "", "| step | seconds |", "|---|---|"]
    setup = common.ROOT / ".venv" / "setup_seconds"
    if setup.exists():
        lines.append(f"| make setup (pip with a warm cache) | {setup.read_text().strip()} |")
    for base in (common.STUDENT_BASE, common.TEACHER_BASE):
        meta_path = base / "meta.json"
        if meta_path.exists():
            m = json.loads(meta_path.read_text(encoding="utf-8"))
            lines.append(f"| make {m['name']} (download {m['seconds']['download_and_check']} s, "
                         f"{m['parameters'] / 1e6:.0f}M parameters) | {m['seconds']['total']} |")
    return lines + [""]


if __name__ == "__main__":
    main()
