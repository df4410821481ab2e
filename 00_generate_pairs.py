"""Generate training prompts from the corpus, then answer each with teacher and student.

Reads data/corpus/{laws,guidelines}/ (`make data`; chunked by retrieval.chunk_corpus, the index's legal-structure
chunker) and both models (the student first, then the teacher where lm.load_teacher places it: on a GPU at the
most precise level that fits beside the student and this stage's working memory, working_memory_bytes). Never
reads the development or the competition questions: prompts come from the corpus only (the rules disqualify
training on the test).
Per sampled chunk one question of each kind in KINDS (multiple choice in the competition's layout with 4 or 5
options, shuffled so the key position carries no bias; descriptive) is written, by the teacher (WRITER
"teacher", multiple choice within mc_write_cap tokens) or from the corpus structure (WRITER "template": "which
statement is in 제N조", "which is not", "its title", with sentences of other articles of the same law as
distractors, so the key is exact and no generation is spent); malformed and duplicate ones are dropped. Teacher and
student then answer every kept prompt under the same conditions (same prompt, with the source passage as context
for a CONTEXT_RATE share; same sampling settings); multiple-choice pairs whose key is not the teacher's most likely
option are dropped (KEEP_TEACHER_WRONG).
Writes outputs/00_pairs/: pairs.jsonl ({id, kind, prompt (chat messages), prefix, chosen = teacher answer,
rejected = student answer, source, writer, settings}), attempts.jsonl (every chunk and kind tried, with the reason
a question was dropped), timings.jsonl (seconds and answers per batch and kind), heldout.csv and heldout-keys.csv
(template questions on articles no pair asks about, with their keys: the distilled students' in-distribution
check), meta.json (with host and GPU peak memory) and DONE. The JSONL files are appended batch by batch: a killed
run resumes where it stopped.
Run by `make pairs`.
"""
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import competition
import gpu_memory
import lm
import retrieval

# ----------------------------------------------------------------------------- settings
N_CHUNKS = dict(cpu=320, cuda=2500)  # corpus chunks to write questions from, per device (one question per kind)
WRITER = dict(cpu="template", cuda="teacher")  # "teacher" | "template" (the 1.5B teacher kept 1 of 8 MC: notes)
KEEP_TEACHER_WRONG = False  # keep MC pairs whose key is not the teacher's most likely option
KINDS = dict(cpu=("mc",), cuda=("mc", "desc"))  # one question of each kind per chunk, per device: on the CPU the
# gap is in multiple choice (teacher 0.653 vs student 0.402; descriptive 0.412 vs 0.398, reports/baseline.md) and a
# descriptive pair costs ~3x an MC one (96 generated tokens per model; reports/distill.md)
OPTION_COUNTS = (4, 5)  # the competition's multiple-choice layouts
MIN_CHUNK_CHARS = 150  # shorter chunks (one-line articles, deleted ones) make poor questions
PASSAGE_MAX_TOKENS = 320  # passage tokens shown to the question writer
CONTEXT_RATE = 0.0  # share of prompts answered with the source passage in the prompt (same for both models);
# 0 while 04_infer.RAG_PASSAGES is 0 (training prompts as at inference); 0.5 for teams that answer with passages
CONTEXT_MAX_TOKENS = 96  # passage tokens in an answering prompt (keeps training sequences short on the CPU)
WRITE_TEMPERATURE, WRITE_TOP_P = 0.7, 0.9  # teacher sampling when writing questions
WRITE_MAX_NEW_TOKENS = {"desc": 64}  # multiple choice: mc_write_cap, the longest question the template writer can
# build from the corpus (714 tokens here), so a 5-option Korean question is never cut (a fixed 200 cut more than
# half: 1,711 five-option template questions are 295 tokens at the median, 516 at most, Qwen2.5 tokenizer)
WRITE_MC_MARGIN = 32  # tokens of the multiple-choice cap beyond that longest question (a teacher's wording varies)
ANSWER_TEMPERATURE, ANSWER_TOP_P = 0.7, 0.9  # teacher and student sampling when answering (same settings)
ANSWER_MAX_NEW_TOKENS = 96  # descriptive answers: two or three sentences
BATCH = dict(cpu=8, cuda=16)  # chunks per batch (question writing, answering, one checkpoint append), per device
HELDOUT_CHUNKS = 400  # template MC questions from chunks no pair was written from: the distilled students'
# in-distribution check (reports/distill.md); templates on every device, so no model and no generation
# -----------------------------------------------------------------------------

MC_WRITER = ("아래 조문의 내용만 근거로 금융보안 시험용 객관식 문제 1개를 한국어로 만드세요. 보기는 정확히 {n}개, "
             "정답은 하나입니다. 설명 없이 아래 형식만 출력하세요.\n\n문제: <질문>\n{option_lines}정답: <번호>\n\n"
             "조문:\n{passage}")
