"""Retrieval quality of the 02 index on the development questions, written as a markdown report.

Reads outputs/02_index/ (`make index`), data/prepared/{questions,labels}.csv (the development set: `make data`
without data/test.csv), data/corpus/ and the index's encoder, the answering LLM (dense query vectors); the
retriever is retrieval.py's. The `reference` column names
the cited law and article for the law items: parsed to (law, kind, article); a question counts as a hit at rank r
when the r-th retrieved chunk comes from that law document (법률, 시행령 and 시행규칙 are different documents) and
has that article number. Reports recall@1/5/20 and MRR (over the top CANDIDATES) for BM25, dense (four pooling
variants) and fused (RRF, weighted), per domain and sub-domain; rank_bm25 vs bm25s; full question vs stem as
query; with and without laws_extended/ (BM25: its dense embedding would take hours on this CPU); index size,
build time and query latency. The questions are only measured, never indexed. Run by `make eval-retrieval`.
"""
import argparse
import csv
import hashlib
import json
import os
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import common
import competition
import lm
import retrieval

# ----------------------------------------------------------------------------- settings
KS = (1, 5, 20)  # recall cut-offs
MRR_DEPTH = 100  # reciprocal rank counted within this many chunks
FUSION_WEIGHTS = (0.3, 0.5, 0.7, 0.9)  # weighted fusion: BM25 weight values tried
WINNER_METRIC = "recall@5"  # the fusion default is chosen by this (ties: MRR); 3-5 passages go into the prompt
EXTENDED_PART = "laws_extended"
CACHE = common.OUTPUTS / "eval_retrieval"  # morpheme cache of the laws_extended chunks
# Short names used in the references, mapped to the compact names of the corpus documents.
LAW_ALIASES = {
    "정보통신망법": "정보통신망이용촉진및정보보호등에관한법률",
    "망법": "정보통신망이용촉진및정보보호등에관한법률",
    "신용정보법": "신용정보의이용및보호에관한법률",
    "금융실명법": "금융실명거래및비밀보장에관한법률",
    "개인정보법": "개인정보보호법",
    "자본시장법": "자본시장과금융투자업에관한법률",
    "정보통신기반법": "정보통신기반보호법",
    "특정금융정보법": "특정금융거래정보의보고및이용등에관한법률",
    "전자문서법": "전자문서및전자거래기본법",
}
# Sub-domain -> law, for references that give only an article ("제42조(위원의 제척ㆍ기피ㆍ회피)").
SUBDOMAIN_LAW = {
    "개인정보보호": "개인정보보호법",
    "신용정보": "신용정보의이용및보호에관한법률",
    "전자금융": "전자금융거래법",
    "정보통신": "정보통신망이용촉진및정보보호등에관한법률",
    "전자서명": "전자서명법",
}
# -----------------------------------------------------------------------------

ART = r"제\s*(\d+)\s*조(?:\s*의\s*(\d+))?"
ART_RE = re.compile(ART)
MORE_RE = re.compile(r"^(?:\s*(?:제\s*\d+\s*[항호]|\d+\s*항))*\s*(?:및|,|와|과|또는)\s*" + ART)
KINDS = ("시행규칙", "시행령")


def catalogue(chunks):
    """{(compact law, kind): {article: title}} of chunk-like objects."""
    docs = defaultdict(dict)
    for c in chunks:
        if c.article.startswith("제"):
            docs[(retrieval.compact(c.law), c.kind)].setdefault(c.article, c.title)
    return dict(docs)


def same_title(a, b):
    a, b = retrieval.compact(a or ""), retrieval.compact(b or "")
    return bool(a and b) and (a == b or a in b or b in a)


def find_law(prefix, docs):
    """(compact law, kind) named in the text before the article, or None; the longest known name wins."""
    text = retrieval.compact(prefix)
    names = {law for law, _ in docs} | set(LAW_ALIASES)
    found = [n for n in names if n in text]
    if not found:
        return None, text
    name = max(found, key=len)
    law = LAW_ALIASES.get(name, name)
    rest = text[text.index(name) + len(name):]
    kind = next((k for k in KINDS if rest.startswith(k)), None)
    if kind is None:
        kind = "법률" if (law, "법률") in docs else next((k for lw, k in docs if lw == law), "법률")
    leftover = text.replace(name, "", 1).replace(kind, "", 1) if kind in KINDS else text.replace(name, "", 1)
    return (law, kind), leftover


