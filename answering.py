"""Answering with the one LLM: prompt -> option scores -> calibration -> answer; descriptive generation and clean-up.

Also holds the answering configuration (`Config`): which candidate model answers, at which quantization level, with
which option calibration, how many retrieved passages and for which questions (all, a share where retrieval looks
surest, or a cascade: only where the answer without them is unsure). `chosen()` reads it from selection.json,
written by `make select` (05_quantize.py) and committed, so a fresh clone answers with the measured choice.
Used by 04_infer.py (the submission), 05_quantize.py (measuring candidates) and the report scripts.
"""
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace

from tqdm import tqdm

import common
import competition
import lm
import retrieval

# ----------------------------------------------------------------------------- settings
MC_BATCH = 8  # prompts per forward pass; also the checkpoint unit (a batch takes seconds, never minutes)
DESC_BATCH = 8  # generation batch (decode is ~8x faster per token at batch 8 than 1 on CPU)
DESC_MAX_NEW_TOKENS = 128  # the reference answers are one or two sentences
DESC_GENERATION = dict()  # further generate() options; no_repeat_ngram_size also blocks the question's own words
# (it counts the prompt): keyword recall fell from 0.86 to 0.59 with the teacher (reports/desc.md)
DESC_MAX_SENTENCES = 1  # the answer's first sentence: its conclusion with the question's terms as subject
DESC_RESTATE = False  # lead with the question's subject ("<subject>: <answer>"): more keywords, lower cosine; the
# terms-first instruction's first sentence already names them (teacher on dev: 0.895, cosine 0.889, keyword recall
# 0.904 vs restated 3 sentences of the old instruction 0.887, 0.870, 0.914; reports/desc.md)
AUTO_SKEW = 0.5  # auto: batch calibration when one option wins more than this share of the raw answers, else none
CONTENT_FREE_STEMS = ["N/A", "[빈칸]", ""]  # content-free prompts for content_free calibration (Zhao et al. 2021)
BATCH_MIN = 50  # fewer questions of one option count than this: batch calibration uses the content-free prior
RAG_MAX_TOKENS = 512  # token budget of the passages in a prompt: prefill time grows with it
PASSAGE_SIGNAL = "ratio"  # a slower CPU that cannot give every MC question its passages (fitted: Config.passage_share)
# gives them where the first stage looks surest: highest top/second BM25 score ratio (retrieval.bm25_signals;
# reports/gate.md: 0.665 MC for half the questions, 0.647 for a fifth, vs 0.606 none and 0.679 all, teacher, 2026-12-06)
MIN_PASSAGE_SHARE = 0.05  # a slower CPU that can afford passages for fewer MC questions than this gives them to none
CASCADE_COST_BOUND = 5.0  # a cascade asks every unsure question again in one run when that fits the budget even if a
# prompt with passages cost this many prompts without (1 passage, teacher: 3.9 on an avx512_bf16 CPU); else it times
# CASCADE_PROBE of them first (most unsure first) and asks as many more as the budget affords (run_cascade)
CASCADE_PROBE = 16  # multiple-choice questions a budgeted cascade asks again first, to time a passage prompt
DESC_PASSAGES = False  # descriptive questions read passages too; with the teacher, one fused first-stage passage
# lowered the descriptive score by 0.094 ± 0.018 (keyword recall 0.904 -> 0.690) while it raised MC by 0.066 ± 0.024
# (2026-12-06, the gate report of that run: README); multiple choice always reads the configured passages
RAG_NO_COPY_TOKENS = 12  # a descriptive answer never repeats this many consecutive passage tokens (~19 characters)
# -----------------------------------------------------------------------------

CALIBRATIONS = ("none", "content_free", "batch", "auto", "permute", "pride")
MEASURED = ("prefill_tokens_per_s", "generated_tokens_per_s", "peak_rss_gib", "peak_gpu_gib", "load_average", "timing")


@dataclass
class Config:
    """What answers: a candidate (a common.candidates() name, or a model folder / hub id), its level (lm.LEVELS), the
    option calibration (CALIBRATIONS), the cyclic option shifts scored per question (permute: every question;
    pride: the pride_share of the questions that estimate the position prior), the passages per prompt, whether
    03's LLM reranking orders them (rerank False: the first stage's best passages, no 03) and the share of the
    multiple-choice questions that read them (below 1 only where a slower CPU falls back: fitted, run_groups). With
    cascade t > 0, every question is first answered without passages (in the identity order) and a multiple-choice
    question whose top option takes less than t of the probability is asked again with them, under permute in
    `permutations` option orders, and answered from the surer prompt (run_groups)."""

    candidate: str = "student"
    level: str = "float"
    calibration: str = "auto"
    permutations: int = 1
    pride_share: float = 0.0
    passages: int = 0
    rerank: bool = True
    passage_share: float = 1.0
    cascade: float = 0.0

    @property
    def model(self):
        """The model folder (relative to the checkout) or hub id of the candidate."""
        return common.candidates().get(self.candidate, self.candidate)

    def check(self):
        """The config itself, or a clear error naming the setting to fix."""
        if self.calibration not in CALIBRATIONS:
            raise SystemExit(f"unknown calibration {self.calibration!r}: use one of {', '.join(CALIBRATIONS)}.")
        if self.level not in lm.LEVELS:
            raise SystemExit(f"unknown level {self.level!r}: use one of {', '.join(lm.LEVELS)}.")
        if self.calibration in ("permute", "pride") and self.permutations < 2:
            raise SystemExit(f"calibration {self.calibration!r} needs permutations >= 2 (got {self.permutations}).")
        if self.passages < 0:
            raise SystemExit("passages must be 0 or more.")
        if not 0.0 < self.passage_share <= 1.0:
            raise SystemExit(f"passage_share must be above 0 and at most 1 (got {self.passage_share}).")
        if not 0.0 <= self.cascade <= 1.0:
            raise SystemExit(f"cascade must be between 0 (off) and 1 (got {self.cascade}).")
        if self.cascade and (not self.passages or self.calibration not in ("none", "permute")
                             or self.passage_share < 1.0):
            raise SystemExit("cascade compares the raw option probabilities of a prompt without passages with those of "
                             "one with them (under permute: their mean over the option orders): it needs passages >= "
                             "1, calibration none or permute and passage_share 1 (or set cascade 0).")
        return self