DESC_WRITER = ("아래 조문의 내용만 근거로 2~3문장으로 답할 수 있는 서술형 문제 1개를 한국어로 만드세요. 설명 없이 "
               "아래 형식만 출력하세요.\n\n문제: <질문>\n\n조문:\n{passage}")
WRITTEN_OPTION_RE = re.compile(r"^\s*[(\[]?([1-9])\s*[.)\]]?\s+(\S.*?)\s*$")
KEY_RE = re.compile(r"정답\s*[:：]?\s*[(\[]?([1-9])")
HANGUL_RE = re.compile(r"[가-힣]")
TEMPLATE_STEMS = {  # multiple-choice stems of the template writer; {where} = 「법령」 제N조(제목)
    "in": "다음 중 {where}에 규정된 내용으로 옳은 것은?",
    "not_in": "다음 중 {where}에 규정된 내용이 아닌 것은?",
    "title": "다음 중 {where}의 제목으로 옳은 것은?",
}
TEMPLATE_DESC = "{where}에서 규정하는 내용을 설명하세요."
SENTENCE_CHARS = (25, 160)  # template options: whole sentences of an article within this length
NOISE_RE = re.compile(r"<(?:개정|신설|제목개정|전문개정)[^>]*>|\[(?:본조신설|전문개정|제목개정|시행일)[^\]]*\]|\\")
ITEM_RE = re.compile(r"^[\s*]*(?:[①-⑳]|\d+\.|[가-하]\.)[\s*]*")
DANGLING_RE = re.compile(r"^(?:다만|이 경우|이때|단,|그 밖에|또한)")  # sentences that need the one before them


# ----------------------------------------------------------------------------- corpus chunks
def chunk_id(text):
    """Stable id of a chunk: its content hash (independent of how many chunks come before it)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def load_chunks(tokenizer, corpus=common.CORPUS, parts=None):
    """Corpus chunks [{id, source, law, kind, article, title, text}] of the retriever's chunker (retrieval.py)."""
    raw = retrieval.chunk_corpus(corpus, parts or retrieval.CORPUS_PARTS, retrieval.tokenizer_spans(tokenizer))
    if not raw:
        raise SystemExit(f"00: no chunks in {corpus}: run `make data`.")
    return [dict(source=c.source, law=c.law, kind=c.kind, article=c.article, title=c.title, text=c.text,
                 id=chunk_id(c.text)) for c in raw]


def pick_chunks(chunks, n, seed=common.SEED):
    """The first n chunks of a fixed shuffle of those long enough and not 부칙 (addenda are dates, not rules)."""
    usable = [c for c in chunks if len(c["text"]) >= MIN_CHUNK_CHARS and "부칙" not in c["text"].split("\n")[0]]
    usable = sorted({c["id"]: c for c in usable}.values(), key=lambda c: c["id"])
    random.Random(seed).shuffle(usable)  # a fixed order: a larger n extends a smaller n's selection
    return usable[:n]


def clip_tokens(tokenizer, text, max_tokens):
    """The first max_tokens tokens of text (whole text when shorter)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).rstrip() + " …"


# ----------------------------------------------------------------------------- template questions
def where(chunk):
    """「법령 시행령」 제N조(제목) of a chunk, for template stems."""
    name = chunk.get("law") or Path(chunk["source"]).stem.split("__")[0]
    kind = chunk.get("kind", "")
    name += f" {kind}" if kind in ("시행령", "시행규칙") and not name.endswith(kind) else ""
    article, title = chunk.get("article", ""), chunk.get("title", "")
    if article and article not in ("부칙", "별표"):
        return f"「{name}」 {article}" + (f"({title})" if title else "")
    return f"「{name}」의 '{title}'" if title else f"「{name}」"


def sentences(chunk):
    """Whole sentences of a chunk body (header line, amendment notes and item numbers removed) of usable length."""
    out = []
    for line in chunk["text"].split("\n")[1:]:
        line = ITEM_RE.sub("", NOISE_RE.sub("", line)).strip()
        for sent in re.split(r"(?<=다\.)\s+", line):
            sent = sent.strip()
            if (SENTENCE_CHARS[0] <= len(sent) <= SENTENCE_CHARS[1] and sent.endswith("다.") and "삭제" not in sent
                    and not DANGLING_RE.match(sent) and sent.count("(") == sent.count(")")
                    and sent.count("「") == sent.count("」")):
                out.append(sent)
    return list(dict.fromkeys(out))


def template_pool(chunks):
    """Per law file: its chunks' sentences and titles, the distractor pool of template questions."""
    pool = {}
    for c in chunks:
        if c.get("article") == "부칙":
            continue  # addenda amend other laws: their sentences would be distractors from elsewhere
        entry = pool.setdefault(c["source"], dict(sentences=[], titles=[]))
        entry["sentences"] += [(c["id"], x) for x in sentences(c)]
        if c.get("title") and c.get("article", "").startswith("제"):
            entry["titles"].append((c["id"], c["title"]))
    return pool