def resolve_inferred(article, title, sub_domain, docs):
    """(law, kind) for a reference without a law name: the sub-domain's law; a given title picks among its
    법률/시행령/시행규칙, or among all documents when the family has no such article title."""
    family = SUBDOMAIN_LAW.get(str(sub_domain).strip())
    if not family:
        return None, "no law named and no law for the sub-domain"
    if title:
        in_family = [(law, k) for (law, k), arts in docs.items()
                     if law == family and same_title(arts.get(article), title)]
        if in_family:
            return (in_family[0] if len(in_family) == 1 else (family, "법률")), "title"
        anywhere = [d for d, arts in docs.items() if same_title(arts.get(article), title)]
        if len(anywhere) == 1:
            return anywhere[0], "title"
        return None, "title not found under that article"
    return (family, "법률"), "sub-domain"


def parse_reference(reference, sub_domain, docs):
    """Gold chunk keys of a `reference` cell: dict(golds=[(law, kind, article)], how=...) or dict(golds=[], why=...).

    The article must head the reference (optionally after a law name, in any spelling: spaces, 「」, quotes,
    short names, 시행령/시행규칙) or close it in parentheses ("... (제43조)"); an article cited inside a quoted
    sentence is not the reference. "제14조 및 제9조" gives both. The law, when not named, comes from the sub-domain
    (checked against the article title when one is given). how: explicit | title | sub-domain.
    """
    text = next((line.strip() for line in str(reference or "").split("\n") if line.strip()), "")
    m = ART_RE.search(text)
    if not m:
        return dict(golds=[], why="no article")
    doc, leftover = find_law(text[:m.start()], docs)
    if leftover and not doc:
        bracket = re.fullmatch(r"\s*「([^」]+)」\s*", text[:m.start()])
        unknown = re.search(r"([가-힣]+(?:법|법률|규정|고시|시행령|시행규칙))[\s\"」]*$", text[:m.start()])
        tail = re.search(r"\(\s*" + ART + r"\s*\)\s*[.\"']?\s*$", text)
        if tail:
            m, title, leftover = tail, None, ""
        elif bracket and len(retrieval.compact(bracket.group(1))) <= 30:
            title, leftover = bracket.group(1), ""  # 「통신과금서비스제공자의 등록 등」 제53조: an article title
        elif unknown:
            return dict(golds=[], why="document not in the corpus")
        else:
            return dict(golds=[], why="article cited inside a sentence")
    else:
        title = None
    if leftover and len(leftover) > 2:
        return dict(golds=[], why="article cited inside a sentence")
    article = retrieval.article_label(m.group(1), m.group(2))
    after = text[m.end():]
    paren = re.match(r"\s*\(([^)]{1,40})\)", after)
    words = re.match(r"\s+([가-힣ㆍ·\s]{2,30}?)\s*(?=[\"」]|$)", after)
    title = title or (paren.group(1) if paren else words.group(1) if words and doc else None)
    articles = [article]
    rest = after
    while (more := MORE_RE.match(rest)):
        articles.append(retrieval.article_label(more.group(1), more.group(2)))
        rest = rest[more.end():]
    how = "explicit"
    if doc is None:
        doc, how = resolve_inferred(article, title, sub_domain, docs)
        if doc is None:
            return dict(golds=[], why=how)
    if doc not in docs:
        return dict(golds=[], why="document not in the corpus")
    golds = [(doc[0], doc[1], a) for a in articles if a in docs[doc]]
    if not golds:
        return dict(golds=[], why="article not in the cited document")
    return dict(golds=golds, how=how)


# ----------------------------------------------------------------------------- metrics
def first_rank(keys, golds):
    """1-based rank of the first retrieved key in golds, None when absent."""
    golds = set(golds)
    return next((r for r, k in enumerate(keys, 1) if k in golds), None)


def summarise(ranks):
    n = len(ranks)
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n if n else 0.0 for k in KS}
    out["MRR"] = sum(1 / r for r in ranks if r is not None and r <= MRR_DEPTH) / n if n else 0.0
    out["n"] = n
    return out


def row(name, m):
    return f"| {name} | {m['n']} | " + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in KS) + f" | {m['MRR']:.3f} |"


