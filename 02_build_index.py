"""Build the retriever over the laws and guidelines: article chunks, Korean BM25 and a dense FAISS index.

Reads data/corpus/ (`make data`) and the answering model (its tokenizer sizes the token windows and the model
itself embeds: one LLM answers, reranks and embeds). Writes outputs/02_index/: chunks.jsonl (one chunk per article
or window, with source file and article), bm25_tokens.json (kiwipiepy morphemes per chunk), dense.faiss (inner
product over L2-normalised vectors), emb_cache.npz (per-chunk embedding cache: only new or changed chunks are
embedded again, and a killed build resumes), meta.json and DONE (written last). The chunker, BM25, the embedder
and their settings live in retrieval.py. The dense part (dense.faiss, emb_cache.npz) is built only when the first
stage uses it (retrieval.SEARCH_METHOD dense or fused) or --dense asks for it (`make eval-retrieval`): with "bm25" the
answering model is not even loaded. Run by `make index`, only when the chosen answers use passages.
Does not read the development questions: they only measure (eval_retrieval.py, `make eval-retrieval`).
"""
import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

import answering
import common
import lm
import retrieval


def main():
    import faiss
    import kiwipiepy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="encoder: candidate name or model folder (default: the "
                        "answering model of selection.json)")
    parser.add_argument("--out", type=Path, default=common.INDEX)
    parser.add_argument("--dense", action="store_true", help="embed the chunks even when SEARCH_METHOD is bm25 "
                        "(eval_retrieval.py compares BM25, dense and fused)")
    args = parser.parse_args()
    dense = args.dense or retrieval.SEARCH_METHOD != "bm25"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "DONE").unlink(missing_ok=True)
    config = answering.chosen()
    encoder = dataclasses.replace(config, candidate=args.model).model if args.model else config.model
    settings = retrieval.index_settings()
    print(f"02: encoder {encoder}; settings {settings}")
    timings, load_start = {}, os.getloadavg()[0]
    tokenizer = lm.load_tokenizer(encoder)

    t0 = time.time()
    chunks = retrieval.chunk_corpus(common.CORPUS, retrieval.CORPUS_PARTS, retrieval.tokenizer_spans(tokenizer))
    timings["chunking"] = round(time.time() - t0, 1)
    lengths = [len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
    print(f"02: {len(chunks)} chunks from {len({c.source for c in chunks})} files in {timings['chunking']} s")

    t0 = time.time()
    tokens = retrieval.morphemes(retrieval.make_kiwi(), [c.text for c in chunks], progress=True)
    timings["bm25_tokenize"] = round(time.time() - t0, 1)
    t0 = time.time()
    retrieval.BM25(tokens, retrieval.BM25_BACKEND)
    timings["bm25_index"] = round(time.time() - t0, 2)

    t0 = time.time()
    device, vectors, dtype = lm.pick_device(), None, None
    if dense:
        model = lm.load_model(encoder, device, lm.pick_dtype(device))
        dtype = str(model.dtype)
        fingerprint = retrieval.encoder_fingerprint(encoder, model.dtype)
        vectors = retrieval.embed_chunks(model, tokenizer, [c.text for c in chunks], out / "emb_cache.npz",
                                         fingerprint)[retrieval.DENSE_VARIANT]
    timings["embedding"] = round(time.time() - t0, 1)

    retrieval.write_index(out, chunks, tokens, vectors)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != "DONE"}
    index_bytes = sum(s for n, s in sizes.items() if n != "emb_cache.npz")
    timings["total"] = round(sum(v for v in timings.values()), 1)
    common.write_meta(out / "meta.json", settings=settings, encoder=str(encoder),
                      dense_variant=retrieval.DENSE_VARIANT if dense else None,
                      corpus=retrieval.corpus_fingerprint(common.CORPUS, retrieval.CORPUS_PARTS), chunks=len(chunks),
                      files=len({c.source for c in chunks}), articles=len({(c.source, c.article) for c in chunks}),
                      chunk_tokens=dict(mean=round(float(np.mean(lengths)), 1), max=int(max(lengths))),
                      windowed_articles=len({(c.source, c.article) for c in chunks if c.parts > 1}),
                      seconds=timings, bytes=sizes, index_bytes=index_bytes, device=device, dtype=dtype,
                      peak_rss_gib=round(lm.peak_rss_gib(), 2), peak_gpu_gib=lm.peak_gpu_gib(),
                      loadavg=[round(load_start, 1), round(os.getloadavg()[0], 1)],
                      versions=dict(faiss=faiss.__version__, kiwipiepy=kiwipiepy.__version__))
    (out / "DONE").touch()
    print(f"02: indexed {len(chunks)} chunks in {timings['total']} s ("
          + (f"embedding {timings['embedding']} s" if dense else "BM25 only: no dense part for SEARCH_METHOD bm25")
          + f"), {index_bytes / 2**20:.1f} MiB -> {out}")


if __name__ == "__main__":
    main()
