"""The retriever: corpus chunks, Korean BM25, dense vectors from the answering LLM, fusion, and the LLM reranker.

Used by the stages that build (02_build_index.py), rerank (03_rerank.py) and answer (04_infer.py) and by the
report scripts. Nothing here reads the development questions. One LLM answers, reranks and embeds: the dense
encoder and the reranker are the loaded answering model, attached by the caller.

    index = load_index()                         # outputs/02_index, fails with a message when not built
    index.attach_encoder(model, tokenizer)       # dense/fused only: the loaded answering LLM embeds queries
    hits = index.search(text, k=5)               # [(Chunk, score)], best first, by SEARCH_METHOD
    hits_per_q = index.search_many(texts, k=5)   # batched dense forward passes
    order, scores, failed = rerank_question(model, tokenizer, question, hits)   # the LLM reranks the hits
    context = format_context(hits, tokenizer, max_passages=3, max_tokens=768)   # "" when nothing was retrieved
"""
import hashlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import competition
import lm

# ----------------------------------------------------------------------------- settings
CORPUS_PARTS = ["laws", "guidelines"]  # laws_extended/ lowers recall on the dev set (reports/retrieval.md)
WINDOW_TOKENS = 384  # body tokens (student tokenizer) per chunk; longer articles become overlapping windows
WINDOW_OVERLAP = 64  # tokens shared by consecutive windows, snapped to a line (항/호) boundary when possible
ADDENDA = "latest"  # 부칙: "latest" keeps only the newest amendment's 부칙, "all" every one, "none" drops them
SKIP_DELETED = True  # "##### 제8조 / 삭제 <2020.2.4>": an article with no text left is not a chunk
PDF_WRAP_MIN = 30  # guideline .txt (PDF text): a line this long that ends mid-sentence continues on the next
KEEP_POS = ("NNG", "NNP", "NR", "SN", "SL", "SH", "XR", "VV", "VA")  # kiwi tags kept for BM25 (VV-R etc. too)
BM25_BACKEND = "bm25s"  # bm25s | rank_bm25: same recall, bm25s ~300x faster per query (reports/retrieval.md)
BM25_K1, BM25_B = 1.5, 0.75
ENCODER = None  # None: the student LLM (single-LLM rule); or a directory of a separate encoder if rules allow
EMBED_TEMPLATE = '이 글: "{text}"\n이 글의 뜻을 한 단어로 말하면: "'  # PromptEOL (Jiang et al. 2023), Korean
DENSE_VARIANT = "mean@mid"  # pooling@layer: last_token|mean @ last|mid, measured in reports/retrieval.md
EMBED_DEPTH = "mid"  # "mid": run only the layers up to the middle one (half the cost; no @last variants); "all"
EMBED_BATCH = 8  # texts per forward pass
EMBED_MAX_TOKENS = 96  # text tokens embedded per chunk/query (header + start): 2 shared CPU cores, see report
EMBED_SAVE_EVERY = 25  # batches between cache saves, so a killed build resumes
SEARCH_METHOD = "bm25"  # first stage of 03 (candidates) and 04 (passages without 03): bm25 | dense | fused; bm25:
# recall@1 0.730 as fused 0.9 and recall@5 0.887 vs 0.879 (reports/retrieval.md), and 02 then embeds nothing (the
# teacher's dense pass over the corpus takes 14 min on a 2-core CPU, a third of its 45 min budget; README)
FUSION = "weighted"  # weighted | rrf: the fusion that wins on the dev set (reports/retrieval.md)
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
FUSION_WEIGHT_BM25 = 0.9  # weighted fusion: w * minmax(bm25) + (1 - w) * minmax(dense); dev winner (0.7 ties on recall@5)
CANDIDATES = 100  # per method, before fusion
# Reranking by the answering LLM (03_rerank.py; reports/rerank.md: listwise blend 0.7 kept recall, pointwise lost it)
RERANK_MODE = "listwise"  # pointwise | listwise
RERANK_CANDIDATES = 10  # first-stage candidates scored per question
RERANK_KEEP = 3  # chunks kept for the answer prompt (the answer's passages are at most this many)
RERANK_PASSAGE_TOKENS = 160  # a passage is cut to this many tokens for reranking (cut, never dropped)
RERANK_BLEND = 0.7  # final = BLEND * z(LLM score) + (1 - BLEND) * z(first-stage score); 1 = LLM only
RERANK_POINTWISE_INSTRUCTION = "문서가 질문에 답하는 데 필요한 내용을 담고 있으면 Yes, 아니면 No로만 답하세요."
RERANK_LISTWISE_INSTRUCTION = "질문에 답하는 데 가장 도움이 되는 문서의 기호 하나만 답하세요."
# -----------------------------------------------------------------------------