HEAD = "| method | n | " + " | ".join(f"recall@{k}" for k in KS) + " | MRR |\n|---|---|" + "---|" * (len(KS) + 1)


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1000


def latency(ms):
    return f"mean {statistics.mean(ms):.1f} ms, p50 {percentile(ms, 50):.1f} ms, p95 {percentile(ms, 95):.1f} ms"


# ----------------------------------------------------------------------------- data
def dev_items(docs):
    """(items with gold keys, parse stats): every dev question whose reference parses, with its text."""
    if not common.LABELS.exists():
        raise SystemExit(f"{common.LABELS} not found: retrieval is measured on the development set "
                         "(`make data` without data/test.csv).")
    questions = {q.id: q for q in competition.read_questions(common.QUESTIONS)}
    with open(common.LABELS, encoding="utf-8-sig", newline="") as f:
        labels = list(csv.DictReader(f))
    items, why = [], defaultdict(int)
    for lab in labels:
        parsed = parse_reference(lab.get("reference"), lab.get("sub_domain"), docs)
        q = questions.get(lab["ID"])
        if not parsed["golds"] or q is None:
            why[parsed.get("why", "question missing")] += 1
            continue
        items.append(dict(id=lab["ID"], domain=lab["domain"], sub_domain=lab["sub_domain"], text=q.text,
                          stem=q.stem, golds=parsed["golds"], how=parsed["how"]))
    return items, dict(why), len(labels)


def extended_tokens(tokenizer, kiwi):
    """Chunks and morphemes of laws + guidelines + laws_extended (cached by corpus and chunk settings)."""
    parts = list(retrieval.CORPUS_PARTS) + [EXTENDED_PART]
    fingerprint = retrieval.corpus_fingerprint(common.CORPUS, parts) + json.dumps(retrieval.index_settings())
    key = hashlib.sha256(fingerprint.encode())
    path = CACHE / f"extended-{key.hexdigest()[:12]}.json"
    chunks = retrieval.chunk_corpus(common.CORPUS, parts, retrieval.tokenizer_spans(tokenizer))
    if path.exists():
        tokens = json.loads(path.read_text(encoding="utf-8"))
        return chunks, tokens, None
    t0 = time.time()
    tokens = retrieval.morphemes(kiwi, [c.text for c in chunks])
    seconds = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    common.write_text(path, json.dumps(tokens, ensure_ascii=False))
    return chunks, tokens, seconds