def template_question(job, pool, rng):
    """Raw question text in the teacher writer's output format ("문제: …", "N 보기", "정답: k") built from the chunk
    and other chunks of the same law file: a statement in the article or one not in it, else the article's title.
    Returns "" when the file has too few distinct sentences or titles for the asked option count."""
    chunk, n = job["chunk"], job["n_options"]
    place = where(chunk)
    if job["kind"] == "desc":
        return f"문제: {TEMPLATE_DESC.format(where=place)}"
    own = sentences(chunk)
    entry = pool.get(chunk["source"], dict(sentences=[], titles=[]))
    others = list(dict.fromkeys(x for cid, x in entry["sentences"] if cid != chunk["id"] and x not in own))
    titles = list(dict.fromkeys(t for cid, t in entry["titles"] if cid != chunk["id"] and t != chunk.get("title")))
    kinds = [k for k, ok in (("not_in", len(own) >= n - 1 and others), ("in", own and len(others) >= n - 1)) if ok]
    if not kinds and chunk.get("article", "").startswith("제") and chunk.get("title") and len(titles) >= n - 1:
        kinds = ["title"]  # only when the article has no usable sentence
    if not kinds:
        return ""
    kind = rng.choice(kinds)
    if kind == "not_in":
        right, wrong = rng.choice(others), rng.sample(own, n - 1)
    elif kind == "in":
        right, wrong = rng.choice(own), rng.sample(others, n - 1)
    else:
        right, wrong = chunk["title"], rng.sample(titles, n - 1)
    options = wrong + [right]
    rng.shuffle(options)
    # A title question names the article without its title: in 「법령」 제N조(제목) the stem would hold the answer
    # (it did in 42 of the 119 pairs of the first runs, reports/distill-notes.md).
    stem = TEMPLATE_STEMS[kind].format(where=where(dict(chunk, title="")) if kind == "title" else place)
    return "\n".join([f"문제: {stem}"] + [f"{i} {o}" for i, o in enumerate(options, 1)]
                     + [f"정답: {options.index(right) + 1}"])


def template_questions(jobs, pool, seed):
    """template_question for each job (same signature role as write_questions, no model)."""
    rng = random.Random(seed)
    return {j["id"]: template_question(j, pool, rng) for j in jobs}


# ----------------------------------------------------------------------------- question writing and checking
def writer_messages(kind, passage, n_options):
    if kind == "mc":
        option_lines = "".join(f"{i} <보기>\n" for i in range(1, n_options + 1))
        content = MC_WRITER.format(n=n_options, option_lines=option_lines, passage=passage)
    else:
        content = DESC_WRITER.format(passage=passage)
    return [{"role": "system", "content": common.SYSTEM_PROMPT}, {"role": "user", "content": content}]


def norm_key(text):
    """Duplicate key: letters and digits only, lower case."""
    return re.sub(r"[\W_]+", "", text).lower()


def parse_mc(text, n_options):
    """(stem, options, key) of a written multiple-choice question, or (None, reason) when malformed."""
    lines = [x.strip() for x in text.replace("\r", "").split("\n") if x.strip()]
    stem, options, key = [], [], None
    for line in lines:
        k, opt = KEY_RE.match(line), WRITTEN_OPTION_RE.match(line)
        if k and line.startswith("정답"):
            key = int(k.group(1))
            break
        if opt and int(opt.group(1)) == len(options) + 1:
            options.append(opt.group(2))
        elif not options:
            stem.append(re.sub(r"^\**(문제|질문)\s*\d*\s*[:：.]\**\s*", "", line))
    stem = " ".join(s for s in stem if s).strip()
    if len(options) != n_options:
        return None, f"{len(options)} options instead of {n_options}"
    if key is None or not 1 <= key <= n_options:
        return None, "no answer key"
    if len(stem) < 10 or not HANGUL_RE.search(stem) or "<" in stem:
        return None, "stem too short, not Korean or a template placeholder"
    if any(not o or "<보기>" in o or len(o) > 200 for o in options):
        return None, "empty, placeholder or overlong option"
    if len({norm_key(o) for o in options}) < n_options:
        return None, "repeated options"
    return (stem, options, key), None