log = logging.getLogger("retrieval")
YES, NO = "Yes", "No"  # pointwise answer tokens
LABELS = "ABCDEFGHIJKLMNOPQRST"  # listwise passage labels: single tokens, at most 20 candidates
DENSE_VARIANTS = ["last_token@last", "mean@last", "last_token@mid", "mean@mid"]
ARTICLE_RE = re.compile(r"^#####\s*제\s*(\d+)\s*조(?:\s*의\s*(\d+))?\s*(?:\((.*)\))?\s*$")
GUIDE_ARTICLE_RE = re.compile(r"^\s*제\s*(\d+)\s*조(?:\s*의\s*(\d+))?\s*\(([^)]{1,60})\)")
GUIDE_HEADING_RE = re.compile(r"^\s*(?:#+\s*)?(제\s*\d+\s*[장절관편](?:의\d+)?\s.*|\[?별표\s*\d+.*|부\s*칙.*)$")
ITEM_START_RE = re.compile(r"^\s*(?:[①-⑳]|\d+\.|[가-하]\.|\(\d+\)|제\s*\d+\s*[조장절]|부\s*칙|\[별표|<|#)")
BOX_RE = re.compile(r"[\u2500-\u257f]+")  # box-drawing characters of the flattened PDF tables
DELETED_RE = re.compile(r"^\s*삭\s*제\s*(?:<[^>]*>)?\s*$")


@dataclass
class Chunk:
    """One retrievable passage. text starts with the header line; article is "제7조의2", "부칙" or ""."""

    id: int
    source: str  # corpus-relative path, e.g. laws/전자서명법__법률.md
    law: str  # display name without the kind, e.g. "개인정보 보호법"
    kind: str  # 법률 | 시행령 | 시행규칙 | 대통령령 | 행정규칙
    article: str
    title: str
    part: int  # window number (1-based) within the article
    parts: int
    text: str

    @property
    def key(self):
        """(compact law name, kind, article): what a reference names; equal for all windows of an article."""
        return compact(self.law), self.kind, self.article


def compact(name):
    """Law names compared without spaces, brackets or quotes: "「개인정보 보호법」" -> "개인정보보호법"."""
    return re.sub(r"[\s「」『』\"'“”‘’《》<>()\[\]·ㆍ]", "", name)


def article_label(number, branch=None):
    return f"제{int(number)}조" + (f"의{int(branch)}" if branch else "")


