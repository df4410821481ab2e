"""Rerank the first-stage candidates of every question with the answering LLM itself (one LLM: no cross-encoder).

Reads data/prepared/questions.csv (`make data`), outputs/02_index/ (`make index`) and the answering model
(common.answer_model(): the final student of 05 when it exists, else the base student). For each question
the top CANDIDATES fused chunks are scored by the LLM, pointwise (next-token logits of "Yes" vs "No" after a
relevance question; the question prefix computed once and reused through the KV cache) or listwise (FIRST:
first-token logits over passage labels in one window), blended with the first-stage order, and the best KEEP
chunk ids are written. Writes outputs/03_rerank/ranked-<key>.jsonl (checkpoint), ranked.jsonl, meta.json, DONE.
A question whose reranking fails keeps the first-stage order (logged). Run by `make rerank`; 04_infer.py reads
ranked.jsonl.
"""
import argparse
import copy
import hashlib
import importlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import lm

# ----------------------------------------------------------------------------- settings
MODE = "listwise"  # pointwise | listwise: listwise blend 0.7 kept recall, pointwise lost it (reports/rerank.md)
CANDIDATES = 10  # first-stage (fused) candidates scored per question
KEEP = 3  # chunks kept for the answer prompt (04_infer.py RAG_PASSAGES reads at most this many)
PASSAGE_TOKENS = 160  # a passage is cut to this many tokens for reranking (cut, never dropped)
BLEND = 0.7  # final = BLEND * z(LLM score) + (1 - BLEND) * z(first-stage RRF score); 1 = LLM only
SHARE_PREFIX = True  # pointwise: run the question prefix once per question, reuse its KV cache
BATCH = 10  # passages per forward pass
CHECKPOINT_EVERY = 4  # questions per checkpoint append (a question costs ~10 s on this CPU)
POINTWISE_INSTRUCTION = "문서가 질문에 답하는 데 필요한 내용을 담고 있으면 Yes, 아니면 No로만 답하세요."
LISTWISE_INSTRUCTION = "질문에 답하는 데 가장 도움이 되는 문서의 기호 하나만 답하세요."
YES, NO = "Yes", "No"
LABELS = "ABCDEFGHIJKLMNOPQRST"  # listwise passage labels: single tokens, at most 20 candidates
# -----------------------------------------------------------------------------

log = logging.getLogger("03_rerank")


def single_token(tokenizer, word):
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise SystemExit(f"03: {word!r} is {len(ids)} tokens in this tokenizer: choose single-token labels.")
    return ids[0]