# ----------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.REPORTS / "retrieval.md")
    parser.add_argument("--index", type=Path, default=common.INDEX)
    parser.add_argument("--command", default="make eval-retrieval")
    parser.add_argument("--no-extended", action="store_true", help="skip the laws_extended comparison")
    args = parser.parse_args()

    t_start = time.time()
    if not (args.index / "emb_cache.npz").exists():
        raise SystemExit(f"{args.index} has no dense part (built with SEARCH_METHOD bm25): build one with "
                         f"`02_build_index.py --dense --out {args.index}` (`make eval-retrieval` does).")
    index = retrieval.load_index(args.index)
    meta = index.meta
    tokenizer = lm.load_tokenizer(meta["encoder"])  # chunk windows are sized in the encoder's tokens
    all_parts = list(retrieval.CORPUS_PARTS) + ([] if args.no_extended else [EXTENDED_PART])
    cheap_spans = lambda t: [(m.start(), m.end()) for m in re.finditer(r"\S+", t)]  # noqa: E731
    docs = catalogue(retrieval.chunk_corpus(common.CORPUS, all_parts, cheap_spans))
    items_all, why, n_labels = dev_items(docs)
    indexed_docs = catalogue(index.chunks)
    items = [it for it in items_all if all((g[0], g[1]) in indexed_docs for g in it["golds"])]
    outside = len(items_all) - len(items)
    print(f"eval: {len(items_all)} of {n_labels} dev questions have a parsable law reference, "
          f"{len(items)} inside the index corpus")

    # BM25
    ranks, lat = defaultdict(list), defaultdict(list)
    bm25_hits = {}
    index.bm25_ranking(items[0]["text"] if items else "", MRR_DEPTH)  # warm-up: kiwi's first call loads its model
    for it in items:
        hits, ms = timed(index.bm25_ranking, it["text"], MRR_DEPTH)
        bm25_hits[it["id"]] = hits
        lat["bm25"].append(ms)
        ranks["bm25"].append(first_rank([index.chunks[i].key for i, _ in hits], it["golds"]))
        stem_hits = index.bm25_ranking(it["stem"], MRR_DEPTH)
        ranks["bm25 (stem only)"].append(first_rank([index.chunks[i].key for i, _ in stem_hits], it["golds"]))

    # dense: all pooling variants from the cache, query vectors from one batched pass
    device = lm.pick_device()
    model = lm.load_model(meta["encoder"], device, lm.pick_dtype(device))
    index.attach_encoder(model, tokenizer)
    t0 = time.time()
    qvec = retrieval.embed(model, tokenizer, [it["text"] for it in items], progress=True)
    encoder_ms = (time.time() - t0) * 1000 / max(len(items), 1)
    cache = np.load(args.index / "emb_cache.npz", allow_pickle=False)
    row_of = {str(h): i for i, h in enumerate(cache["hashes"])}
    chunk_rows = [row_of[retrieval.embedding_key(tokenizer, c.text)] for c in index.chunks]
    dense_hits = {}
    unmeasured = []
    for variant in retrieval.DENSE_VARIANTS:
        matrix = cache[variant][chunk_rows]
        if (np.linalg.norm(matrix, axis=1) < 0.5).any() or (np.linalg.norm(qvec[variant], axis=1) < 0.5).any():
            unmeasured.append(variant)  # EMBED_DEPTH "mid": the forward pass stopped before the last layer
            continue
        flat = retrieval.flat_index(matrix)
        scores, idx = flat.search(qvec[variant], MRR_DEPTH)
        for n, it in enumerate(items):
            hits = [(int(i), float(s)) for i, s in zip(idx[n], scores[n])]
            ranks[f"dense {variant}"].append(first_rank([index.chunks[i].key for i, _ in hits], it["golds"]))
            if variant == meta["dense_variant"]:
                dense_hits[it["id"]] = hits
    for n, it in enumerate(items):
        vec = qvec[meta["dense_variant"]][n]
        _, ms = timed(index.dense_ranking, vec, MRR_DEPTH)
        lat["dense (faiss search, given the query vector)"].append(ms)
        _, ms = timed(index.search_with_vector, it["text"], vec, MRR_DEPTH, "fused")
        lat[f"fused {index.fusion} (BM25 + faiss + fusion, given the query vector)"].append(ms)
        b, d = bm25_hits[it["id"]], dense_hits[it["id"]]
        keys = lambda hits: [index.chunks[i].key for i, _ in hits]  # noqa: E731
        ranks["fused rrf"].append(first_rank(keys(index.fuse(b, d, MRR_DEPTH, "rrf")), it["golds"]))
        for w in FUSION_WEIGHTS:
            index.weight_bm25 = w
            ranks[f"fused weighted {w}"].append(first_rank(keys(index.fuse(b, d, MRR_DEPTH, "weighted")), it["golds"]))
    index.weight_bm25 = retrieval.FUSION_WEIGHT_BM25
    summary = {name: summarise(r) for name, r in ranks.items()}
    fusions = [n for n in summary if n.startswith("fused")]
    winner = max(fusions, key=lambda n: (summary[n][WINNER_METRIC], summary[n]["MRR"]))
    dense_best = max((n for n in summary if n.startswith("dense")),
                     key=lambda n: (summary[n][WINNER_METRIC], summary[n]["MRR"]))
    default_fused = "fused rrf" if index.fusion == "rrf" else f"fused weighted {index.weight_bm25}"
    default_dense = f"dense {meta['dense_variant']}"

    # BM25 backends on the same tokens
    tokens = json.loads((args.index / "bm25_tokens.json").read_text(encoding="utf-8"))
    backends = {}
    queries = retrieval.morphemes(index.kiwi, [it["text"] for it in items])
    for backend in ("rank_bm25", "bm25s"):
        try:
            engine, build_ms = timed(retrieval.BM25, tokens, backend)
        except ImportError as e:
            backends[backend] = dict(error=f"not installed ({e.name})")
            continue
        ms, rk = [], []
        for it, q in zip(items, queries):
            scores, t = timed(engine.scores, q)
            top, t2 = timed(retrieval.top_k, scores, MRR_DEPTH)
            ms.append(t + t2)
            rk.append(first_rank([index.chunks[i].key for i in top], it["golds"]))
        backends[backend] = dict(build_ms=build_ms, latency=latency(ms), metrics=summarise(rk))
    kiwi_ms = [timed(retrieval.morphemes, index.kiwi, [it["text"]])[1] for it in items]

    # laws_extended, BM25 only
    extended = None
    if not args.no_extended:
        ext_chunks, ext_tokens, ext_seconds = extended_tokens(tokenizer, index.kiwi)
        engine = retrieval.BM25(ext_tokens, index.bm25.backend)
        ext_ranks_same, ext_ranks_all = [], []
        for it, q in zip(items_all, retrieval.morphemes(index.kiwi, [it["text"] for it in items_all])):
            top = retrieval.top_k(engine.scores(q), MRR_DEPTH)
            r = first_rank([ext_chunks[i].key for i in top], it["golds"])
            ext_ranks_all.append(r)
            if all((g[0], g[1]) in indexed_docs for g in it["golds"]):
                ext_ranks_same.append(r)
        extended = dict(chunks=len(ext_chunks), tokenize_seconds=ext_seconds, same=summarise(ext_ranks_same),
                        all=summarise(ext_ranks_all),
                        base_all=summarise(ranks["bm25"] + [None] * outside))

    # per domain / sub-domain
    groups = defaultdict(list)
    for n, it in enumerate(items):
        groups[("domain", it["domain"])].append(n)
        groups[("sub_domain", it["sub_domain"])].append(n)

    # ------------------------------------------------------------------ report
    s, b = meta["seconds"], meta["bytes"]
    hows = defaultdict(int)
    for it in items_all:
        hows[it["how"]] += 1
    shown = args.out.relative_to(common.ROOT) if args.out.is_absolute() and common.ROOT in args.out.parents \
        else args.out
    bm25_wins = (summary["bm25"][WINNER_METRIC], summary["bm25"]["MRR"]) >= (summary[winner][WINNER_METRIC],
                                                                             summary[winner]["MRR"])
    lines = [
        "# Retrieval on the development set",
        "",
        f"Produced by `{args.command}` (`.venv/bin/python eval_retrieval.py --out {shown}`) "
        f"in {time.time() - t_start:.0f} s, from the index of `make index` (02_build_index.py).",
        "The development questions are only measured: they are in no chunk, index or prompt.",
        "",
        "## Gold references",
        f"- {len(items_all)} of {n_labels} development questions have a parsable law reference "
        f"({', '.join(f'{v} {k}' for k, v in sorted(hows.items()))}: explicit = law named; title = law from the "
        "sub-domain, document chosen by the article title; sub-domain = law from the sub-domain, 법률 assumed).",
        f"- {len(items)} cite a document inside the index corpus ({' + '.join(meta['settings']['CORPUS_PARTS'])}); "
        f"{outside} cite a laws_extended document only.",
        "- Not parsable: " + ", ".join(f"{v} {k}" for k, v in sorted(why.items(), key=lambda x: -x[1])) + ".",
        f"- Hit = a retrieved chunk of the cited document (법률, 시행령, 시행규칙 apart) with the cited article; "
        f"MRR within the top {MRR_DEPTH} chunks. Query = the full question text (stem + options).",
        "",
        "## Index",
        f"- {meta['chunks']} chunks ({meta['articles']} articles/별표/부칙, {meta['windowed_articles']} split into "
        f"windows of {meta['settings']['WINDOW_TOKENS']} tokens, overlap {meta['settings']['WINDOW_OVERLAP']}) from "
        f"{meta['files']} files; chunk length mean {meta['chunk_tokens']['mean']} / max {meta['chunk_tokens']['max']} "
        "encoder tokens.",
        f"- Build on this CPU ({meta['device']}, {meta['dtype']}): chunking {s['chunking']} s, morphemes "
        f"{s['bm25_tokenize']} s, BM25 index {s['bm25_index']} s, embeddings {s['embedding']} s "
        "(0 when all chunks came from the cache); total " + f"{s['total']} s"
        + (f" (1-minute load average {meta['loadavg'][0]} at the start, {meta['loadavg'][1]} at the end"
           + (": other jobs shared the 2 cores)." if max(meta["loadavg"]) > 2 else ").") if "loadavg" in meta else "."),
        f"- Size: {meta['index_bytes'] / 2**20:.1f} MiB (" + ", ".join(
            f"{n} {v / 2**20:.1f} MiB" for n, v in b.items()) + "; emb_cache.npz holds all four dense variants).",
        f"- Encoder: `{meta['encoder']}` ("
        + ("the answering LLM" if meta["settings"]["ENCODER"] is None else "a separate encoder")
        + f"), first {meta['settings']['EMBED_MAX_TOKENS']} tokens of each chunk/question, dense variant "
        f"`{meta['dense_variant']}`; fusion `{index.fusion}` (BM25 weight {index.weight_bm25}); first-stage search "
        f"method (retrieval.SEARCH_METHOD, used by 03 and 04) `{retrieval.SEARCH_METHOD}`.",
        "",
        "## Recall (index corpus)",
        HEAD,
    ]
    dense = [f"dense {v}" for v in retrieval.DENSE_VARIANTS if v not in unmeasured]
    order = ["bm25", "bm25 (stem only)"] + dense + fusions
    lines += [row(n, summary[n]) for n in order]
    if unmeasured:
        lines += ["", f"Not measured: dense {', '.join(unmeasured)} (EMBED_DEPTH = \"mid\": the embedding pass stops "
                  "after the middle layer to halve its cost on this CPU)."]
    lines += [
        "",
        f"Best fusion by {WINNER_METRIC} (then MRR): **{winner}**; default in retrieval.py: `{default_fused}`. "
        f"Best dense variant: **{dense_best}**; default: `{default_dense}`. "
        "(Chosen on the same development set they are reported on: optimistic by the selection.) "
        + (f"BM25 alone ({WINNER_METRIC} {summary['bm25'][WINNER_METRIC]:.3f}, MRR {summary['bm25']['MRR']:.3f}) "
           f"{'beats' if bm25_wins else 'loses to'} "
           f"the best fusion; recommended first-stage method (SEARCH_METHOD): `{retrieval.SEARCH_METHOD}`."),
        "",
        "## Per domain and sub-domain (BM25 / default dense / default fused)",
        "| group | n | method | " + " | ".join(f"recall@{k}" for k in KS) + " | MRR |",
        "|---|---|---|" + "---|" * (len(KS) + 1),
    ]
    for (level, name), idx_list in sorted(groups.items()):
        for method in ("bm25", default_dense, default_fused):
            m = summarise([ranks[method][i] for i in idx_list])
            lines.append(f"| {level}: {name} | {m['n']} | {method} | "
                         + " | ".join(f"{m[f'recall@{k}']:.3f}" for k in KS) + f" | {m['MRR']:.3f} |")
    lines += [
        "",
        f"## Query latency (per question, this CPU, index corpus; load average {os.getloadavg()[0]:.1f} here)",
        f"- BM25 (kiwi morphemes + scoring + top-{MRR_DEPTH}): {latency(lat['bm25'])}; kiwi alone (timed "
        f"in a second pass) {latency(kiwi_ms)}.",
    ]
    lines += [f"- {name}: {latency(ms)}." for name, ms in lat.items() if name != "bm25"]
    lines += [f"- Encoder forward for the query vector (not included above; batched {retrieval.EMBED_BATCH}): "
              f"{encoder_ms:.0f} ms per question.", "",
              "## BM25 backend (same morphemes, scoring + top-k only)", HEAD]
    for backend, r in backends.items():
        if "error" in r:
            lines.append(f"| {backend} | – | {r['error']} | | | |")
        else:
            lines.append(row(f"{backend} (build {r['build_ms']:.0f} ms; query {r['latency']})", r["metrics"]))
    if extended:
        lines += [
            "",
            "## laws_extended/ (BM25 only)",
            f"With laws_extended the corpus has {extended['chunks']} chunks"
            + (f" (morphemes {extended['tokenize_seconds']:.0f} s)." if extended['tokenize_seconds'] else "."),
            HEAD,
            row("BM25 laws+guidelines, questions citing them", summary["bm25"]),
            row("BM25 + laws_extended, same questions", extended["same"]),
            row("BM25 laws+guidelines, all parsable questions", extended["base_all"]),
            row("BM25 + laws_extended, all parsable questions", extended["all"]),
        ]
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_text(args.out, "\n".join(lines))
    print(f"eval: wrote {args.out} ({len(items)} questions, winner {winner}, {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