def chosen(path=None, fit=False):
    """The committed answering configuration (selection.json's "config"), the defaults of Config without one.

    With fit, on a CPU slower than the one that made the choice, the projected time is rescaled by the two machines'
    matmul speed (lm.cpu_float_dtype's benchmark) and, when it no longer fits the budget, the best recorded
    alternative of the same model and passages that does is used instead, or that model without passages for all
    but the share of the questions it can afford (fitted; said in one line). A chosen cascade is kept: it fits
    itself to the time it measures (run_cascade with budget_seconds()).
    """
    path = path or common.SELECTION
    if not path.exists():
        return Config()
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(Config)}
    unknown = set(data.get("config", {})) - known
    if unknown:
        raise SystemExit(f"{path}: unknown config fields {sorted(unknown)}: rerun `make select` or fix the file.")
    config = Config(**data.get("config", {})).check()
    return fitted(config, data) if fit else config


def machine_slowdown(data):
    """How many times slower this CPU multiplies in its float dtype than the machine that made the selection (1.0
    on a GPU, or when either speed is unknown)."""
    if lm.device_kind(lm.pick_device()) != "cpu" or data.get("device", "cpu").startswith("cuda"):
        return 1.0
    then = (data.get("machine") or {}).get("gflops") or {}
    then = then.get((data.get("machine") or {}).get("cpu_dtype") or "", 0.0)
    now = lm.cpu_gflops()
    return then / now if then and now else 1.0


def budget_seconds(path=None):
    """The time budget selection.json's choice was made under (seconds for the competition's test on its device),
    None without one."""
    path = path or common.SELECTION
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return (data.get("figures") or {}).get("budget_s")


def fitted(config, data):
    """The config, or the best alternative of selection.json that fits its budget on this machine: same model,
    passages and reranking (those decide what `make` builds), or the same model without passages (it needs less of
    what `make` built)."""
    if config.cascade:  # it measures its own speed (run_cascade): on an AVX2 CPU the matmul ratio said 4.7x slower
        return config  # where the teacher's answers took 2.6-3.1x (reports/slow-cpu.md, README)
    budget = (data.get("figures") or {}).get("budget_s")
    slowdown = machine_slowdown(data)
    if not budget or slowdown <= 1.0:
        return config
    options = [dict(a, config=Config(**a["config"])) for a in data.get("alternatives", [])]
    built = (config.candidate, config.passages, config.rerank)
    options = [a for a in options if (a["config"].candidate, a["config"].passages, a["config"].rerank) == built
               or (a["config"].candidate == config.candidate and config.passages and not a["config"].passages)] \
        or [dict(config=config, projected_s=0.0)]
    for option in options:
        if option["projected_s"] * slowdown <= budget:
            break
    else:
        option = min(options, key=lambda a: a["projected_s"])
    fit = with_passage_share(config, data, option, slowdown, budget)
    if fit != config:
        print(f"answering: this CPU multiplies {slowdown:.1f}x slower than the one that chose {config}; "
              f"{fit} fits the {budget / 60:.0f} min budget instead (selection.json alternatives)")
    return fit


def with_passage_share(config, data, option, slowdown, budget):
    """The option fitted chose, or, when that is the chosen model without the chosen first-stage passages (both
    reading one prompt per question), the option with passages for the largest share of the multiple-choice
    questions that still fits: the time grows linearly from the option's projection to the chosen one's."""
    plain, one_prompt = option["config"], ("none", "batch", "auto", "content_free")
    full_s = data["figures"].get("projected_s")
    if not config.passages or config.rerank or plain.passages or not full_s \
            or {config.calibration, plain.calibration} - set(one_prompt):  # fitted offers the chosen model only
        return plain
    full_s, plain_s = full_s * slowdown, option["projected_s"] * slowdown
    share = math.floor(100 * (budget - plain_s) / (full_s - plain_s)) / 100 if full_s > plain_s else 0.0
    if share < MIN_PASSAGE_SHARE:
        return plain
    return replace(plain, passages=config.passages, rerank=False, passage_share=min(share, 1.0))


# ----------------------------------------------------------------------------- option calibration
def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def normalise(logprobs):
    """Renormalise log-probabilities over the options only."""
    z = logsumexp(logprobs)
    return [x - z for x in logprobs]