def parse_desc(text):
    """The written descriptive question, or (None, reason)."""
    lines = [x.strip() for x in text.replace("\r", "").split("\n") if x.strip()]
    if not lines:
        return None, "empty"
    q = re.sub(r"^\**(문제|질문)\s*\d*\s*[:：.]\**\s*", "", lines[0]).strip()
    if len(q) < 10 or len(q) > 300 or not HANGUL_RE.search(q) or "<" in q:
        return None, "too short, too long, not Korean or a placeholder"
    return q, None


def shuffle_options(options, key, rng):
    """Options in a random order and the new key: the writer's key positions are not uniform."""
    order = list(range(len(options)))
    rng.shuffle(order)
    return [options[i] for i in order], order.index(key - 1) + 1


def mc_question_text(stem, options):
    """The question in the competition's layout: stem, then lines "N option"."""
    return "\n".join([stem] + [f"{i} {o}" for i, o in enumerate(options, 1)])


def question_messages(q, context=""):
    """04_infer.py's prompt of a parsed question, with the passage in the retrieval layout when given, so training
    prompts look like the retrieval-augmented ones at inference."""
    if q.kind == "mc":
        return common.mc_messages(q.stem, q.options, context=context)
    return common.desc_messages(q.text, context=context)


def build_prompt(qid, kind, question, passage, rng):
    """Prompt record of a checked question: chat messages, assistant prefix, whether the passage is shown; None
    when the question is not in the competition's layout or not of the kind asked."""
    try:
        q = competition.parse_question(qid, question)
    except competition.QuestionError:
        return None
    if kind == "mc" and q.kind != "mc":
        return None
    context = rng.random() < CONTEXT_RATE
    return dict(id=qid, kind=kind, question=question, n_options=len(q.options),
                prompt=question_messages(q, passage if context else ""),
                prefix=common.MC_ANSWER_PREFIX if kind == "mc" else "", context=context)


# ----------------------------------------------------------------------------- generation
def seed_of(*parts):
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@torch.no_grad()
def sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed):
    """Sampled continuations (text, special tokens dropped) of rendered prompts, one batch, left padding."""
    if not prompts:
        return []
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return [tokenizer.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def sample_digits(model, tokenizer, prompts, n_options, temperature, seed):
    """Option numbers sampled from the next-token distribution over the option digits after the prefix (the
    position 04_infer.py reads); returns (answers, renormalised option probabilities)."""
    answers, probs = [], []
    gen = torch.Generator().manual_seed(seed)
    token_ids = lm.option_token_ids(tokenizer, max(n_options))
    for logprobs, n in zip(lm.next_token_logprobs(model, tokenizer, prompts, token_ids, max(len(prompts), 1)),
                           n_options):
        lp = torch.tensor(logprobs[:n])
        p = torch.softmax(lp, -1)
        choice = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen)) if temperature > 0 \
            else int(p.argmax())
        answers.append(str(choice + 1))
        probs.append([round(x, 4) for x in p.tolist()])
    return answers, probs


def answer(model, tokenizer, records, seed, seconds=None):
    """Each prompt record answered by one model: MC -> digit, descriptive -> sampled short text. Adds the seconds
    spent per kind to seconds[kind] when given."""
    out, seconds = {}, {} if seconds is None else seconds
    mc = [r for r in records if r["kind"] == "mc"]
    t0 = time.time()
    if mc:
        prompts = [lm.render(tokenizer, r["prompt"], r["prefix"]) for r in mc]
        digits, probs = sample_digits(model, tokenizer, prompts, [r["n_options"] for r in mc], ANSWER_TEMPERATURE,
                                      seed)
        out.update({r["id"]: (d, p) for r, d, p in zip(mc, digits, probs)})
        seconds["mc"] = seconds.get("mc", 0.0) + time.time() - t0
    desc = [r for r in records if r["kind"] == "desc"]
    t0 = time.time()
    if desc:
        prompts = [lm.render(tokenizer, r["prompt"], r["prefix"]) for r in desc]
        texts = sample(model, tokenizer, prompts, ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE, ANSWER_TOP_P, seed)
        out.update({r["id"]: (t, None) for r, t in zip(desc, texts)})
        seconds["desc"] = seconds.get("desc", 0.0) + time.time() - t0
    return out


def write_questions(teacher, tokenizer, jobs, seed, caps):
    """Teacher-written raw text per job (chunk, kind, n_options), one generation batch per kind of at most caps[kind]
    new tokens."""
    texts = {}
    for kind in dict.fromkeys(j["kind"] for j in jobs):
        todo = [j for j in jobs if j["kind"] == kind]
        prompts = [lm.render(tokenizer, writer_messages(kind, j["passage"], j["n_options"])) for j in todo]
        outs = sample(teacher, tokenizer, prompts, caps[kind], WRITE_TEMPERATURE, WRITE_TOP_P, seed)
        texts.update({j["id"]: t for j, t in zip(todo, outs)})
    return texts