# ----------------------------------------------------------------------------- chunking
def read_text(path):
    """UTF-8 text of a corpus file; a clear error naming the file otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"retrieval: {path} is not UTF-8 ({e}): convert it to UTF-8 or remove it from the corpus.") from e
    return competition.clean_text(text)


def split_front_matter(text):
    """(fields, body) of a law file with YAML front matter; only flat `key: value` lines are read."""
    fields = {}
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end > 0:
            for line in text[4:end].split("\n"):
                m = re.match(r"^([^\s:][^:]*):\s*(.*)$", line)
                if m:
                    fields[m.group(1).strip()] = m.group(2).strip().strip("'\"")
            text = text[end + 4:]
    return fields, text


def law_identity(path, fields):
    """(display name, kind) from the file name `<law>__<kind>.md` and the front matter title."""
    stem = Path(path).stem
    kind = stem.split("__")[1] if "__" in stem else "법률"
    title = fields.get("제목") or stem.split("__")[0]
    name = re.sub(rf"\s*{kind}$", "", title).strip() if kind != "법률" else title.strip()
    return name or stem.split("__")[0], kind


def token_windows(text, spans, size, overlap):
    """Split text into windows of at most `size` tokens, consecutive windows sharing about `overlap` tokens.

    spans are the (start, end) character offsets of the tokens of text. A window ends, when it can, at the
    last line start in its second half, so a 항 or 호 is not cut; the overlap snaps forward to a line start.
    Returns the window strings; one window when the text fits.
    """
    if len(spans) <= size:
        return [text.strip()] if text.strip() else []
    line_starts = {i for i, (s, _) in enumerate(spans) if i > 0 and "\n" in text[spans[i - 1][1]:s + 1]}
    windows, start = [], 0
    while start < len(spans):
        end = min(start + size, len(spans))
        if end < len(spans):
            snapped = [i for i in line_starts if start + size // 2 < i <= end]
            end = max(snapped) if snapped else end
        windows.append(text[spans[start][0]:spans[end - 1][1]].strip())
        if end >= len(spans):
            break
        nxt = max(end - overlap, start + 1)
        forward = [i for i in line_starts if nxt <= i < end]
        start = min(forward) if forward else nxt
    return [w for w in windows if w]


def make_chunks(law, kind, source, article, title, body, spans_fn):
    """Chunks of one article: a header line (law, kind, article, title) above each token window of the body."""
    header = f"{law} [{kind}] {article}" + (f" ({title})" if title else "")
    body = body.strip()
    windows = token_windows(body, spans_fn(body), WINDOW_TOKENS, WINDOW_OVERLAP) if body else []
    return [Chunk(id=-1, source=source, law=law, kind=kind, article=article, title=title, part=i, parts=len(windows),
                  text=f"{header}\n{w}") for i, w in enumerate(windows, 1)]


def split_addenda(lines):
    """The 부칙 blocks of an addenda section: each starts at a line beginning with 부칙 (e.g. 부칙 <제18479호,...>)."""
    blocks = []
    for line in lines:
        if re.match(r"^\s*부\s*칙", line) or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(b).strip() for b in blocks if "\n".join(b).strip()]


def addenda_chunks(law, kind, source, lines, spans_fn):
    """부칙 per ADDENDA: the newest block only (last in the file), all blocks, or none."""
    if ADDENDA == "none":
        return []
    blocks = split_addenda(lines)
    if ADDENDA == "latest":
        blocks = blocks[-1:]
    elif ADDENDA != "all":
        raise SystemExit(f"retrieval: unknown ADDENDA {ADDENDA!r}: use latest, all or none.")
    chunks = []
    for block in blocks:
        first, _, rest = block.partition("\n")
        title = re.sub(r"^\s*부\s*칙\s*", "", first).strip(" <>") if re.match(r"^\s*부\s*칙", first) else ""
        body = rest if title or re.match(r"^\s*부\s*칙\s*$", first) else block
        chunks += make_chunks(law, kind, source, "부칙", title, body, spans_fn)
    return chunks


def chunk_law(text, source, spans_fn, name_kind):
    """Chunks of a law file: one per `##### 제N조 (제목)` article (windows when long), then the 부칙.

    Chapter headings (`## 제1장`) end an article but are not chunks. Raises when the file has no article.
    """
    law, kind = name_kind
    chunks, current, addenda = [], None, None
    lines = text.split("\n")
    for line in lines:
        m = ARTICLE_RE.match(line)
        if addenda is not None:
            addenda.append(line)
        elif m:
            current = dict(article=article_label(m.group(1), m.group(2)), title=(m.group(3) or "").strip(), body=[])
            chunks.append(current)
        elif re.match(r"^#{1,4}\s*부\s*칙", line):
            addenda = []
        elif re.match(r"^#{1,4}\s", line):
            current = None  # a chapter/section heading or the title: not part of an article
        elif current is not None:
            current["body"].append(line)
    if not chunks:
        raise SystemExit(f"retrieval: {source} has no articles (`##### 제N조 (제목)` lines): is it a law file? "
                         "Move a guideline to guidelines/ or fix its headings.")
    out = []
    for a in chunks:
        body = "\n".join(a["body"]).strip()
        if SKIP_DELETED and (not body or DELETED_RE.match(body)):
            continue
        out += make_chunks(law, kind, source, a["article"], a["title"], body, spans_fn)
    if addenda:
        out += addenda_chunks(law, kind, source, addenda, spans_fn)
    return out


def unwrap_pdf_lines(lines):
    """Join the hard-wrapped lines of PDF text: a long line not ending a sentence continues on the next line
    unless that one starts an item (①, 1., 가., 제N조, 부칙, 별표)."""
    out = []
    for line in lines:
        line = BOX_RE.sub(" ", line).rstrip()
        stripped = line.strip()
        if not stripped:
            out.append("")
            continue
        if (out and out[-1] and len(out[-1]) >= PDF_WRAP_MIN and not ITEM_START_RE.match(stripped)
                and not re.search(r"[.다]$", out[-1].rstrip())):
            out[-1] = out[-1].rstrip() + stripped
        else:
            out.append(stripped)
    return out


def guideline_identity(text, path):
    """Display name: the first text line that is not a `# source:` note, without leading #."""
    for line in text.split("\n"):
        line = line.strip().lstrip("#").strip()
        if line and not line.lower().startswith("source:"):
            return re.sub(r"\s+", " ", line)
    return Path(path).stem.split("__")[0]