def cut(tokenizer, text, max_tokens):
    """The text cut at the character edge of its max_tokens-th token (whole text when shorter). Re-tokenized, the cut
    text can be one token longer where a byte-level token ends inside a character."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_tokens else text[:offsets[max_tokens - 1][1]]


def pointwise_parts(tokenizer, question, passage):
    """(prefix ids, suffix ids) of the chat prompt; the prefix depends on the question only."""
    marker = "\u0000PASSAGE\u0000"
    content = f"{POINTWISE_INSTRUCTION}\n\n질문: {question.strip()}\n\n문서: {marker}"
    text = lm.render(tokenizer, [{"role": "system", "content": common.SYSTEM_PROMPT},
                                 {"role": "user", "content": content}])
    head, tail = text.split(marker)
    prefix = tokenizer(head, add_special_tokens=False).input_ids
    suffix = tokenizer(passage + tail, add_special_tokens=False).input_ids
    return prefix, suffix


@torch.no_grad()
def pointwise_scores(model, tokenizer, question, passages, share_prefix=SHARE_PREFIX, stats=None):
    """log p(Yes) - log p(No) per passage (two-way softmax of the next-token logits)."""
    yes, no = single_token(tokenizer, YES), single_token(tokenizer, NO)
    parts = [pointwise_parts(tokenizer, question, p) for p in passages]
    prefix = parts[0][0]
    pad = tokenizer.pad_token_id
    scores = []
    cache = None
    if share_prefix:
        cache = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True).past_key_values
    for start in range(0, len(parts), BATCH):
        batch = [s for _, s in parts[start:start + BATCH]]
        if share_prefix:
            rows = batch
            offset = len(prefix)
        else:
            rows = [prefix + s for s in batch]
            offset = 0
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        kwargs = {}
        if share_prefix:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones(len(rows), offset, dtype=mask.dtype, device=mask.device), mask], dim=1)
            kwargs = dict(past_key_values=batch_cache, use_cache=True)
        position_ids = (offset + torch.arange(width, device=model.device)).expand(len(rows), -1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
        last = torch.tensor([len(r) - 1 for r in rows], device=model.device)
        pair = logits[torch.arange(len(rows)), last][:, [yes, no]].float().log_softmax(-1)
        scores += (pair[:, 0] - pair[:, 1]).tolist()
        if stats is not None:  # tokens run through the model: the prefix once when shared
            stats["tokens"] = stats.get("tokens", 0) + sum(map(len, rows))
    if stats is not None and share_prefix:
        stats["tokens"] += len(prefix)
    return scores


@torch.no_grad()
def listwise_scores(model, tokenizer, question, passages, stats=None):
    """FIRST (Reddy et al. 2024): first-token logits over the passage labels, one forward pass per window."""
    if len(passages) > len(LABELS):
        raise SystemExit(f"03: listwise handles at most {len(LABELS)} candidates (CANDIDATES={len(passages)}).")
    labels = [single_token(tokenizer, LABELS[i]) for i in range(len(passages))]
    listing = "\n\n".join(f"[{LABELS[i]}] {p}" for i, p in enumerate(passages))
    content = f"{LISTWISE_INSTRUCTION}\n\n질문: {question.strip()}\n\n{listing}"
    prompt = lm.render(tokenizer, [{"role": "system", "content": common.SYSTEM_PROMPT},
                                   {"role": "user", "content": content}])
    stat = {}
    logprobs = lm.next_token_logprobs(model, tokenizer, [prompt], labels, batch_size=1, stats=stat)[0]
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + stat.get("prefill_tokens", 0)
    return logprobs


def zscores(xs):
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) or 1.0
    return [(x - mean) / sd for x in xs]


def blend(llm_scores, first_scores, weight=BLEND):
    """Order of candidates by weight * z(LLM) + (1 - weight) * z(first stage); stable for ties."""
    if len(llm_scores) < 2:
        return list(range(len(llm_scores)))
    final = [weight * a + (1 - weight) * b for a, b in zip(zscores(llm_scores), zscores(first_scores))]
    return sorted(range(len(final)), key=lambda i: -final[i])


def rerank_question(model, tokenizer, question, hits, mode=MODE, stats=None):
    """Candidate order for one question: indices into hits, best first; first-stage order on any failure."""
    if len(hits) < 2:
        return list(range(len(hits))), None, False
    passages = [cut(tokenizer, chunk.text, PASSAGE_TOKENS) for chunk, _ in hits]
    try:
        if mode == "pointwise":
            scores = pointwise_scores(model, tokenizer, question, passages, stats=stats)
        elif mode == "listwise":
            scores = listwise_scores(model, tokenizer, question, passages, stats=stats)
        else:
            raise SystemExit(f"03: unknown MODE {mode!r}: use pointwise or listwise.")
    except (RuntimeError, ValueError, IndexError) as e:  # a failing question must not end the run (issue 4)
        log.warning("03: reranking failed (%s): first-stage order kept", e)
        return list(range(len(hits))), None, True
    return blend(scores, [s for _, s in hits]), scores, False


def config_key(model_id, index_meta, mode):
    parts = [common.resolve_model(model_id), lm.model_fingerprint(model_id), json.dumps(index_meta, sort_keys=True),
             mode, str(CANDIDATES), str(PASSAGE_TOKENS), str(BLEND), POINTWISE_INSTRUCTION, LISTWISE_INSTRUCTION,
             common.SYSTEM_PROMPT]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


load_ranked = lm.read_records  # reranked records by question id


def run(questions, out_dir, model_id, mode=MODE, dtype_name=None):
    """Rerank every question's candidates with checkpointing; return (records in question order, meta)."""
    build_index = importlib.import_module("02_build_index")
    device = lm.pick_device()
    dtype = lm.pick_dtype(device, dtype_name, model_id)
    index_meta = json.loads((common.INDEX / "meta.json").read_text(encoding="utf-8"))
    built = {k: index_meta.get(k) for k in ("settings", "corpus", "dense_variant")}
    key = config_key(model_id, built, mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"ranked-{key}.jsonl"
    lm.drop_torn_tail(checkpoint)  # else the first record appended after a kill would join the torn line
    done = lm.read_answered(checkpoint, questions)
    todo = [q for q in questions if q.id not in done]
    print(f"03: {len(questions)} questions, {len(done)} from checkpoint, {mode} with {model_id}")
    tokenizer = lm.load_tokenizer(model_id)
    model = lm.load_model(model_id, device, dtype)
    index = build_index.load_index().attach_encoder(model, tokenizer)
    failures, t0 = 0, time.time()
    for start in tqdm(range(0, len(todo), CHECKPOINT_EVERY), desc="03 reranking", unit="chunk"):
        chunk = todo[start:start + CHECKPOINT_EVERY]
        t_search = time.time()
        all_hits = index.search_many([q.text for q in chunk], k=CANDIDATES)
        search_each = (time.time() - t_search) / len(chunk)
        records = []
        for q, hits in zip(chunk, all_hits):
            stats, t_question = {}, time.time()
            order, scores, failed = rerank_question(model, tokenizer, q.text, hits, mode, stats)
            failures += failed
            records.append(dict(id=q.id, question_sha=q.digest, chunks=[hits[i][0].id for i in order],
                                first_stage=[c.id for c, _ in hits], first_scores=[s for _, s in hits],
                                llm_scores=scores, fallback=failed,
                                seconds=round(search_each + time.time() - t_question, 3),
                                tokens=stats.get("tokens", 0)))
        with open(checkpoint, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        done.update((r["id"], r) for r in records)
    seconds = time.time() - t0
    timed = [done[q.id] for q in questions if "seconds" in done[q.id]]  # per question, this run and earlier ones
    meta = dict(model=model_id, key=key, mode=mode, device=device, dtype=str(dtype).replace("torch.", ""),
                questions=len(questions), reranked_now=len(todo), failures=failures, timed_questions=len(timed),
                seconds=dict(total=round(seconds, 1), per_question=round(sum(r["seconds"] for r in timed)
                                                                         / len(timed), 2) if timed else None),
                tokens_per_question=round(sum(r["tokens"] for r in timed) / len(timed), 1) if timed else None,
                settings=dict(CANDIDATES=CANDIDATES, KEEP=KEEP, PASSAGE_TOKENS=PASSAGE_TOKENS, BLEND=BLEND,
                              SHARE_PREFIX=SHARE_PREFIX, BATCH=BATCH), peak_rss_gib=round(lm.peak_rss_gib(), 2),
                versions=lm.versions())
    return [done[q.id] for q in questions], meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: common.answer_model()")
    parser.add_argument("--mode", default=MODE, choices=["pointwise", "listwise"])
    parser.add_argument("--out", type=Path, default=common.RERANK)
    parser.add_argument("--questions", type=Path, default=common.QUESTIONS)
    parser.add_argument("--ids", type=Path, help="rerank only the question ids listed in this file (measurements)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    questions = common.read_questions(args.questions)
    if args.ids:
        wanted = set(args.ids.read_text(encoding="utf-8").split())
        questions = [q for q in questions if q.id in wanted]
    if importlib.import_module("04_infer").RAG_PASSAGES == 0:  # the answers use no passages: nothing to rerank
        records, meta = [], dict(skipped="04_infer.py RAG_PASSAGES = 0: answers use no retrieved passages",
                                 questions=len(questions), reranked_now=0, failures=0,
                                 seconds=dict(total=0.0, per_question=0.0))
    else:
        records, meta = run(questions, args.out, args.model or common.answer_model(), args.mode)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "ranked.jsonl.tmp"
    tmp.write_text("".join(json.dumps(dict(id=r["id"], chunks=r["chunks"][:KEEP], fallback=r["fallback"]),
                                      ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(args.out / "ranked.jsonl")
    lm.write_json(args.out / "meta.json", meta)
    (args.out / "DONE").touch()
    per_question = meta["seconds"]["per_question"]
    print(f"03: reranked {meta['reranked_now']} questions in {meta['seconds']['total']:.1f} s "
          f"({'–' if per_question is None else f'{per_question:.2f}'} s/question, {meta['failures']} fell back)")


if __name__ == "__main__":
    main()