def mc_write_cap(tokenizer, chunks):
    """Token cap of the teacher's multiple-choice writing: the longest question the template writer could build from
    these chunks (the longest stem, max(OPTION_COUNTS) times the longest sentence or title as options, the key
    line) plus WRITE_MC_MARGIN. A 5-option Korean question in the competition's layout fits it."""
    pool = template_pool(chunks)
    options = sorted({x for entry in pool.values() for key in ("sentences", "titles") for _, x in entry[key]})
    places = sorted({where(c) for c in chunks})
    if not options or not places:
        raise SystemExit("00: no sentences in the corpus chunks to size the question writer by: run `make data`.")
    longest = max(len(ids) for ids in tokenizer(options, add_special_tokens=False).input_ids)
    place = max(places, key=lambda p: len(tokenizer(p, add_special_tokens=False).input_ids))
    n = max(OPTION_COUNTS)
    frame = "\n".join([f"문제: {max((t.format(where=place) for t in TEMPLATE_STEMS.values()), key=len)}"]
                      + [f"{i} " for i in range(1, n + 1)] + [f"정답: {n}"])
    return len(tokenizer(frame, add_special_tokens=False).input_ids) + n * longest + WRITE_MC_MARGIN


# ----------------------------------------------------------------------------- GPU memory
def prompt_tokens(tokenizer, write_cap):
    """Longest prompts of this stage in tokens: the writer's (instructions and PASSAGE_MAX_TOKENS of passage) and an
    answering one (a question as long as write_cap, and the passage when CONTEXT_RATE > 0)."""
    n = max(OPTION_COUNTS)
    write = lm.render(tokenizer, writer_messages("mc", "", n))
    answer = lm.render(tokenizer, common.mc_messages("", [""] * n), common.MC_ANSWER_PREFIX)
    return dict(write=len(tokenizer(write, add_special_tokens=False).input_ids) + PASSAGE_MAX_TOKENS + 2,
                answer=len(tokenizer(answer, add_special_tokens=False).input_ids) + write_cap
                + (CONTEXT_MAX_TOKENS if CONTEXT_RATE else 0))


def working_memory_bytes(student_config, teacher_config, tokens, write_cap, batch):
    """Bytes 00 needs on a GPU besides the two models' weights (gpu_memory, sampled decoding): the largest of the
    teacher writing a batch of questions and either model answering one."""
    def work(config, prompt, new):
        return (gpu_memory.answering_bytes(config, "bf16", batch, prompt, new, sampled=True)
                - gpu_memory.weight_bytes(config))
    return max(work(teacher_config, tokens["write"], write_cap),
               work(teacher_config, tokens["answer"], ANSWER_MAX_NEW_TOKENS),
               work(student_config, tokens["answer"], ANSWER_MAX_NEW_TOKENS))


# ----------------------------------------------------------------------------- checkpoint
def append_jsonl(path, records):
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


def settings():
    return common.settings_of(sys.modules[__name__], ("_RE", "_WRITER"))


def checked_question(job, raw, rng):
    """(question text, duplicate key, answer key) of a written question, or (None, None, reason) when malformed;
    multiple-choice options are shuffled."""
    if not raw.strip():
        return None, None, "nothing written (template: too few distinct sentences or titles in the law)"
    if job["kind"] == "mc":
        parsed, reason = parse_mc(raw, job["n_options"])
        if not parsed:
            return None, None, reason
        options, key = shuffle_options(parsed[1], parsed[2], rng)
        return mc_question_text(parsed[0], options), norm_key(parsed[0]), key
    question, reason = parse_desc(raw)
    return (question, norm_key(question), None) if question else (None, None, reason)


def pair_stems(pairs):
    """Duplicate keys of the questions of pairs (the stem of a multiple-choice question, a descriptive one whole)."""
    return {norm_key(p["question"].split("\n")[0]) if p["kind"] == "desc" else
            norm_key(competition.split_options(p["question"])[0]) for p in pairs}