def option_prior(records, mode, content_free=None):
    """Log prior per option count: from content-free prompts, or the mean predicted distribution over the question
    set (batch calibration, Zhou et al. 2024; content-free below BATCH_MIN questions). 'none' -> a zero prior."""
    priors = {}
    counts = sorted({len(r["logprobs"]) for r in records})
    for n in counts:
        if mode == "none":
            priors[n] = [0.0] * n
        elif mode == "content_free":
            priors[n] = normalise(content_free[str(n)]) if content_free else [0.0] * n
        elif mode == "batch":
            probs = [[math.exp(x) for x in normalise(r["logprobs"])] for r in records if len(r["logprobs"]) == n]
            if len(probs) < BATCH_MIN:  # the mean of a few questions is their own answers, not a prior
                priors[n] = option_prior(records, "content_free", content_free)[n]
                continue
            priors[n] = [math.log(sum(col) / len(col)) for col in zip(*probs)]
        else:
            raise SystemExit(f"unknown CALIBRATION {mode!r}: use one of {', '.join(CALIBRATIONS)}.")
    return priors


def auto_mode(records):
    """'batch' when the raw answers pile onto one option (the 0.5B student: 96% option 1), else 'none'.
    Label-free: it looks only at the model's own answers."""
    mc = [r for r in records if r["kind"] == "mc"]
    if not mc:
        return "none"
    raw = Counter(max(range(len(r["logprobs"])), key=r["logprobs"].__getitem__) for r in mc)
    return "batch" if raw.most_common(1)[0][1] / len(mc) > AUTO_SKEW else "none"


def shifted(options, shift):
    """The options rotated left by shift: position j shows option (j + shift) mod n."""
    n = len(options)
    return [options[(j + shift) % n] for j in range(n)]


def unshift(logprobs, shift):
    """Scores read at the positions of a shifted prompt, put back in the original option order."""
    n = len(logprobs)
    return [logprobs[(i - shift) % n] for i in range(n)]


def shift_scores(record):
    """[normalised log-probabilities in the original option order] for every shift the record was scored under."""
    rows = [normalise(record["logprobs"])]
    rows += [normalise(lp) for _, lp in sorted(record.get("shifts", {}).items(), key=lambda x: int(x[0]))]
    return rows


def permutation_mean(record):
    """Mean over the scored shifts of the normalised option log-probabilities (Zheng et al. 2024, "permute"): each
    option is read at several positions, so a position preference cancels."""
    rows = shift_scores(record)
    return [sum(col) / len(rows) for col in zip(*rows)]


def pride_prior(records):
    """Log position prior per option count from the records scored under all n cyclic shifts (PriDe, Zheng et al.
    2024): under a full cycle every option visits every position once, so the mean over shifts of the log-probability
    read at position j keeps the position's share and cancels the content; averaged over the questions."""
    sums, counts = {}, {}
    for r in records:
        n = len(r["logprobs"])
        if len(r.get("shifts", {})) + 1 < n:
            continue
        observed = [r["logprobs"]] + [r["shifts"][str(s)] for s in range(1, n)]  # original order, per shift
        position = [0.0] * n
        for s, lp in enumerate(observed):  # option i was shown at position (i - s) mod n
            lp = normalise(lp)
            for i in range(n):
                position[(i - s) % n] += lp[i] / n
        position = normalise(position)
        sums[n] = [a + b for a, b in zip(sums.get(n, [0.0] * n), position)]
        counts[n] = counts.get(n, 0) + 1
    return {n: normalise([x / counts[n] for x in sums[n]]) for n in sums}


def calibrated_answers(records, mode, content_free=None):
    """Map question id -> option number (1-based) under a calibration mode (CALIBRATIONS), label-free."""
    mode = auto_mode(records) if mode == "auto" else mode
    mc = [r for r in records if r["kind"] == "mc"]
    answers = {}
    if mode in ("permute", "pride"):
        priors = pride_prior(mc) if mode == "pride" else {}
        for r in mc:
            n = len(r["logprobs"])
            if len(r.get("shifts", {})) + 1 >= n or n not in priors:  # a full cycle, or no prior: the mean
                scores = permutation_mean(r)
            else:
                scores = [x - p for x, p in zip(normalise(r["logprobs"]), priors[n])]
            answers[r["id"]] = str(max(range(n), key=scores.__getitem__) + 1)
        return answers
    priors = option_prior(mc, mode, content_free)
    for r in mc:
        scores = [x - p for x, p in zip(normalise(r["logprobs"]), priors[len(r["logprobs"])])]
        answers[r["id"]] = str(max(range(len(scores)), key=scores.__getitem__) + 1)
    return answers