def chunk_guideline(text, source, spans_fn, name=None):
    """Chunks of an administrative rule: one per article `제N조(제목)`, per 별표 and per 부칙 (policy ADDENDA);
    chapter headings end the article above them. A text with neither articles nor headings is cut into windows
    of its paragraphs. The preamble (title, dates, contacts) before the first heading or article is dropped."""
    name = name or guideline_identity(text, source)
    raw = [line for line in text.split("\n") if not re.match(r"^\s*#\s*source:", line, flags=re.I)]
    lines = unwrap_pdf_lines(raw) if source.endswith(".txt") else [BOX_RE.sub(" ", x).rstrip() for x in raw]
    segments, current, addenda, in_addenda = [], None, [], False
    for line in lines:
        art, head = GUIDE_ARTICLE_RE.match(line), GUIDE_HEADING_RE.match(line)
        if in_addenda and not (head and "별표" in line):
            addenda.append(line)
            continue
        if art:
            current = dict(article=article_label(art.group(1), art.group(2)), title=art.group(3).strip(),
                           body=[line[art.end():]])
            segments.append(current)
        elif head and re.match(r"^\s*(?:#+\s*)?부\s*칙", line):
            addenda, in_addenda, current = addenda + [line], True, None
        elif head and "별표" in line and current and current["article"] == "별표" and not "".join(current["body"]):
            continue  # "## [별표 0001] 제목" followed by "[별표 1]": one 별표, the first line's title
        elif head and "별표" in line:
            in_addenda = False
            current = dict(article="별표", title=re.sub(r"^[#\s]+", "", line).strip(), body=[])
            segments.append(current)
        elif head:
            current = None
        elif current is not None:
            current["body"].append(line)
    kind = "행정규칙"
    if not segments and not addenda:
        paragraphs = "\n".join(line for line in lines if line.strip())
        return make_chunks(name, kind, source, "", "", paragraphs, spans_fn)
    out = []
    for s in segments:
        out += make_chunks(name, kind, source, s["article"], s["title"], "\n".join(s["body"]), spans_fn)
    if addenda:
        out += addenda_chunks(name, kind, source, addenda, spans_fn)
    return out