def heldout_set(chunks, used, seen, n_chunks, seed=common.SEED):
    """(questions [{ID, Question}], keys [{ID, kind, Answer, domain, chunk_id}]) of template multiple-choice
    questions from the first n_chunks sampled chunks that are not in used (chunk ids a pair was written from), nor
    another window of a used article, and whose stem is not in seen: the same templates, option counts and
    shuffling as the pairs, on articles the training never asked about (their sentences may still be distractors
    there). The domain is the law."""
    pool = template_pool(chunks)
    rng = random.Random(seed_of("heldout", seed))
    asked = {(c["source"], c.get("article")) for c in chunks if c["id"] in used and c.get("article")}
    fresh = [c for c in pick_chunks(chunks, len(chunks), seed)
             if c["id"] not in used and (c["source"], c.get("article")) not in asked][:n_chunks]
    questions, keys, seen = [], [], set(seen)
    for c in fresh:
        job = dict(id=f"{c['id']}-mc", chunk=c, kind="mc", n_options=rng.choice(OPTION_COUNTS))
        question, stem_key, key = checked_question(job, template_question(job, pool, rng), rng)
        if question is None or stem_key in seen:
            continue
        seen.add(stem_key)
        qid = f"HELDOUT_{len(questions):04d}"
        questions.append(dict(ID=qid, Question=question))
        keys.append(dict(ID=qid, kind="mc", Answer=str(key), domain=c.get("law") or Path(c["source"]).stem,
                         chunk_id=c["id"]))
    return questions, keys


def write_heldout(chunks, out_dir, n_chunks):
    """heldout_set over the chunks and pairs of out_dir, written to common.HELDOUT and common.HELDOUT_KEYS."""
    used = {a["id"].rsplit("-", 1)[0] for a in lm.read_jsonl(Path(out_dir) / "attempts.jsonl")}
    questions, keys = heldout_set(chunks, used, pair_stems(lm.read_jsonl(Path(out_dir) / "pairs.jsonl")), n_chunks)
    common.write_csv(common.HELDOUT, ["ID", "Question"], questions)
    common.write_csv(common.HELDOUT_KEYS, ["ID", "kind", "Answer", "domain", "chunk_id"], keys)
    return len(questions)


def top_option(probs):
    """1-based number of the most likely option."""
    return probs.index(max(probs)) + 1


def process_batch(chunks, teacher, student, tokenizer, seen, rng, stats, pool=None, kinds=("mc", "desc"),
                  caps=None):
    """Write (by the teacher within caps {kind: new tokens}, or from the template pool when given), check and answer
    the questions of a batch of chunks; returns (pairs, attempts)."""
    jobs = []
    for c in chunks:
        passage = clip_tokens(tokenizer, c["text"], PASSAGE_MAX_TOKENS)
        for kind in kinds:
            jobs.append(dict(id=f"{c['id']}-{kind}", chunk=c, kind=kind, passage=passage,
                             n_options=rng.choice(OPTION_COUNTS) if kind == "mc" else 0))
    t0 = time.time()
    seed = seed_of("write", jobs[0]["id"])
    raw = template_questions(jobs, pool, seed) if pool is not None else write_questions(teacher, tokenizer, jobs, seed,
                                                                                          caps)
    stats["write_seconds"] += time.time() - t0
    attempts, prompts = [], []
    for j in jobs:
        question, stem_key, key_or_reason = checked_question(j, raw[j["id"]], rng)
        key = key_or_reason if question is not None else None
        record, reason = None, key_or_reason if question is None else None
        if question is not None and stem_key in seen:
            reason = "duplicate"
        elif question is not None:
            context = clip_tokens(tokenizer, j["chunk"]["text"], CONTEXT_MAX_TOKENS)
            record = build_prompt(j["id"], j["kind"], question, context, rng)
            reason = None if record else "does not parse in the competition layout"
        if record:
            seen.add(stem_key)
            record.update(key=key, source=j["chunk"]["source"], chunk_id=j["chunk"]["id"])
            prompts.append(record)
        attempts.append(dict(id=j["id"], kind=j["kind"], kept=record is not None, reason=reason,
                             raw=raw[j["id"]][:600]))
    by_kind = {}
    t0 = time.time()
    teacher_answers = answer(teacher, tokenizer, prompts, seed_of("answer", jobs[0]["id"]), by_kind)
    stats["teacher_answer_seconds"] += time.time() - t0
    t0 = time.time()
    student_answers = answer(student, tokenizer, prompts, seed_of("answer", jobs[0]["id"]), by_kind)
    stats["student_answer_seconds"] += time.time() - t0
    stats["answers"] += len(prompts)
    for kind in ("mc", "desc"):
        stats[f"{kind}_answers"] += sum(r["kind"] == kind for r in prompts)
        stats[f"{kind}_answer_seconds"] += by_kind.get(kind, 0.0)  # both models
    pairs = []
    answer_settings = dict(temperature=ANSWER_TEMPERATURE, top_p=ANSWER_TOP_P, max_new_tokens=ANSWER_MAX_NEW_TOKENS)
    for r in prompts:
        (chosen, t_probs), (rejected, s_probs) = teacher_answers[r["id"]], student_answers[r["id"]]
        if not chosen.strip() or not rejected.strip():
            attempts.append(dict(id=r["id"], kind=r["kind"], kept=False, reason="empty answer", raw=""))
            continue
        if r["kind"] == "mc" and not KEEP_TEACHER_WRONG and top_option(t_probs) != r["key"]:
            attempts.append(dict(id=r["id"], kind=r["kind"], kept=False, raw="", key=r["key"],
                                 teacher_probs=t_probs, student_probs=s_probs,
                                 reason="the teacher's most likely option is not the key"))
            continue
        pairs.append(dict(id=r["id"], kind=r["kind"], prompt=r["prompt"], prefix=r["prefix"], chosen=chosen,
                          rejected=rejected, question=r["question"], key=r["key"], context=r["context"],
                          teacher_probs=t_probs, student_probs=s_probs, source=r["source"], chunk_id=r["chunk_id"],
                          writer="teacher" if pool is None else "template", settings=answer_settings))
    return pairs, attempts