def pride_questions(questions, share):
    """The multiple-choice questions that estimate the PriDe prior: every k-th one of each option count, about
    share of them (at least BATCH_MIN // 5 each, all when there are fewer)."""
    chosen_ids = set()
    for n in sorted({len(q.options) for q in questions if q.kind == "mc"}):
        same = [q for q in questions if q.kind == "mc" and len(q.options) == n]
        want = min(len(same), max(BATCH_MIN // 5, math.ceil(share * len(same))))
        chosen_ids |= {same[i * len(same) // want].id for i in range(want)}
    return chosen_ids


def shifts_for(questions, config):
    """{question id: shifts to score besides the identity} under the config's calibration."""
    if config.calibration == "permute":
        return {q.id: list(range(1, min(config.permutations, len(q.options)))) for q in questions if q.kind == "mc"}
    if config.calibration == "pride":
        estimate = pride_questions(questions, config.pride_share)
        return {q.id: list(range(1, len(q.options))) if q.id in estimate else [] for q in questions if q.kind == "mc"}
    return {q.id: [] for q in questions if q.kind == "mc"}


# ----------------------------------------------------------------------------- descriptive answers
REQUEST_RE = re.compile(r"\s*(?:을|를)?\s*(?:설명|서술|기술|제시|논술)\s*하(?:세요|시오|십시오)\.?$"
                        r"|\s*(?:은|는)?\s*무엇(?:인가요|입니까|인가|인지)\s*[?？]?$")


def subject(question):
    """The question without its closing request ("…을 설명하세요", "…은 무엇인가요?"): what the answer is about."""
    return REQUEST_RE.sub("", question.strip()).strip() or question.strip()


def sentences(text):
    """The sentences of a generated answer as plain prose: markdown and list markers dropped, whitespace collapsed,
    split after a sentence end (. ! ? or the endings 다/요)."""
    text = re.sub(r"[*#`>|]+", "", text)
    text = re.sub(r"^\s*(?:[-•]|\d+[.)])\s*", "", text, flags=re.M)
    text = re.sub(r"\s+", " ", text).strip()
    return re.split(r"(?<=[.!?다요])\s+", text)


def kept_sentences_done(text):
    """Whether a partial answer already holds every sentence clean_description keeps: a further sentence has begun,
    so generating on cannot change the kept ones (answer_desc stops such a row)."""
    return len(sentences(text)) > DESC_MAX_SENTENCES


def clean_description(text, question, max_sentences=None, restate=None):
    """Plain Korean prose: no markdown, at most max_sentences (DESC_MAX_SENTENCES) sentences, never empty; with
    restate (DESC_RESTATE), led by the question's subject."""
    text = " ".join(sentences(text)[:max_sentences or DESC_MAX_SENTENCES]).strip()
    if not text:  # an empty answer scores 0: restate the question's content instead
        return subject(question)
    return f"{subject(question)}: {text}" if (DESC_RESTATE if restate is None else restate) else text


# ----------------------------------------------------------------------------- one run over a question set
def config_key(model_id, dtype_name, level="float", rag=None):
    """Changes when anything that changes the raw multiple-choice predictions changes (model, level, dtype, prompts,
    context, how the option logits are computed: lm.OPTION_LOGITS). Neither the calibration (shifts are added to the
    same records) nor the descriptive settings (desc_key) are in it, nor where the checkout lies: the model id as given
    (relative) and its fingerprint name the weights."""
    parts = [str(model_id), lm.model_fingerprint(model_id), dtype_name, level, common.SYSTEM_PROMPT,
             common.MC_INSTRUCTION, common.MC_ANSWER_PREFIX]
    parts += lm.option_logits_tag(dtype_name)
    if rag:
        parts += [common.CONTEXT_HEADER, json.dumps(rag, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def desc_key():
    """Changes when the descriptive answers' settings change: a checkpointed one written under others is redone."""
    parts = [common.DESC_INSTRUCTION, str(DESC_MAX_NEW_TOKENS), json.dumps(DESC_GENERATION, sort_keys=True),
             f"stopped after {DESC_MAX_SENTENCES} sentences"]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def append_records(path, records):
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def answer_mc(model, tokenizer, questions, contexts, shifts, stats):
    """Option log-probabilities of multiple-choice questions, under the identity order and the given cyclic shifts
    ({id: [shift, ...]}), stored back in the original option order. A shifted prompt reuses its identity prompt's
    cache up to the options (lm.shared_prefix_logprobs): with one passage a shift took 0.72 s against the teacher's
    4.64 s for the whole prompt (bf16, 2026-12-07)."""
    groups = [[lm.render(tokenizer, common.mc_messages(q.stem, shifted(q.options, s), c), common.MC_ANSWER_PREFIX)
               for s in [0] + shifts.get(q.id, [])] for q, c in zip(questions, contexts)]
    token_ids = lm.option_token_ids(tokenizer, max(len(q.options) for q in questions))
    scored = lm.shared_prefix_logprobs(model, tokenizer, groups, token_ids, MC_BATCH, stats)
    stats["mc_prompts"] = stats.get("mc_prompts", 0) + sum(map(len, groups))
    records = []
    for q, rows in zip(questions, scored):
        n = len(q.options)
        record = dict(id=q.id, kind="mc", logprobs=rows[0][:n])
        if len(rows) > 1:
            record["shifts"] = {str(s): unshift(lp[:n], s) for s, lp in zip(shifts[q.id], rows[1:])}
        records.append(record)
    return records


def answer_desc(model, tokenizer, questions, contexts, stats):
    """Greedy answers, each stopped once it holds the sentences clean_description keeps (the rest would be cut);
    with passages, no run of RAG_NO_COPY_TOKENS passage tokens is repeated (the rules forbid a verbatim copy of
    retrieved text), and the record keeps that rule (stale_records)."""
    prompts = [lm.render(tokenizer, common.desc_messages(q.text, c)) for q, c in zip(questions, contexts)]
    texts = lm.generate(model, tokenizer, prompts, DESC_MAX_NEW_TOKENS, DESC_BATCH, stats, sources=contexts,
                        no_copy=RAG_NO_COPY_TOKENS, done=kept_sentences_done, **DESC_GENERATION)
    return [dict(id=q.id, kind="desc", raw=t, desc_key=desc_key(), **({"no_copy": RAG_NO_COPY_TOKENS} if c else {}))
            for q, t, c in zip(questions, texts, contexts)]


def stale_records(done, shifts):
    """Ids of checkpointed records to answer again: descriptive answers written under other descriptive settings
    (desc_key) or with passages under another copy rule (RAG_NO_COPY_TOKENS), and multiple-choice records missing a
    shift the calibration needs."""
    stale = [i for i, r in done.items() if r["kind"] == "desc" and (r.get("desc_key") != desc_key() or (
        r.get("context") and r.get("no_copy", 0) != RAG_NO_COPY_TOKENS))]
    return stale + [i for i, r in done.items() if r["kind"] == "mc"
                    and not set(map(str, shifts.get(i, []))) <= set(r.get("shifts", {}))]


def only_shifts(record, shifts):
    """The record with only the option shifts the configuration scores: a checkpoint written under a calibration
    with more shifts (`make select` scores them all) gives the answers a run of this configuration alone gives."""
    if record["kind"] != "mc":
        return record
    return dict(record, shifts={s: lp for s, lp in record.get("shifts", {}).items() if int(s) in shifts})


def retrieve(index, tokenizer, questions, passages, ranked=None):
    """(context text, cited chunk keys) per question: the reranked chunks of 03_rerank.py where the question has
    them, else the first-stage retriever's; ("", []) for no hit."""
    ranked = ranked or {}
    first = [q for q in questions if q.id not in ranked]
    searched = dict(zip([q.id for q in first], index.search_many([q.text for q in first], k=passages))) \
        if first else {}
    hits = [searched[q.id] if q.id in searched else [(index.chunks[i], 0.0) for i in ranked[q.id][:passages]]
            for q in questions]
    return [(retrieval.format_context(h, tokenizer, passages, RAG_MAX_TOKENS), [c.key for c, _ in h]) for h in hits]


def reads_passages(question):
    """Whether the question's prompt carries the configured passages: multiple choice always, descriptive questions
    only with DESC_PASSAGES."""
    return question.kind == "mc" or DESC_PASSAGES


def require_index(index_dir):
    """Stop with what to run when the index the passages come from is missing."""
    if not (index_dir / "DONE").exists():
        raise SystemExit(f"no index at {index_dir}: run `make index`, or answer without passages "
                         "(04_infer.py --passages 0).")


def open_index(model, tokenizer, model_id, index_dir):
    """The retriever with the answering model attached as its dense encoder (single-LLM rule); the index must have
    been embedded by that model."""
    require_index(index_dir)
    index = retrieval.load_index(index_dir)
    encoder = index.meta.get("encoder")
    if retrieval.SEARCH_METHOD != "bm25" and common.resolve_model(encoder) != common.resolve_model(model_id):
        raise SystemExit(f"the index at {index_dir} was embedded by {encoder}, but {model_id} answers: run "
                         "`make index` to embed it with the answering model (one LLM embeds, reranks and answers).")
    return index.attach_encoder(model, tokenizer)


def rag_settings(passages, ranked, index_dir):
    """What changes the prompts besides the question: the index, the passage settings and the reranked chunk ids
    in use ({} for none)."""
    rerank_key = hashlib.sha256(json.dumps(ranked, sort_keys=True).encode("utf-8")).hexdigest()[:12] \
        if ranked else None
    return dict(index=retrieval.index_fingerprint(index_dir), passages=passages, max_tokens=RAG_MAX_TOKENS,
                method=retrieval.SEARCH_METHOD, rerank=rerank_key, desc_passages=DESC_PASSAGES)


def reranked_chunks():
    """Chunk ids per question id from 03_rerank.py's ranked.jsonl, {} when reranking has not run."""
    if not (common.RERANK / "DONE").exists():
        return {}
    return {qid: r["chunks"] for qid, r in lm.read_records(common.RERANK / "ranked.jsonl").items()}


def content_free_logprobs(model, tokenizer, option_counts):
    """Option log-probabilities averaged over content-free prompts, per option count."""
    out = {}
    for n in option_counts:
        token_ids = lm.option_token_ids(tokenizer, n)
        prompts = [lm.render(tokenizer, common.mc_messages(stem, [stem] * n), common.MC_ANSWER_PREFIX)
                   for stem in CONTENT_FREE_STEMS]
        rows = [normalise(r) for r in lm.next_token_logprobs(model, tokenizer, prompts, token_ids)]
        out[str(n)] = [math.log(sum(math.exp(r[i]) for r in rows) / len(rows)) for i in range(n)]
    return out


def work_order(questions, tokenizer, contexts=None):
    """Multiple choice first, then descriptive, each by prompt length (the question and its passages when contexts
    {id: text} are given: they vary more than the questions do): batches pad little, and the batches of a resumed run
    are the ones an uninterrupted run would have formed (the checkpoint holds whole batches)."""
    contexts = contexts or {}

    def length(q):
        return len(tokenizer(contexts.get(q.id, "") + q.text, add_special_tokens=False).input_ids)
    return sorted(questions, key=lambda q: (q.kind != "mc", length(q)))


def run(questions, out_dir, config, dtype_name=None, ranked=None, index_dir=None):
    """Answer the questions under config with checkpointing into out_dir; return (records by question order, meta),
    meta also written to out_dir/meta.json. With config.passages, the context of a question is its reranked chunk
    ids in ranked ({id: [chunk ids]}) when given, else the first stage's, from index_dir (default common.INDEX); for
    multiple-choice questions only unless DESC_PASSAGES."""
    config.check()
    index_dir = index_dir or common.INDEX
    device = lm.pick_device()
    dtype = lm.pick_dtype(device, dtype_name, config.level)
    dtype_name = str(dtype).replace("torch.", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = {q.id: ranked[q.id] for q in questions if q.id in ranked} if ranked else {}
    if config.passages:
        require_index(index_dir)
    rag = rag_settings(config.passages, ranked, index_dir) if config.passages else None
    key = config_key(config.model, dtype_name, config.level, rag)
    checkpoint = out_dir / f"predictions-{key}.jsonl"
    lm.drop_torn_tail(checkpoint)  # else the first record appended after a kill would join the torn line
    done = lm.read_answered(checkpoint, questions)
    shifts = shifts_for(questions, config)
    stale = stale_records(done, shifts)
    if stale:
        print(f"04: {len(stale)} checkpointed answers lack a shift or follow other descriptive settings: answering "
              "them again")
    for i in stale:
        del done[i]
    todo = [q for q in questions if q.id not in done]
    print(f"04: {len(questions)} questions, {len(done)} from checkpoint, {config} on {device} ({dtype_name})")
    t0 = time.time()
    tokenizer = lm.load_tokenizer(config.model)
    model = lm.load_model(config.model, device, dtype, level=config.level)
    index = open_index(model, tokenizer, config.model, index_dir) if config.passages and todo else None
    load_seconds = time.time() - t0
    stats = {}
    option_counts = sorted({len(q.options) for q in questions if q.kind == "mc"})
    content_free = content_free_logprobs(model, tokenizer, option_counts) if option_counts else {}
    t_answer = time.time()
    reading = [q for q in todo if reads_passages(q)]
    contexts = dict(zip([q.id for q in reading], retrieve(index, tokenizer, reading, config.passages, ranked))) \
        if index and reading else {}
    retrieve_each = (time.time() - t_answer) / max(len(reading), 1)  # retrieval time, counted per question below
    with tqdm(total=len(todo), desc="04 answering", unit="q") as bar:
        ordered = work_order(todo, tokenizer, {i: text for i, (text, _) in contexts.items()})
        for kind, fn, size in (("mc", answer_mc, MC_BATCH), ("desc", answer_desc, DESC_BATCH)):
            pending = [q for q in ordered if q.kind == kind]
            for start in range(0, len(pending), size):
                chunk = pending[start:start + size]
                t_chunk = time.time() - retrieve_each * sum(q.id in contexts for q in chunk)  # with its retrieval
                found = [contexts.get(q.id, ("", [])) for q in chunk]
                texts = [c for c, _ in found]
                records = fn(model, tokenizer, chunk, texts, shifts, stats) if kind == "mc" \
                    else fn(model, tokenizer, chunk, texts, stats)
                for q, record, (_, cited) in zip(chunk, records, found):
                    record["seconds"] = round((time.time() - t_chunk) / len(chunk), 3)
                    record["context"] = cited
                    record["question_sha"] = q.digest
                    done[record["id"]] = record
                append_records(checkpoint, records)
                stats[f"{kind}_seconds"] = stats.get(f"{kind}_seconds", 0.0) + time.time() - t_chunk
                stats[f"{kind}_questions"] = stats.get(f"{kind}_questions", 0) + len(chunk)
                bar.update(len(chunk))
    answer_seconds = time.time() - t_answer
    records = [only_shifts(done[q.id], shifts.get(q.id, [])) for q in questions]
    meta = dict(model=config.model, config=asdict(config), key=key, device=device, dtype=dtype_name, rag=rag,
                no_copy=RAG_NO_COPY_TOKENS if rag else None, content_free=content_free,
                questions=len(questions), answered_now=len(todo),
                seconds=dict(load=round(load_seconds, 1), answering=round(answer_seconds, 1),
                             per_question=round(sum(r["seconds"] for r in records) / max(len(records), 1), 3)),
                prefill_tokens_per_s=round(stats["prefill_tokens"] / stats["prefill_seconds"], 1)
                if stats.get("prefill_seconds") else None,
                generated_tokens_per_s=round(stats["generated_tokens"] / stats["generate_seconds"], 1)
                if stats.get("generate_seconds") else None,
                timing=dict(mc_s_per_prompt=round((stats["mc_seconds"] - stats.get("shift_seconds", 0.0))
                                                  / stats["mc_questions"], 4) if stats.get("mc_questions") else None,
                            mc_s_per_shift=round(stats["shift_seconds"] / stats["shift_prompts"], 4)
                            if stats.get("shift_prompts") else None,
                            mc_prompts_per_question=round(stats["mc_prompts"] / stats["mc_questions"], 3)
                            if stats.get("mc_questions") else None,
                            desc_s_per_question=round(stats["desc_seconds"] / stats["desc_questions"], 3)
                            if stats.get("desc_questions") else None),
                peak_rss_gib=round(lm.peak_rss_gib(), 2), peak_gpu_gib=lm.peak_gpu_gib(),
                load_average=round(os.getloadavg()[0], 2), predictions=checkpoint.name)
    previous = out_dir / "meta.json"
    old = json.loads(previous.read_text(encoding="utf-8")) if previous.exists() else {}
    if old.get("key") == key:  # keep the measurements of the runs that did the work this one took from the checkpoint
        if not todo:
            for name in MEASURED:
                meta[name] = old.get(name)
            meta["seconds"]["answering"] = old["seconds"]["answering"]
        meta["timing"] = {k: v if v is not None else (old.get("timing") or {}).get(k)
                          for k, v in meta["timing"].items()}
    common.write_meta(previous, settings=common.settings_of(sys.modules[__name__]), **meta)
    return records, meta


def passage_readers(index, questions, share):
    """Ids of the share of the questions that read passages (reads_passages) whose first stage looks surest
    (PASSAGE_SIGNAL, highest first)."""
    reading = [q for q in questions if reads_passages(q)]
    signals = retrieval.bm25_signals(index, [q.text for q in reading])
    order = sorted(range(len(reading)), key=lambda i: -signals[i][PASSAGE_SIGNAL])
    return {reading[i].id for i in order[:round(share * len(reading))]}


def previous_meta(out_dir):
    """out_dir/meta.json as the last run left it ({} when there is none)."""
    path = out_dir / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def top_probability(record):
    """The probability of a multiple-choice record's most likely option, over the options only; for a record scored
    under several option orders, of their mean (permutation_mean, renormalised)."""
    return math.exp(max(normalise(permutation_mean(record))))


def unsure(records, threshold):
    """Ids of the multiple-choice records whose top option takes less than threshold of the probability (every one
    at threshold 1)."""
    return {r["id"] for r in records if r["kind"] == "mc" and (threshold >= 1.0 or top_probability(r) < threshold)}


def cascade_merge(plain, with_passages):
    """Records of a cascade, in plain's order: a question asked again with passages (in with_passages) keeps the
    record of the surer prompt (the higher top_probability, of the option orders' mean where the passage prompt was
    scored in several; passages on a tie), timed as both prompts together and
    marked with "cascade" (which prompt answered); every other question keeps its plain record."""
    by_id = {r["id"]: r for r in with_passages}
    out = []
    for r in plain:
        other = by_id.get(r["id"])
        if other is None:
            out.append(r)
            continue
        surer = other if top_probability(other) >= top_probability(r) else r
        out.append(dict(surer, seconds=round(r["seconds"] + other["seconds"], 3),
                        cascade="passages" if surer is other else "plain"))
    return out


def mean_seconds(records):
    """{kind: mean seconds per question (retrieval included)} of the records that carry their time."""
    seconds = {kind: [r["seconds"] for r in records if r["kind"] == kind and r.get("seconds") is not None]
               for kind in ("mc", "desc")}
    return {kind: sum(v) / len(v) for kind, v in seconds.items() if v}


def mc_question_seconds(timing, prompts):
    """Seconds of a multiple-choice question scored in `prompts` option orders, from a run's timing: its identity
    prompt (mc_s_per_prompt) and each further order (mc_s_per_shift: it reuses the identity prompt's cache; a whole
    prompt where the run scored no shift or was timed before shifts reused it)."""
    first = timing.get("mc_s_per_prompt") or 0.0
    shift = timing.get("mc_s_per_shift")
    return first + (prompts - 1) * (first if shift is None else shift)


def cascade_affordable(plain, again, loads_s, budget_s, n_mc):
    """How many of n_mc multiple-choice questions a cascade may ask again with passages so that the competition's
    test (competition.TEST_MC + TEST_DESC questions) fits budget_s, at the seconds per question measured on this
    machine: plain's (every question without passages), again's (asked with them; None: CASCADE_COST_BOUND times a
    plain prompt) and the model loads."""
    plain_s = mean_seconds(plain)
    mc0 = plain_s.get("mc", 0.0)
    mc1 = mean_seconds(again or []).get("mc", CASCADE_COST_BOUND * mc0)
    spare = budget_s - loads_s - competition.TEST_MC * mc0 - competition.TEST_DESC * plain_s.get("desc", 0.0)
    if spare <= 0:
        return 0
    if mc1 <= 0:
        return n_mc
    return min(n_mc, math.floor(spare / (competition.TEST_MC * mc1) * n_mc))


def cascade_load_seconds(out_dir, plain_meta, budget_s, threshold):
    """The model's load time a budgeted cascade decides with: the one measured when it first decided under this
    budget and threshold (out_dir/cascade-<plain key>.json), so a resumed run asks the same questions again."""
    path = out_dir / f"cascade-{plain_meta['key']}.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if (saved.get("budget_s"), saved.get("cascade")) != (budget_s, threshold):
        saved = dict(budget_s=budget_s, cascade=threshold, load_s=plain_meta["seconds"]["load"])
        common.write_json(path, saved)
    return saved["load_s"]


def run_cascade(questions, out_dir, config, dtype_name=None, ranked=None, index_dir=None, budget_s=None):
    """run_groups under config.cascade: every question without passages, then the unsure multiple-choice ones with
    them (each run checkpointed under its own key: the records full runs without and with passages write), merged
    by cascade_merge. With budget_s (the test's, budget_seconds()): when asking every unsure question again might
    not fit at the plain speed measured here (cascade_affordable with CASCADE_COST_BOUND), the most unsure
    CASCADE_PROBE are asked first, and then the next most unsure as many as their measured speed affords (the same
    number after a resume: the records keep their seconds, cascade_load_seconds the load time)."""
    plain_config = replace(config, passages=0, cascade=0.0, calibration="none", permutations=1)
    again_config = replace(config, cascade=0.0)  # under permute k: the passage prompt in k option orders
    old = previous_meta(out_dir)  # each run rewrites it
    plain, plain_meta = run(questions, out_dir, plain_config, dtype_name, ranked, index_dir)
    doubt = unsure(plain, config.cascade)
    order = [r["id"] for r in sorted((r for r in plain if r["id"] in doubt), key=top_probability)]  # most unsure first
    n_mc = sum(q.kind == "mc" for q in questions)
    done, again, budget = [(questions, plain, plain_meta)], [], None

    def ask(ids):
        group = [q for q in questions if q.id in set(ids)]
        if group:
            done.append((group, *run(group, out_dir, again_config, dtype_name, ranked, index_dir)))
            again.extend(done[-1][1])

    load_s = cascade_load_seconds(out_dir, plain_meta, budget_s, config.cascade) if budget_s else 0.0
    if budget_s is None or len(order) <= cascade_affordable(plain, None, 2 * load_s, budget_s, n_mc):
        ask(order)
    else:
        # the probe only if one passage prompt would fit even at the plain prompt's speed (plain as again)
        ask(order[:CASCADE_PROBE] if cascade_affordable(plain, plain, 2 * load_s, budget_s, n_mc) else [])
        probe_s = mean_seconds(again).get("mc")
        fits = cascade_affordable(plain, again, 3 * load_s, budget_s, n_mc) if again else 0
        ask(order[len(again):fits])
        budget = dict(budget_s=budget_s, unsure=len(order), affordable=fits, asked=len(again),
                      mc_s_plain=round(mean_seconds(plain).get("mc", 0.0), 3),
                      mc_s_probe=None if probe_s is None else round(probe_s, 3),
                      mc_s_passages=round(mean_seconds(again)["mc"], 3) if again else None)
        print(f"04: cascade {config.cascade} under the {budget_s / 60:.0f} min budget: a prompt takes "
              f"{budget['mc_s_plain']} s without passages and {budget['mc_s_probe']} s with them (the probe) here, so "
              f"{len(again)} of the {len(order)} unsure questions (most unsure first) are asked again")
    print(f"04: cascade {config.cascade}: {len(again)} of {n_mc} multiple-choice questions asked again with passages")
    merged = cascade_merge(plain, again)
    meta = merged_meta(out_dir, questions, config, done, old, records=merged, budget=budget)
    return [(questions, merged, meta)], meta


def run_groups(questions, out_dir, config, dtype_name=None, ranked=None, index_dir=None, budget_s=None):
    """([(questions, records, meta)], meta of them all): one run() under config; where config.passage_share < 1, two:
    that share of the questions with passages (passage_readers) and the rest without, each checkpointed in out_dir
    under its own key (the same records a run of every question with or without passages writes) and calibrated on
    its own, as reports/gate.md measures a gate. out_dir/meta.json then describes both (merged_meta). With
    config.cascade: run_cascade (under budget_s)."""
    if config.passages and config.cascade:
        return run_cascade(questions, out_dir, config, dtype_name, ranked, index_dir, budget_s)
    if not config.passages or config.passage_share >= 1.0:
        records, meta = run(questions, out_dir, config, dtype_name, ranked, index_dir)
        return [(questions, records, meta)], meta
    index_dir = index_dir or common.INDEX
    require_index(index_dir)
    readers = passage_readers(retrieval.load_index(index_dir), questions, config.passage_share)
    print(f"04: passages for {len(readers)} of {sum(reads_passages(q) for q in questions)} questions "
          f"(passage_share {config.passage_share}, highest {PASSAGE_SIGNAL} first)")
    full = replace(config, passage_share=1.0)
    groups = [([q for q in questions if q.id in readers], full),
              ([q for q in questions if q.id not in readers], replace(full, passages=0))]
    old = previous_meta(out_dir)  # each group's run rewrites it
    done = [(group, *run(group, out_dir, part, dtype_name, ranked, index_dir)) for group, part in groups if group]
    return done, merged_meta(out_dir, questions, config, done, old)


def same_config(fields_of_old, config):
    """Whether a meta.json's config fields describe config (fields added to Config since it was written take their
    defaults)."""
    known = {f.name for f in fields(Config)}
    return isinstance(fields_of_old, dict) and set(fields_of_old) <= known and Config(**fields_of_old) == config


def merged_meta(out_dir, questions, config, groups, old=None, records=None, budget=None):
    """out_dir/meta.json for the groups of run_groups: the first group's, with the config, the load and answering
    time and the per-question seconds of all of them (per-prompt timing only in each group's meta; a rerun that took
    every answer from the checkpoints keeps the times of the run that computed them, old), and their records (or the
    given ones: a cascade's, with its budget decision) in question order written to predictions-groups.jsonl (what
    evaluate.py reads)."""
    metas = [meta for _, _, meta in groups]
    by_id = {r["id"]: r for r in records} if records is not None else \
        {r["id"]: r for _, group_records, _ in groups for r in group_records}
    records = [by_id[q.id] for q in questions]
    name = "predictions-groups.jsonl"
    common.write_text(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    seconds = dict(load=round(sum(m["seconds"]["load"] for m in metas), 1),
                   answering=round(sum(m["seconds"]["answering"] for m in metas), 1),
                   per_question=round(sum(r["seconds"] for r in records) / max(len(records), 1), 3))
    answered_now = sum(m["answered_now"] for m in metas)
    if not answered_now and old and old.get("groups") and same_config(old.get("config"), config):
        seconds = old["seconds"]
    meta = dict(metas[0], config=asdict(config), key=None, questions=len(questions), seconds=seconds, timing=None,
                answered_now=answered_now, predictions=name, groups=metas, cascade_budget=budget)
    common.write_meta(out_dir / "meta.json", settings=common.settings_of(sys.modules[__name__]), **meta)
    return meta


def grouped_submission_rows(questions, groups, calibration):
    """submission_rows of run_groups' groups, each calibrated on its own, in question order."""
    answers = {}
    for group, records, meta in groups:
        answers.update(submission_rows(group, records, calibration, meta["content_free"]))
    return [(q.id, answers[q.id]) for q in questions]


def submission_rows(questions, records, calibration, content_free):
    """[(ID, answer)] in question order: calibrated option numbers and cleaned descriptive answers."""
    answers = calibrated_answers(records, calibration, content_free)
    by_id = {r["id"]: r for r in records}
    return [(q.id, answers[q.id] if q.kind == "mc" else clean_description(by_id[q.id]["raw"], q.text))
            for q in questions]