def corpus_files(corpus_dir, parts):
    """The corpus files per part; an empty or missing part is an error naming the folder."""
    files = []
    for part in parts:
        folder = Path(corpus_dir) / part
        found = sorted(p for p in folder.glob("*") if p.suffix in common.CORPUS_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise SystemExit(f"retrieval: corpus folder {folder} is missing or has no .md/.txt files: run `make data`, or "
                             f"remove {part!r} from CORPUS_PARTS in retrieval.py.")
        files += [(part, p) for p in found]
    return files


def chunk_corpus(corpus_dir, parts, spans_fn):
    """All chunks of the corpus parts, numbered in order; law parts need `##### 제N조` articles."""
    chunks = []
    for part, path in corpus_files(corpus_dir, parts):
        source = f"{part}/{path.name}"
        text = read_text(path)
        if not text.strip():
            raise SystemExit(f"retrieval: {path} is empty: remove it or restore its text.")
        if part.startswith("laws"):
            fields, body = split_front_matter(text)
            chunks += chunk_law(body, source, spans_fn, law_identity(path, fields))
        else:
            chunks += chunk_guideline(text, source, spans_fn)
    for i, c in enumerate(chunks):
        c.id = i
    return chunks


def tokenizer_spans(tokenizer):
    """Token span function of a fast tokenizer: text -> [(start, end)] character offsets."""
    def spans(text):
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return spans


# ----------------------------------------------------------------------------- BM25
def make_kiwi():
    from kiwipiepy import Kiwi

    return Kiwi()  # default worker count: lists of texts are analysed in parallel


def morphemes(kiwi, texts, progress=False):
    """BM25 tokens per text: kiwipiepy morphemes whose tag starts with one of KEEP_POS, lower-cased."""
    texts, out = list(texts), []
    for tokens in tqdm(kiwi.tokenize(texts), total=len(texts), desc="morphemes", unit="chunk", disable=not progress):
        out.append([t.form.lower() for t in tokens if t.tag.startswith(KEEP_POS)])
    return out


class BM25:
    """BM25 over pre-tokenised documents; scores(query_tokens) -> one score per document (numpy)."""

    def __init__(self, corpus_tokens, backend=BM25_BACKEND, k1=BM25_K1, b=BM25_B):
        self.backend, self.n = backend, len(corpus_tokens)
        if backend == "rank_bm25":
            from rank_bm25 import BM25Okapi

            self.model = BM25Okapi(corpus_tokens, k1=k1, b=b)
        elif backend == "bm25s":
            import bm25s

            self.model = bm25s.BM25(k1=k1, b=b, method="lucene")
            self.model.index(corpus_tokens, show_progress=False)
        else:
            raise SystemExit(f"retrieval: unknown BM25_BACKEND {backend!r}: use rank_bm25 or bm25s.")

    def scores(self, query_tokens):
        if not query_tokens:
            return np.zeros(self.n, dtype=np.float32)
        if self.backend == "rank_bm25":
            return np.asarray(self.model.get_scores(query_tokens), dtype=np.float32)
        known = [t for t in query_tokens if t in self.model.vocab_dict]
        return np.asarray(self.model.get_scores(known), dtype=np.float32) if known else np.zeros(self.n, np.float32)


# ----------------------------------------------------------------------------- dense
def encoder_fingerprint(model_id, dtype):
    """Changes when the encoder weights (the converted model's meta.json, else its id), the embedding recipe or
    the dtype change; not with the checkout's location, so a clone can reuse a copied cache."""
    return "\n".join([lm.model_fingerprint(model_id), EMBED_TEMPLATE, str(dtype)])


def embed_text(tokenizer, text):
    """The part of text that is embedded: its first EMBED_MAX_TOKENS tokens (cut at a token edge), fewer when the
    model's context is shorter."""
    prefix, suffix = EMBED_TEMPLATE.split("{text}")
    frame = len(tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"])
    limit = max(1, min(EMBED_MAX_TOKENS, tokenizer.model_max_length - frame - 2))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[:enc["offset_mapping"][limit - 1][1]] if len(enc["input_ids"]) > limit else text


def embed_inputs(tokenizer, texts):
    """Token ids of EMBED_TEMPLATE around each (cut) text."""
    prefix, suffix = EMBED_TEMPLATE.split("{text}")
    return [tokenizer(prefix + embed_text(tokenizer, t) + suffix, add_special_tokens=False)["input_ids"]
            for t in texts]


def embed(model, tokenizer, texts, batch_size=EMBED_BATCH, progress=False):
    """{variant: float32 array (len(texts), hidden), L2-normalised} for every pooling@layer in DENSE_VARIANTS.

    One forward pass gives all four: the last token's state (PromptEOL) and the mean over all tokens, each at the
    last layer (after the final norm) and at the middle layer. With EMBED_DEPTH "mid" the forward stops one layer
    after the middle one (so the middle state is the same un-normalised one) and the @last variants are zeros.
    Right padding, built here, so the caller's tokenizer settings are untouched.
    """
    base = model.base_model
    mid = (model.config.num_hidden_layers + 1) // 2  # index into hidden_states (0 = embeddings)
    all_layers = getattr(base, "layers", None)
    truncate = EMBED_DEPTH == "mid" and all_layers is not None and mid + 1 < len(all_layers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = embed_inputs(tokenizer, texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = {v: [None] * len(ids) for v in DENSE_VARIANTS}
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch])
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch])
        try:
            if truncate:
                base.layers = all_layers[:mid + 1]
            with torch.no_grad():
                hidden = base(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                              output_hidden_states=True, use_cache=False).hidden_states
        finally:
            if truncate:
                base.layers = all_layers
        layers = {"last": hidden[-1].float().cpu() * (0.0 if truncate else 1.0), "mid": hidden[mid].float().cpu()}
        lengths = mask.sum(1)
        for layer, h in layers.items():
            last = h[torch.arange(len(batch)), lengths - 1]
            mean = (h * mask[..., None]).sum(1) / lengths[:, None]
            for pooling, vec in (("last_token", last), ("mean", mean)):
                vec = torch.nn.functional.normalize(vec, dim=-1).numpy()
                for row, i in enumerate(batch):
                    out[f"{pooling}@{layer}"][i] = vec[row]
    return {v: np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
            for v, rows in out.items()}


