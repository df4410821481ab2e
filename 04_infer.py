"""Answer every question with the student LLM and write the submission.

Reads data/prepared/questions.csv and sample_submission.csv (`make data`) and the student model. Multiple choice:
one batched prefill per question, the answer read from the next-token logits of the option digits after a prompt
that ends where the number is expected, then corrected for the model's option prior (CALIBRATION). Descriptive:
short greedy Korean generation. With the index of `make index`, the top passages for each question go into
the prompt (RAG_*). Writes <out>/predictions-<key>.jsonl (checkpoint, resumed after a kill),
<out>/submission.csv, <out>/meta.json and <out>/DONE; with the default --out also ./submission.csv.
Run by `make submission` (and the report targets with --model/--out).
"""
import argparse
import hashlib
import importlib
import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import common
import lm

# ----------------------------------------------------------------------------- settings
MC_BATCH = 8  # prompts per forward pass
DESC_BATCH = 8  # generation batch (decode is ~8x faster per token at batch 8 than 1 on CPU)
DESC_MAX_NEW_TOKENS = 128  # the reference answers are one or two sentences
DESC_MAX_SENTENCES = 3
CHECKPOINT_EVERY = 32  # questions per checkpoint append
CALIBRATION = "auto"  # none | content_free | batch | auto: correction of the option prior (reports/baseline.md)
AUTO_SKEW = 0.5  # auto: batch calibration when one option wins more than this share of the raw answers, else none
CONTENT_FREE_STEMS = ["N/A", "[빈칸]", ""]  # content-free prompts for content_free calibration (Zhao et al. 2021)
BATCH_MIN = 50  # fewer questions of one option count than this: batch calibration uses the content-free prior
# Retrieved passages put before each question (02_build_index.py; 0 = none, and 03 then reranks nothing). 0 for the
# embedded 0.5B student: passages lowered its dev MC accuracy from 0.402 to 0.361 (3 passages, 512 tokens) and
# 0.369 (1 passage, 256 tokens) (reports/rag.md), even where the cited article is among them (reports/gate.md: no
# relevance gate helps). A larger model on a GPU: set 3 and rerun `make rag-report` and `make gate-report`.
RAG_PASSAGES = 0
RAG_MAX_TOKENS = 512  # token budget of those passages: prefill time grows with it
RAG_METHOD = "fused"  # bm25 | dense | fused first-stage retrieval (reports/retrieval.md)
RAG_NO_COPY_TOKENS = 12  # a descriptive answer never repeats this many consecutive passage tokens (~19 characters)
# -----------------------------------------------------------------------------


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
            raise SystemExit(f"unknown CALIBRATION {mode!r}: use none, content_free or batch.")
    return priors


def auto_mode(records):
    """'batch' when the raw answers pile onto one option (the 0.5B student: 96% option 1), else 'none' (the 1.5B
    teacher loses accuracy to any correction). Label-free: it looks only at the model's own answers."""
    mc = [r for r in records if r["kind"] == "mc"]
    if not mc:
        return "none"
    raw = Counter(max(range(len(r["logprobs"])), key=r["logprobs"].__getitem__) for r in mc)
    return "batch" if raw.most_common(1)[0][1] / len(mc) > AUTO_SKEW else "none"


def calibrated_answers(records, mode, content_free=None):
    """Map question id -> option number (1-based) after subtracting the log prior."""
    mode = auto_mode(records) if mode == "auto" else mode
    mc = [r for r in records if r["kind"] == "mc"]
    priors = option_prior(mc, mode, content_free)
    answers = {}
    for r in mc:
        scores = [x - p for x, p in zip(normalise(r["logprobs"]), priors[len(r["logprobs"])])]
        answers[r["id"]] = str(max(range(len(scores)), key=scores.__getitem__) + 1)
    return answers


def clean_description(text, question):
    """Plain Korean prose: no markdown, at most DESC_MAX_SENTENCES sentences, never empty."""
    text = re.sub(r"[*#`>|]+", "", text)
    text = re.sub(r"^\s*(?:[-•]|\d+[.)])\s*", "", text, flags=re.M)
    text = re.sub(r"\s+", " ", text).strip()
    sentences = re.split(r"(?<=[.!?다요])\s+", text)
    text = " ".join(sentences[:DESC_MAX_SENTENCES]).strip()
    if not text:  # an empty answer scores 0: restate the question's content instead
        text = re.sub(r"(을|를)?\s*(설명|서술|기술)하(세요|시오)\.?$", "", question.strip()).strip() or question
    return text


