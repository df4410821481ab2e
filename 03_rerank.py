"""Rerank the first-stage candidates of every question with the answering LLM itself (one LLM: no cross-encoder).

Reads data/prepared/questions.csv (`make data`), outputs/02_index/ (`make index`) and the answering model of
selection.json (answering.chosen()). For each question the top RERANK_CANDIDATES first-stage chunks are scored by
the LLM (retrieval.rerank_question: pointwise Yes/No logits or listwise FIRST), blended with the first-stage order,
and the best RERANK_KEEP chunk ids are written; descriptive questions only when they read passages
(answering.DESC_PASSAGES). Writes outputs/03_rerank/ranked-<key>.jsonl (checkpoint, resumed
after a kill), ranked.jsonl, meta.json, DONE. A question whose reranking fails keeps the first-stage order (logged).
Run by `make rerank`, only when the chosen answers use passages; 04_infer.py reads ranked.jsonl.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

import answering
import common
import competition
import lm
import retrieval

# ----------------------------------------------------------------------------- settings
CHECKPOINT_EVERY = 4  # questions per checkpoint append (a question costs ~10 s on this CPU)
# -----------------------------------------------------------------------------


def config_key(model_id, dtype_name, level, mode, index_dir=None):
    """Changes when anything that changes the rankings changes: model, dtype, level, index, reranker settings,
    prompts, how the label logits are read (lm.option_logits_tag, as 04's key) (not where the checkout lies: a moved
    checkout keeps its rankings)."""
    settings = {k: v for k, v in common.settings_of(retrieval).items() if k.startswith("RERANK_")}
    parts = [str(model_id), lm.model_fingerprint(model_id), dtype_name, level,
             retrieval.index_fingerprint(index_dir), mode, json.dumps(settings, sort_keys=True), common.SYSTEM_PROMPT,
             *lm.option_logits_tag(dtype_name)]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def run(questions, out_dir, config, mode=retrieval.RERANK_MODE, dtype_name=None, index_dir=None):
    """Rerank every question's candidates with the config's model and the index at index_dir (default
    common.INDEX), checkpointing into out_dir; return (records in question order, meta)."""
    device = lm.pick_device()
    dtype = lm.pick_dtype(device, dtype_name, config.level)
    dtype_name = str(dtype).replace("torch.", "")
    key = config_key(config.model, dtype_name, config.level, mode, index_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"ranked-{key}.jsonl"
    lm.drop_torn_tail(checkpoint)  # else the first record appended after a kill would join the torn line
    done = lm.read_answered(checkpoint, questions)
    todo = [q for q in questions if q.id not in done]
    print(f"03: {len(questions)} questions, {len(done)} from checkpoint, {mode} with {config.model} ({config.level})")
    tokenizer = lm.load_tokenizer(config.model)
    model = lm.load_model(config.model, device, dtype, level=config.level)
    index = retrieval.load_index(index_dir).attach_encoder(model, tokenizer)
    failures, t0 = 0, time.time()
    for start in tqdm(range(0, len(todo), CHECKPOINT_EVERY), desc="03 reranking", unit="chunk"):
        chunk = todo[start:start + CHECKPOINT_EVERY]
        t_search = time.time()
        all_hits = index.search_many([q.text for q in chunk], k=retrieval.RERANK_CANDIDATES)
        search_each = (time.time() - t_search) / len(chunk)
        records = []
        for q, hits in zip(chunk, all_hits):
            stats, t_question = {}, time.time()
            order, scores, failed = retrieval.rerank_question(model, tokenizer, q.text, hits, mode, stats)
            failures += failed
            records.append(dict(id=q.id, question_sha=q.digest, chunks=[hits[i][0].id for i in order],
                                first_stage=[c.id for c, _ in hits], first_scores=[s for _, s in hits],
                                llm_scores=scores, fallback=failed,
                                seconds=round(search_each + time.time() - t_question, 3),
                                tokens=stats.get("tokens", 0)))
        answering.append_records(checkpoint, records)
        done.update((r["id"], r) for r in records)
    seconds = time.time() - t0
    timed = [done[q.id] for q in questions if "seconds" in done[q.id]]  # per question, this run and earlier ones
    meta = dict(model=config.model, level=config.level, key=key, mode=mode, device=device,
                dtype=dtype_name, questions=len(questions), reranked_now=len(todo),
                failures=failures, timed_questions=len(timed),
                seconds=dict(total=round(seconds, 1), per_question=round(sum(r["seconds"] for r in timed)
                                                                         / len(timed), 2) if timed else None),
                tokens_per_question=round(sum(r["tokens"] for r in timed) / len(timed), 1) if timed else None,
                peak_rss_gib=round(lm.peak_rss_gib(), 2), peak_gpu_gib=lm.peak_gpu_gib())
    return [done[q.id] for q in questions], meta


def to_rerank(questions, wanted=None):
    """The questions whose passages 04 reads (descriptive ones only with answering.DESC_PASSAGES), or, for a
    measurement, exactly the wanted ids."""
    if wanted is not None:
        return [q for q in questions if q.id in wanted]
    return [q for q in questions if answering.reads_passages(q)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="candidate or model folder; default: selection.json's")
    parser.add_argument("--mode", default=retrieval.RERANK_MODE, choices=["pointwise", "listwise"])
    parser.add_argument("--out", type=Path, default=common.RERANK)
    parser.add_argument("--questions", type=Path, default=common.QUESTIONS)
    parser.add_argument("--ids", type=Path, help="rerank only the question ids listed in this file (measurements)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = answering.chosen()
    if args.model:
        config = dataclasses.replace(config, candidate=args.model)
    wanted = set(args.ids.read_text(encoding="utf-8").split()) if args.ids else None
    records, meta = run(to_rerank(competition.read_questions(args.questions), wanted), args.out, config, args.mode)
    common.write_text(args.out / "ranked.jsonl", "".join(
        json.dumps(dict(id=r["id"], chunks=r["chunks"][:retrieval.RERANK_KEEP], fallback=r["fallback"]),
                   ensure_ascii=False) + "\n" for r in records))
    settings = {k: v for k, v in common.settings_of(retrieval).items() if k.startswith("RERANK_")}
    common.write_meta(args.out / "meta.json", settings=dict(settings, CHECKPOINT_EVERY=CHECKPOINT_EVERY), **meta)
    (args.out / "DONE").touch()
    per_question = meta["seconds"]["per_question"]
    print(f"03: reranked {meta['reranked_now']} questions in {meta['seconds']['total']:.1f} s "
          f"({'–' if per_question is None else f'{per_question:.2f}'} s/question, {meta['failures']} fell back)")


if __name__ == "__main__":
    main()