TIMED = ("write_seconds", "teacher_answer_seconds", "student_answer_seconds", "answers", "mc_answers", "desc_answers",
         "mc_answer_seconds", "desc_answer_seconds")  # per-batch counters in timings.jsonl


def run(chunks, teacher, student, tokenizer, out_dir, n_chunks, writer="teacher", kinds=("mc", "desc"), batch=8,
        caps=None):
    """Process the first n_chunks sampled chunks not yet attempted, `batch` chunks at a time, appending to out_dir;
    returns run stats. writer "template" builds the questions from the corpus (all chunks are the distractor pool);
    "teacher" writes them within caps ({kind: new tokens}, mc_write_cap for multiple choice)."""
    if writer not in ("teacher", "template"):
        raise SystemExit(f"00: WRITER {writer!r} is not 'teacher' or 'template': fix the setting at the top.")
    pool = template_pool(chunks) if writer == "template" else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_path, attempts_path = out_dir / "pairs.jsonl", out_dir / "attempts.jsonl"
    lm.drop_torn_tail(pairs_path)
    lm.drop_torn_tail(attempts_path)
    done_chunks = {a["id"].rsplit("-", 1)[0] for a in lm.read_jsonl(attempts_path)}
    existing = lm.read_jsonl(pairs_path)
    seen = pair_stems(existing)
    have = {p["id"] for p in existing}
    todo = [c for c in pick_chunks(chunks, n_chunks) if c["id"] not in done_chunks]
    stats = dict(write_seconds=0.0, teacher_answer_seconds=0.0, student_answer_seconds=0.0, answers=0,
                 mc_answers=0, desc_answers=0, mc_answer_seconds=0.0, desc_answer_seconds=0.0,
                 chunks_done_before=len(done_chunks), chunks_now=len(todo), writer=writer, kinds=list(kinds))
    rng = random.Random(seed_of("options", len(done_chunks)))
    for start in tqdm(range(0, len(todo), batch), desc="00 pairs", unit="batch"):
        before = dict(stats)
        pairs, attempts = process_batch(todo[start:start + batch], teacher, student, tokenizer, seen, rng, stats,
                                        pool, kinds, caps)
        append_jsonl(pairs_path, [p for p in pairs if p["id"] not in have])  # pairs first, then the attempt log
        have |= {p["id"] for p in pairs}
        append_jsonl(attempts_path, attempts)
        timing = {k: round(stats[k] - before[k], 2) for k in TIMED}
        append_jsonl(out_dir / "timings.jsonl", [dict(timing, chunks=len(todo[start:start + batch]),
                                                      questions=len(todo[start:start + batch]) * len(kinds))])
    return stats