def chunk_hash(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def embedding_key(tokenizer, text):
    """Cache key of a text's embedding: the hash of what is actually embedded (the cut text)."""
    return chunk_hash(embed_text(tokenizer, text))


def load_cache(path, fingerprint):
    """{chunk hash: {variant: vector}} from emb_cache.npz when it was made by the same encoder recipe."""
    if not Path(path).exists():
        return {}
    data = np.load(path, allow_pickle=False)
    if str(data["fingerprint"]) != hashlib.sha256(fingerprint.encode()).hexdigest():
        return {}
    hashes = [str(h) for h in data["hashes"]]
    # Each data[v] reads the whole array again, and a row of it keeps that copy alive: read each once, copy rows.
    arrays = {v: data[v] for v in DENSE_VARIANTS}
    return {h: {v: arrays[v][i].copy() for v in DENSE_VARIANTS} for i, h in enumerate(hashes)}


def save_cache(path, fingerprint, cache):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    hashes = sorted(cache)
    arrays = {v: np.stack([cache[h][v] for h in hashes]) for v in DENSE_VARIANTS} if hashes else {}
    np.savez(tmp, fingerprint=hashlib.sha256(fingerprint.encode()).hexdigest(), hashes=np.array(hashes), **arrays)
    os.replace(tmp, path)


def embed_chunks(model, tokenizer, texts, cache_path, fingerprint):
    """{variant: matrix} for the chunk texts, embedding only those missing from the cache (saved as it goes)."""
    cache = load_cache(cache_path, fingerprint)
    keys = [embedding_key(tokenizer, t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items(), key=lambda x: len(x[1]))
    print(f"retrieval: {len(texts) - len(missing)} chunk embeddings from the cache, {len(missing)} to compute")
    step = EMBED_BATCH * EMBED_SAVE_EVERY
    with tqdm(total=len(missing), desc="embedding", unit="chunk") as bar:
        for s in range(0, len(missing), step):
            part = missing[s:s + step]
            vectors = embed(model, tokenizer, [t for _, t in part])
            for row, (h, _) in enumerate(part):
                cache[h] = {v: vectors[v][row] for v in DENSE_VARIANTS}
            save_cache(cache_path, fingerprint, cache)
            bar.update(len(part))
    return {v: np.stack([cache[k][v] for k in keys]) for v in DENSE_VARIANTS}


def flat_index(vectors):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


# ----------------------------------------------------------------------------- fusion
def top_k(scores, k):
    """Indices of the k highest scores, best first (ties by index); zero and negative scores dropped."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    idx = np.argpartition(-scores, k - 1)[:k]
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return [int(i) for i in idx if scores[i] > 0]


def rrf(rankings, k=RRF_K):
    """Reciprocal rank fusion: {doc: sum over rankings of 1 / (k + rank)}, rank 1-based (Cormack et al. 2009)."""
    fused = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, 1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return fused


def weighted(score_lists, weights):
    """sum_i w_i * minmax(score_i) over the union of candidates; a candidate missing from a list gets 0 there."""
    fused = {}
    for scores, w in zip(score_lists, weights):
        if not scores:
            continue
        lo, hi = min(scores.values()), max(scores.values())
        for doc, s in scores.items():
            fused[doc] = fused.get(doc, 0.0) + w * ((s - lo) / (hi - lo) if hi > lo else 1.0)
    return fused


def ranked(fused, k):
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]


# ----------------------------------------------------------------------------- the index object
class Index:
    """Chunks + BM25 + dense vectors. Dense and fused search need an encoder: attach_encoder(model, tokenizer)."""

    def __init__(self, chunks, corpus_tokens, vectors=None, meta=None, backend=BM25_BACKEND, kiwi=None):
        self.chunks, self.meta = chunks, meta or {}
        self.kiwi = kiwi or make_kiwi()
        self.bm25 = BM25(corpus_tokens, backend)
        self.vectors = vectors
        self.faiss = flat_index(vectors) if vectors is not None and len(vectors) else None
        self.model = self.tokenizer = None
        self.fusion, self.weight_bm25, self.candidates = FUSION, FUSION_WEIGHT_BM25, CANDIDATES

    def attach_encoder(self, model, tokenizer):
        """Use an already-loaded model (the answering LLM by default) to embed queries."""
        self.model, self.tokenizer = model, tokenizer
        return self

    def _ensure_encoder(self):
        if self.model is None:
            raise SystemExit("retrieval: dense search needs the encoder: call index.attach_encoder(model, tokenizer) "
                             f"with the model the index was built with ({self.meta.get('encoder', '?')}).")

    def bm25_ranking(self, text, k):
        scores = self.bm25.scores(morphemes(self.kiwi, [text])[0])
        return [(i, float(scores[i])) for i in top_k(scores, k)]

    def dense_ranking(self, vector, k):
        if self.faiss is None:
            return []
        scores, idx = self.faiss.search(np.asarray(vector, np.float32)[None, :], min(k, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]

    def query_vectors(self, texts, variant=None):
        self._ensure_encoder()
        return embed(self.model, self.tokenizer, texts)[variant or self.meta.get("dense_variant", DENSE_VARIANT)]

    def fuse(self, bm25_hits, dense_hits, k, fusion=None):
        fusion = fusion or self.fusion
        if fusion == "rrf":
            fused = rrf([[i for i, _ in bm25_hits], [i for i, _ in dense_hits]])
        elif fusion == "weighted":
            fused = weighted([dict(bm25_hits), dict(dense_hits)], [self.weight_bm25, 1 - self.weight_bm25])
        else:
            raise SystemExit(f"retrieval: unknown FUSION {fusion!r}: use rrf or weighted.")
        return ranked(fused, k)

    def search_with_vector(self, text, vector, k, method=None):
        """Search given a precomputed query vector (None for bm25): [(Chunk, score)] best first."""
        method = method or SEARCH_METHOD
        if method == "bm25":
            hits = self.bm25_ranking(text, k)
        elif method == "dense":
            hits = self.dense_ranking(vector, k)
        elif method == "fused":
            n = max(k, self.candidates)
            hits = self.fuse(self.bm25_ranking(text, n), self.dense_ranking(vector, n), k)
        else:
            raise SystemExit(f"retrieval: unknown search method {method!r}: use bm25, dense or fused.")
        return [(self.chunks[i], s) for i, s in hits]

    def search_many(self, texts, k=5, method=None):
        """Search for each text (SEARCH_METHOD unless method is given); the dense query vectors are computed in
        batches. [] for a text with no hit."""
        method = method or SEARCH_METHOD
        vectors = self.query_vectors(texts) if method != "bm25" else [None] * len(texts)
        return [self.search_with_vector(t, v, k, method) for t, v in zip(texts, vectors)]

    def search(self, text, k=5, method=None):
        return self.search_many([text], k, method)[0]


def read_chunks(path):
    """The chunks of an index folder's chunks.jsonl, in index order."""
    with open(Path(path) / "chunks.jsonl", encoding="utf-8") as f:
        return [Chunk(**json.loads(line)) for line in f if line.strip()]


def load_index(path=None, backend=None):
    """The index built by `make index` (outputs/02_index unless path is given)."""
    path = Path(path or common.INDEX)
    if not (path / "DONE").exists():
        raise SystemExit(f"retrieval: no finished index at {path}: run `make index`.")
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    chunks = read_chunks(path)
    tokens = json.loads((path / "bm25_tokens.json").read_text(encoding="utf-8"))
    vectors = None
    if (path / "dense.faiss").exists():
        import faiss

        index = faiss.read_index(str(path / "dense.faiss"))
        vectors = index.reconstruct_n(0, index.ntotal)
    return Index(chunks, tokens, vectors, meta, backend or meta["settings"]["BM25_BACKEND"])


def bm25_signals(index, texts):
    """How sure the first stage looks, per text: its top BM25 score over the index ("top"), minus the second
    ("margin"), over the second ("ratio"), and per query morpheme ("per_token"); reports/gate.md compares them."""
    out = []
    for toks in morphemes(index.kiwi, texts):
        top = np.sort(index.bm25.scores(toks))[::-1][:2]
        first, second = float(top[0]), float(top[1]) if len(top) > 1 else 0.0
        ratio = first / second if second > 0 else float("inf") if first > 0 else 0.0  # no hit at all: least sure
        out.append(dict(top=first, margin=first - second, ratio=ratio, per_token=first / max(len(toks), 1)))
    return out


def format_context(hits, tokenizer, max_passages=3, max_tokens=768):
    """Numbered passages for a prompt, at most max_passages and max_tokens tokens in all (the last one cut at a
    token edge). "" when nothing was retrieved, so a question with no hit is still answered without context."""
    blocks, budget = [], max_tokens
    for n, (chunk, _) in enumerate(hits[:max_passages], 1):
        text = f"[{n}] {chunk.text}"
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if budget <= 0:
            break
        if len(offsets) > budget:
            text = text[:offsets[budget - 1][1]]
        blocks.append(text)
        budget -= len(offsets)
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- reranking
def single_token(tokenizer, word):
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise SystemExit(f"retrieval: {word!r} is {len(ids)} tokens in this tokenizer: choose single-token labels.")
    return ids[0]


def cut(tokenizer, text, max_tokens):
    """The text cut at the character edge of its max_tokens-th token (whole text when shorter). Re-tokenized, the cut
    text can be one token longer where a byte-level token ends inside a character."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_tokens else text[:offsets[max_tokens - 1][1]]


def pointwise_prompt(tokenizer, question, passage):
    """The chat prompt that asks whether the passage answers the question (Yes/No): the same text up to the passage
    for every passage of a question."""
    content = f"{RERANK_POINTWISE_INSTRUCTION}\n\n질문: {question.strip()}\n\n문서: {passage}"
    return lm.render(tokenizer, [{"role": "system", "content": common.SYSTEM_PROMPT},
                                 {"role": "user", "content": content}])


def pointwise_scores(model, tokenizer, question, passages, stats=None):
    """log p(Yes) - log p(No) per passage. The question's prompts differ from the passage on: the first is read whole,
    every other only from there, on the first's key/value cache (lm.shared_prefix_logprobs)."""
    yes, no = single_token(tokenizer, YES), single_token(tokenizer, NO)
    prompts = [pointwise_prompt(tokenizer, question, p) for p in passages]
    stat = {}
    [logprobs] = lm.shared_prefix_logprobs(model, tokenizer, [prompts], [yes, no], stats=stat)
    if stats is not None:  # tokens run through the model: the question's part once
        stats["tokens"] = stats.get("tokens", 0) + stat.get("prefill_tokens", 0)
    return [lp_yes - lp_no for lp_yes, lp_no in logprobs]


@torch.no_grad()
def listwise_scores(model, tokenizer, question, passages, stats=None):
    """FIRST (Reddy et al. 2024): first-token logits over the passage labels, one forward pass per window."""
    if len(passages) > len(LABELS):
        raise SystemExit(f"retrieval: listwise handles at most {len(LABELS)} candidates (RERANK_CANDIDATES={len(passages)}).")
    labels = [single_token(tokenizer, LABELS[i]) for i in range(len(passages))]
    listing = "\n\n".join(f"[{LABELS[i]}] {p}" for i, p in enumerate(passages))
    content = f"{RERANK_LISTWISE_INSTRUCTION}\n\n질문: {question.strip()}\n\n{listing}"
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


def blend(llm_scores, first_scores, weight=RERANK_BLEND):
    """Order of candidates by weight * z(LLM) + (1 - weight) * z(first stage); stable for ties."""
    if len(llm_scores) < 2:
        return list(range(len(llm_scores)))
    final = [weight * a + (1 - weight) * b for a, b in zip(zscores(llm_scores), zscores(first_scores))]
    return sorted(range(len(final)), key=lambda i: -final[i])


def rerank_question(model, tokenizer, question, hits, mode=RERANK_MODE, stats=None):
    """Candidate order for one question: indices into hits, best first; first-stage order on any failure."""
    if len(hits) < 2:
        return list(range(len(hits))), None, False
    passages = [cut(tokenizer, chunk.text, RERANK_PASSAGE_TOKENS) for chunk, _ in hits]
    try:
        if mode == "pointwise":
            scores = pointwise_scores(model, tokenizer, question, passages, stats=stats)
        elif mode == "listwise":
            scores = listwise_scores(model, tokenizer, question, passages, stats=stats)
        else:
            raise SystemExit(f"retrieval: unknown RERANK_MODE {mode!r}: use pointwise or listwise.")
    except (RuntimeError, ValueError, IndexError) as e:  # a failing question must not end the run (issue 4)
        log.warning("retrieval: reranking failed (%s): first-stage order kept", e)
        return list(range(len(hits))), None, True
    return blend(scores, [s for _, s in hits]), scores, False


# ----------------------------------------------------------------------------- writing an index
def write_index(out, chunks, tokens, vectors):
    """chunks.jsonl, bm25_tokens.json and (unless vectors is None) dense.faiss into out, each atomically (meta.json
    and DONE are the caller's, written after)."""
    import faiss

    common.write_text(out / "chunks.jsonl", "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in chunks))
    common.write_text(out / "bm25_tokens.json", json.dumps(tokens, ensure_ascii=False))
    if vectors is None:  # a BM25-only index (02 with SEARCH_METHOD "bm25")
        (out / "dense.faiss").unlink(missing_ok=True)
        return
    tmp = out / "dense.faiss.tmp"
    faiss.write_index(flat_index(vectors), str(tmp))
    os.replace(tmp, out / "dense.faiss")


def corpus_fingerprint(corpus_dir, parts):
    h = hashlib.sha256()
    for part, path in corpus_files(corpus_dir, parts):
        h.update(f"{part}/{path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def index_settings():
    """The settings an index is built with (all but the reranker's): written into the index's meta.json."""
    return {k: v for k, v in common.settings_of(sys.modules[__name__]).items() if not k.startswith("RERANK_")}


def index_fingerprint(index_dir=None):
    """Short hash of what an index holds (settings, corpus, dense variant), not of its build timings."""
    meta = json.loads((Path(index_dir or common.INDEX) / "meta.json").read_text(encoding="utf-8"))
    built = {k: meta.get(k) for k in ("settings", "corpus", "dense_variant")}
    return hashlib.sha256(json.dumps(built, sort_keys=True).encode("utf-8")).hexdigest()[:12]