def config_key(model_id, dtype_name, rag=None):
    """Changes when anything that changes the raw predictions changes (model, dtype, prompts, limits, context)."""
    parts = [common.resolve_model(model_id), lm.model_fingerprint(model_id), dtype_name, common.SYSTEM_PROMPT,
             common.MC_INSTRUCTION, common.MC_ANSWER_PREFIX, common.DESC_INSTRUCTION,
             str(DESC_MAX_NEW_TOKENS)]
    if rag:
        parts += [common.CONTEXT_HEADER, json.dumps(rag, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


load_checkpoint = lm.read_records  # records already computed, by question id


def append_records(path, records):
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


def answer_mc(model, tokenizer, questions, contexts, stats):
    """Raw option log-probabilities for a chunk of multiple-choice questions."""
    prompts = [lm.render(tokenizer, common.mc_messages(q.stem, q.options, c), common.MC_ANSWER_PREFIX)
               for q, c in zip(questions, contexts)]
    max_options = max(len(q.options) for q in questions)
    token_ids = lm.option_token_ids(tokenizer, max_options)
    logprobs = lm.next_token_logprobs(model, tokenizer, prompts, token_ids, MC_BATCH, stats)
    return [dict(id=q.id, kind="mc", logprobs=lp[:len(q.options)]) for q, lp in zip(questions, logprobs)]


def answer_desc(model, tokenizer, questions, contexts, stats):
    """Greedy answers; with passages, no run of RAG_NO_COPY_TOKENS passage tokens is repeated (the rules forbid a
    verbatim copy of retrieved text), and the record keeps that rule (stale_records)."""
    prompts = [lm.render(tokenizer, common.desc_messages(q.text, c)) for q, c in zip(questions, contexts)]
    texts = lm.generate(model, tokenizer, prompts, DESC_MAX_NEW_TOKENS, DESC_BATCH, stats, sources=contexts,
                        no_copy=RAG_NO_COPY_TOKENS)
    return [dict(id=q.id, kind="desc", raw=t, **({"no_copy": RAG_NO_COPY_TOKENS} if c else {}))
            for q, t, c in zip(questions, texts, contexts)]


def stale_records(done):
    """Ids of checkpointed descriptive answers written with passages under another copy rule (RAG_NO_COPY_TOKENS):
    they are answered again; the multiple-choice records of the same checkpoint stay valid."""
    return [i for i, r in done.items() if r["kind"] == "desc" and r.get("context")
            and r.get("no_copy", 0) != RAG_NO_COPY_TOKENS]


def retrieve(index, tokenizer, questions, ranked=None):
    """(context text, cited chunk keys) per question: the reranked chunks of 03_rerank.py where the question has
    them, else the first-stage retriever's; ("", []) for no hit."""
    ranked = ranked or {}
    first = [q for q in questions if q.id not in ranked]
    searched = dict(zip([q.id for q in first], index.search_many([q.text for q in first], k=RAG_PASSAGES,
                                                                   method=RAG_METHOD))) if first else {}
    hits = [searched[q.id] if q.id in searched else [(index.chunks[i], 0.0) for i in ranked[q.id][:RAG_PASSAGES]]
            for q in questions]
    build_index = importlib.import_module("02_build_index")
    return [(build_index.format_context(h, tokenizer, RAG_PASSAGES, RAG_MAX_TOKENS), [c.key for c, _ in h])
            for h in hits]


def open_index(model, tokenizer):
    """The retriever with the answering model attached as its dense encoder (single-LLM rule)."""
    build_index = importlib.import_module("02_build_index")
    if not (common.INDEX / "DONE").exists():
        raise SystemExit(f"04: no index at {common.INDEX}: run `make index`, or pass "
                         "--no-rag to answer without retrieval.")
    return build_index.load_index().attach_encoder(model, tokenizer)


def index_settings(ranked):
    """What changes the prompts besides the question: the index (corpus, chunking, encoder), the RAG settings and
    the reranked chunk ids in use ({} for none)."""
    meta = json.loads((common.INDEX / "meta.json").read_text(encoding="utf-8"))
    built = {k: meta.get(k) for k in ("settings", "corpus", "dense_variant")}
    fingerprint = hashlib.sha256(json.dumps(built, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    rerank_key = hashlib.sha256(json.dumps(ranked, sort_keys=True).encode("utf-8")).hexdigest()[:12] \
        if ranked else None
    return dict(index=fingerprint, passages=RAG_PASSAGES, max_tokens=RAG_MAX_TOKENS, method=RAG_METHOD,
                rerank=rerank_key)


def reranked_chunks():
    """Chunk ids per question id from 03_rerank.py's ranked.jsonl, {} when reranking has not run."""
    if not (common.RERANK / "DONE").exists():
        return {}
    rerank = importlib.import_module("03_rerank")
    return {qid: r["chunks"] for qid, r in rerank.load_ranked(common.RERANK / "ranked.jsonl").items()}


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


MEASURED = ("prefill_tokens_per_s", "generated_tokens_per_s", "peak_rss_gib", "load_average")


def run(questions, out_dir, model_id, dtype_name=None, rag=False, ranked=None):
    """Answer the questions with checkpointing into out_dir; return (records by id, meta), meta also written to
    out_dir/meta.json. With rag, the context of a question is its reranked chunk ids in ranked ({id: [chunk ids]})
    when given, else the first stage's."""
    device = lm.pick_device()
    dtype = lm.pick_dtype(device, dtype_name, model_id)
    dtype_name = str(dtype).replace("torch.", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = {q.id: ranked[q.id] for q in questions if q.id in ranked} if ranked else {}
    rag_settings = index_settings(ranked) if rag and (common.INDEX / "meta.json").exists() else None
    key = config_key(model_id, dtype_name, rag_settings)
    checkpoint = out_dir / f"predictions-{key}.jsonl"
    lm.drop_torn_tail(checkpoint)  # else the first record appended after a kill would join the torn line
    done = lm.read_answered(checkpoint, questions)
    stale = stale_records(done)
    if stale:
        print(f"04: {len(stale)} descriptive answers were written under another copy rule: answering them again")
    for i in stale:
        del done[i]
    todo = [q for q in questions if q.id not in done]
    print(f"04: {len(questions)} questions, {len(done)} from checkpoint, model {model_id} on {device} ({dtype_name})")
    t0 = time.time()
    tokenizer = lm.load_tokenizer(model_id)
    model = lm.load_model(model_id, device, dtype)
    index = open_index(model, tokenizer) if rag and todo else None
    load_seconds = time.time() - t0
    stats = {}
    option_counts = sorted({len(q.options) for q in questions if q.kind == "mc"})
    content_free = content_free_logprobs(model, tokenizer, option_counts) if option_counts else {}
    t_answer = time.time()
    with tqdm(total=len(todo), desc="04 answering", unit="q") as bar:
        for kind, fn in (("mc", answer_mc), ("desc", answer_desc)):
            pending = [q for q in todo if q.kind == kind]
            for start in range(0, len(pending), CHECKPOINT_EVERY):
                chunk = pending[start:start + CHECKPOINT_EVERY]
                t_chunk = time.time()
                contexts = retrieve(index, tokenizer, chunk, ranked) if index else [("", [])] * len(chunk)
                records = fn(model, tokenizer, chunk, [c for c, _ in contexts], stats)
                for q, record, (_, cited) in zip(chunk, records, contexts):
                    record["seconds"] = round((time.time() - t_chunk) / len(chunk), 3)
                    record["context"] = cited
                    record["question_sha"] = q.digest
                    done[record["id"]] = record
                append_records(checkpoint, records)
                bar.update(len(chunk))
    answer_seconds = time.time() - t_answer
    records = [done[q.id] for q in questions]
    meta = dict(model=model_id, key=key, device=device, dtype=dtype_name, calibration=CALIBRATION,
                rag=rag_settings, no_copy=RAG_NO_COPY_TOKENS if rag_settings else None, content_free=content_free,
                questions=len(questions), answered_now=len(todo),
                seconds=dict(load=round(load_seconds, 1), answering=round(answer_seconds, 1),
                             per_question=round(sum(r["seconds"] for r in records) / max(len(records), 1), 3)),
                prefill_tokens_per_s=round(stats["prefill_tokens"] / stats["prefill_seconds"], 1)
                if stats.get("prefill_seconds") else None,
                generated_tokens_per_s=round(stats["generated_tokens"] / stats["generate_seconds"], 1)
                if stats.get("generate_seconds") else None,
                peak_rss_gib=round(lm.peak_rss_gib(), 2), load_average=round(os.getloadavg()[0], 2),
                predictions=checkpoint.name,
                settings=dict(MC_BATCH=MC_BATCH, DESC_BATCH=DESC_BATCH, DESC_MAX_NEW_TOKENS=DESC_MAX_NEW_TOKENS,
                              DESC_MAX_SENTENCES=DESC_MAX_SENTENCES), versions=lm.versions())
    previous = out_dir / "meta.json"
    if not todo and previous.exists():  # all from the checkpoint: keep the measurements of the run that did the work
        old = json.loads(previous.read_text(encoding="utf-8"))
        if old.get("key") == key:
            for field in MEASURED:
                meta[field] = old.get(field)
            meta["seconds"]["answering"] = old["seconds"]["answering"]
    lm.write_json(previous, meta)  # beside the checkpoint, for the next checkpoint-only rerun (any caller)
    return records, meta


def submission_rows(questions, records, calibration, content_free):
    answers = calibrated_answers(records, calibration, content_free)
    by_id = {r["id"]: r for r in records}
    return [(q.id, answers[q.id] if q.kind == "mc" else clean_description(by_id[q.id]["raw"], q.text))
            for q in questions]


def main():
    global RAG_PASSAGES, RAG_MAX_TOKENS  # --passages, --context-tokens: measurement overrides (reports/rag.md)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (relative to the repo) or hub id; default: "
                        "common.answer_model(), the final student of 05 when it exists, else the base")
    parser.add_argument("--out", type=Path, default=common.INFER, help="output folder (checkpoint, submission)")
    parser.add_argument("--questions", type=Path, default=common.QUESTIONS)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N questions (measurements)")
    parser.add_argument("--mc-only", action="store_true", help="skip descriptive questions (measurements)")
    parser.add_argument("--no-rag", action="store_true", help="answer without retrieved context")
    parser.add_argument("--no-rerank", action="store_true", help="first-stage passages even when 03 has run")
    parser.add_argument("--passages", type=int, help=f"retrieved passages per question (RAG_PASSAGES={RAG_PASSAGES})")
    parser.add_argument("--context-tokens", type=int, help=f"their token budget (RAG_MAX_TOKENS={RAG_MAX_TOKENS})")
    args = parser.parse_args()
    RAG_PASSAGES = RAG_PASSAGES if args.passages is None else args.passages
    RAG_MAX_TOKENS = RAG_MAX_TOKENS if args.context_tokens is None else args.context_tokens

    questions = common.read_questions(args.questions)
    for q in questions:
        if q.kind == "desc" and re.search(r"^\s*\d\s", q.text, flags=re.M):
            print(f"04: {q.id} has numbered lines but no parsable options: answered as descriptive")
    full = not args.limit and not args.mc_only
    if args.mc_only:
        questions = [q for q in questions if q.kind == "mc"]
    if args.limit:
        questions = questions[:args.limit]
    ranked = None if args.no_rerank else reranked_chunks()
    records, meta = run(questions, args.out, args.model or common.answer_model(), args.dtype,
                        rag=RAG_PASSAGES > 0 and not args.no_rag, ranked=ranked)
    rows = submission_rows(questions, records, CALIBRATION, meta["content_free"])
    sample_ids = None
    if full and args.questions == common.QUESTIONS and common.SAMPLE.exists():
        sample_ids = [r[0] for r in common.read_submission(common.SAMPLE)]
    problems = common.validate_submission(rows, questions, sample_ids)
    if problems:
        raise SystemExit("04: the submission would be invalid:\n  " + "\n  ".join(problems[:20]))
    common.write_submission(args.out / "submission.csv", rows)
    (args.out / "DONE").touch()
    if full and args.out == common.INFER:
        common.write_submission(common.SUBMISSION, rows)
    print(f"04: answered {len(questions)} questions in {meta['seconds']['answering']:.1f} s "
          f"({meta['seconds']['per_question']:.2f} s/question) -> {args.out / 'submission.csv'}")


if __name__ == "__main__":
    main()