def summary(out_dir, stats, seconds):
    """meta.json content: counts over the whole file (all runs), throughput of this run."""
    pairs, attempts = lm.read_jsonl(Path(out_dir) / "pairs.jsonl"), lm.read_jsonl(Path(out_dir) / "attempts.jsonl")
    reasons = {}
    for a in attempts:
        if not a["kept"]:
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    timings = lm.read_jsonl(Path(out_dir) / "timings.jsonl")  # per batch, over every run (resumed runs too)
    total = {k: sum(t.get(k, 0) for t in timings) for k in TIMED + ("chunks", "questions")}
    answer_seconds = total["teacher_answer_seconds"] + total["student_answer_seconds"]
    mc = [p for p in pairs if p["kind"] == "mc"]
    answered = mc + [a for a in attempts if a.get("teacher_probs")]  # every MC both models answered, kept or not
    top1 = {who: round(sum(top_option(x[f"{who}_probs"]) == x["key"] for x in answered) / len(answered), 3)
            if answered else None for who in ("teacher", "student")}
    return dict(pairs=len(pairs), mc_pairs=len(mc), desc_pairs=len(pairs) - len(mc),
                attempts=len({a["id"] for a in attempts}),  # a question dropped after answering is logged twice
                dropped=reasons, with_context=sum(p["context"] for p in pairs),
                teacher_matches_key=round(sum(p["chosen"] == str(p["key"]) for p in mc) / max(len(mc), 1), 3),
                student_matches_key=round(sum(p["rejected"] == str(p["key"]) for p in mc) / max(len(mc), 1), 3),
                mc_answered=len(answered), teacher_top1_on_key=top1["teacher"], student_top1_on_key=top1["student"],
                this_run=dict(stats, seconds=round(seconds, 1)),
                timed_batches=dict(total, batches=len(timings),
                                   answers_per_minute=round(2 * total["answers"] / answer_seconds * 60, 1)
                                   if answer_seconds else None,
                                   teacher_answers_per_minute=round(total["answers"] / total[
                                       "teacher_answer_seconds"] * 60, 1) if total["teacher_answer_seconds"] else None,
                                   student_answers_per_minute=round(total["answers"] / total[
                                       "student_answer_seconds"] * 60, 1) if total["student_answer_seconds"] else None,
                                   mc_prompts_per_minute_both_models=round(total["mc_answers"] / total[
                                       "mc_answer_seconds"] * 60, 1) if total["mc_answer_seconds"] else None,
                                   desc_prompts_per_minute_both_models=round(total["desc_answers"] / total[
                                       "desc_answer_seconds"] * 60, 1) if total["desc_answer_seconds"] else None,
                                   questions_per_minute=round(total["questions"] / total["write_seconds"] * 60, 1)
                                   if total["write_seconds"] else None),
                peak_rss_gib=round(lm.peak_rss_gib(), 2), peak_gpu_gib=lm.peak_gpu_gib())


def load_models(device, tokenizer, write_cap):
    """(student, teacher): the student first in the device's float dtype, then the teacher (lm.load_teacher), which on
    a GPU leaves this stage's working memory (working_memory_bytes) free beside the student."""
    kind = lm.device_kind(device)
    dtype = lm.pick_dtype(device)
    student = lm.load_model(common.STUDENT_MODEL, device, dtype)
    reserve = 0.0
    if kind == "cuda":
        reserve = working_memory_bytes(lm.model_config(common.STUDENT_MODEL), lm.model_config(common.TEACHER_MODEL),
                                       prompt_tokens(tokenizer, write_cap), write_cap, BATCH[kind]) / gpu_memory.GIB
    return student, lm.load_teacher(common.TEACHER_MODEL, device, reserve, dtype)


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=None, help="chunks to process (default N_CHUNKS[device]); "
                        "the selection is prefix-stable, so a smaller number finishes a run that was cut short")
    parser.add_argument("--writer", choices=("teacher", "template"), default=None,
                        help="question writer (default WRITER[device])")
    args = parser.parse_args()
    t0 = time.time()
    print(f"00: settings {json.dumps(settings(), ensure_ascii=False)}")
    device = lm.pick_device()
    kind = lm.device_kind(device)
    tokenizer = lm.load_tokenizer(common.STUDENT_MODEL)
    lm.shared_vocab_size(tokenizer, lm.load_tokenizer(common.TEACHER_MODEL))
    chunks = load_chunks(tokenizer)
    write_cap = mc_write_cap(tokenizer, chunks)
    student, teacher = load_models(device, tokenizer, write_cap)
    stats = run(chunks, teacher, student, tokenizer, common.PAIRS, args.chunks or N_CHUNKS[kind],
                args.writer or WRITER[kind], KINDS[kind], BATCH[kind], dict(WRITE_MAX_NEW_TOKENS, mc=write_cap))
    meta = summary(common.PAIRS, stats, time.time() - t0)
    heldout = write_heldout(chunks, common.PAIRS, HELDOUT_CHUNKS)
    meta.update(teacher=common.TEACHER_MODEL, student=common.STUDENT_MODEL, corpus_chunks=len(chunks),
                heldout_questions=heldout, mc_write_cap=write_cap)
    common.write_meta(common.PAIRS / "meta.json", settings=settings(), **meta)
    (common.PAIRS / "DONE").touch()
    print(f"00: {meta['pairs']} pairs ({meta['mc_pairs']} MC, {meta['desc_pairs']} descriptive) from "
          f"{meta['attempts']} attempts; this run {stats['answers']} prompts answered by both models "
          f"({meta['timed_batches']['answers_per_minute']} answers/min) in {time.time() - t0:.1f} s; {heldout} "
          f"held-out template questions -> {common.PAIRS}")


if __name__ == "__main__":
    main()
