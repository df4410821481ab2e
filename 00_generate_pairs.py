"""Generate training prompts from the corpus, then answer each with teacher and student.

Reads data/corpus/{laws,guidelines}/ (`make data`; chunked by retrieval.chunk_corpus, the index's legal-structure
chunker; the ISMS-P notice's 인증기준 table is also read whole) and both models (the student first, then the teacher
where lm.load_teacher places it: on a GPU at the most precise level that fits beside the student and this stage's
working memory, working_memory_bytes). Never reads the development or the competition questions: prompts come from
the corpus only (the rules disqualify training on the test).
Per sampled chunk one question of each kind in KINDS (multiple choice in the competition's layout with 4 or 5
options, shuffled so the key position carries no bias; descriptive) is written, by the teacher (WRITER "teacher",
multiple choice within mc_write_cap tokens) or from the corpus structure (WRITER "template", in FSKU's stem styles:
a statement in 제N조 or not, a falsified statement (옳지 않은 것), an item its list does not have (해당하지 않는 것), a
term's definition or a definition's term, an ISMS-P item's requirement, its name, or an item outside its field;
distractors from the same law or table, so the key is exact and no generation is spent); malformed and duplicate
ones are dropped. Teacher and student then answer every kept prompt under the same conditions (same prompt, with the
source passage as context for a CONTEXT_RATE share; same sampling settings); with TEACHER_CONTEXT the teacher also
answers each multiple-choice question with the evidence lines of its source chunk in the prompt (privileged
context: the student never sees them). Each multiple-choice answer keeps the teacher's option digits and top-k at
the answer position from that one prefill, so training needs no teacher. Multiple-choice pairs whose key is not the
teacher's most likely option are dropped unless KEEP_TEACHER_WRONG.
Writes outputs/00_pairs/: pairs.jsonl ({id, kind, template, prompt (chat messages), teacher_prompt (privileged),
evidence, prefix, chosen = teacher answer, rejected = student answer, option probabilities of teacher, teacher with
passage and student, teacher_topk {plain, context}, source, writer, settings}), attempts.jsonl (every chunk and kind
tried, with the reason a question was dropped), timings.jsonl (seconds and answers per batch and model),
heldout.csv and heldout-keys.csv (template questions on articles no pair asks about, with their keys and template
kinds: the distilled students' in-distribution check), meta.json (accuracy on the key per template kind, host and
GPU peak memory) and DONE. The JSONL files are appended batch by batch: a killed run resumes where it stopped.
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
N_CHUNKS = dict(cpu=176, cuda=2500)  # corpus chunks to write questions from, per device (one question per kind);
# cpu: 11 batches, about 50 min (~270 s a batch: the teacher answers each question twice, with and without its
# passage), leaving the 3-hour budget of `make pairs` + `make distill` room for the four trainings (reports/distill.md)
WRITER = dict(cpu="template", cuda="teacher")  # "teacher" | "template" (the 1.5B teacher kept 1 of 8 MC: notes)
KEEP_TEACHER_WRONG = True  # keep MC pairs whose key is not the teacher's most likely option: the soft target is
# the teacher's whole option distribution (keeping only its hits kept 88 of 276 lucky guesses, reports/distill.md)
KINDS = dict(cpu=("mc",), cuda=("mc", "desc"))  # one question of each kind per chunk, per device: on the CPU the
# gap is in multiple choice (teacher 0.653 vs student 0.402; descriptive 0.412 vs 0.398, reports/baseline.md) and a
# descriptive pair costs ~3x an MC one (96 generated tokens per model; reports/distill.md)
TEMPLATE_KINDS = ("in", "not_in", "false", "item_not", "definition", "term", "isms_desc", "isms_item",
                  "isms_not")  # template questions a chunk may make (one chosen at random)
TEMPLATE_WEIGHTS = {"in": 1, "not_in": 2, "false": 2, "item_not": 2, "definition": 3, "term": 3, "isms_desc": 3,
                    "isms_item": 3, "isms_not": 3}  # odds of a kind among those a chunk can make ("in" can be made
# from almost every chunk: uniform odds made 56% of the questions "in"; FSKU asks 옳지 않은 것 / 해당하지 않는 것 as often)
TITLE_FALLBACK = False  # a chunk that makes none of them asks for its article's title (which title has 제N조: article
# numbers, not content; 331 of 1,745 chunks would be title questions)
OPTION_COUNTS = (4, 5)  # the competition's multiple-choice layouts
MIN_CHUNK_CHARS = 150  # shorter chunks (one-line articles, deleted ones) make poor questions
SENTENCE_CHARS = (20, 90)  # sentence options: whole sentences of an article within this length (dev questions are
# 87 tokens at the median: long options make long, slow prompts)
ITEM_CHARS = (4, 80)  # numbered-item options (호)
DEFINITION_CHARS = (10, 150)  # definitions ("X"란 … 말한다) as options or in a stem
ISMS_DESC_CHARS = (20, 220)  # ISMS-P criteria descriptions (상세 내용)
TEACHER_CONTEXT = True  # the teacher also answers every MC question with its source passage in the prompt
# (privileged context: the evidence lines of the chunk the question was built from); the student never sees it
EVIDENCE_MAX_TOKENS = 256  # passage tokens in the teacher's privileged prompt
TEACHER_CONTEXT_STYLE = "retrieval"  # the privileged prompt: "retrieval" = 04's layout with passages (reference block
# before the question), "reading" = READING_INSTRUCTION, the passage, then the question (reports/distill.md)
PASSAGE_MAX_TOKENS = 320  # passage tokens shown to the question writer
CONTEXT_RATE = 0.0  # share of prompts answered with the source passage in the prompt (same for both models);
# 0 while 04_infer.RAG_PASSAGES is 0 (training prompts as at inference); 0.5 for teams that answer with passages
CONTEXT_MAX_TOKENS = 96  # passage tokens in an answering prompt (keeps training sequences short on the CPU)
TOPK_STORED = 64  # the teacher's top-k log-probabilities at the answer position kept in each MC pair (plain and
# privileged prompt), so `make topk` needs no teacher (>= 01's TOPK)
WRITE_TEMPERATURE, WRITE_TOP_P = 0.7, 0.9  # teacher sampling when writing questions
WRITE_MAX_NEW_TOKENS = {"desc": 64}  # multiple choice: mc_write_cap, the longest question the template writer can
# build from the corpus, so a 5-option Korean question is never cut (a fixed 200 cut more than half of the former
# 1,711 five-option template questions, Qwen2.5 tokenizer)
WRITE_MC_MARGIN = 32  # tokens of the multiple-choice cap beyond that longest question (a teacher's wording varies)
ANSWER_TEMPERATURE, ANSWER_TOP_P = 0.7, 0.9  # teacher and student sampling when answering (same settings)
ANSWER_MAX_NEW_TOKENS = 96  # descriptive answers: two or three sentences
BATCH = dict(cpu=16, cuda=16)  # chunks per batch (question writing, answering, one checkpoint append), per device
HELDOUT_CHUNKS = 300  # template MC questions from chunks no pair was written from: the distilled students'
# in-distribution check (reports/distill.md); templates on every device, so no model and no generation
# -----------------------------------------------------------------------------

MC_WRITER = ("아래 조문의 내용만 근거로 금융보안 시험용 객관식 문제 1개를 한국어로 만드세요. 보기는 정확히 {n}개, "
             "정답은 하나입니다. 설명 없이 아래 형식만 출력하세요.\n\n문제: <질문>\n{option_lines}정답: <번호>\n\n"
             "조문:\n{passage}")
DESC_WRITER = ("아래 조문의 내용만 근거로 2~3문장으로 답할 수 있는 서술형 문제 1개를 한국어로 만드세요. 설명 없이 "
               "아래 형식만 출력하세요.\n\n문제: <질문>\n\n조문:\n{passage}")
READING_INSTRUCTION = ("다음 조문을 읽고, 조문의 내용에 따라 아래 객관식 문제의 정답 번호 하나만 답하세요.")
WRITTEN_OPTION_RE = re.compile(r"^\s*[(\[]?([1-9])\s*[.)\]]?\s+(\S.*?)\s*$")
KEY_RE = re.compile(r"정답\s*[:：]?\s*[(\[]?([1-9])")
HANGUL_RE = re.compile(r"[가-힣]")
TEMPLATE_STEMS = {  # multiple-choice stems of the template writer in FSKU's styles (옳은 것, 옳지 않은 것, 해당하지 않는
    # 것, 가장 적절한 것, 무엇); {where} = 「법령」 제N조(제목), {law} = 「법령」, {text} = a term, definition or ISMS-P item
    "in": "다음 중 {where}에 규정된 내용으로 옳은 것은?",
    "not_in": "다음 중 {where}에 규정된 내용에 해당하지 않는 것은?",
    "false": "다음 중 {where}에 관한 설명으로 옳지 않은 것은?",
    "item_not": "다음 중 {where}에서 열거하는 사항에 해당하지 않는 것은?",
    "definition": "다음 중 {law}상 '{text}'의 정의로 가장 적절한 것은?",
    "term": "{law}상 다음 정의에 해당하는 용어로 가장 적절한 것은? \"{text}\"",
    "isms_desc": "다음 중 ISMS-P 인증기준의 '{text}' 항목에 관한 설명으로 가장 적절한 것은?",
    "isms_item": "ISMS-P 인증기준에서 다음 내용을 요구하는 항목으로 가장 적절한 것은? \"{text}\"",
    "isms_not": "다음 중 ISMS-P 인증기준의 '{text}' 분야에 속하는 항목에 해당하지 않는 것은?",
    "title": "다음 중 {where}의 제목으로 옳은 것은?",
}
TEMPLATE_DESC = "{where}에서 규정하는 내용을 설명하세요."
NOISE_RE = re.compile(r"<(?:개정|신설|제목개정|전문개정)[^>]*>|\[(?:본조신설|전문개정|제목개정|시행일)[^\]]*\]|\\")
ITEM_RE = re.compile(r"^[\s*]*(?:[①-⑳]|\d+\.|[가-하]\.)[\s*]*")
ITEM_MARK_RE = re.compile(r"(?<!\d)(?<!\d\.)(\d{1,2})\.\s")  # a numbered item (호) "3. " (also "…한다.3. "), not
# "1.1.3 " nor "2.5"
DANGLING_RE = re.compile(r"^(?:다만|이 경우|이때|단,|그 밖에|또한)")  # sentences that need the one before them
DEFINITION_RE = re.compile(r'["“]([^"”\s][^"”\n]{0,18}[^"”\s])["”](?:\(이하 [^)\n]*\))?(?:라 함은|이라 함은|이란|란)\s+'
                           r'([^\n]+?)(?:을|를)\s*말한다')
FALSIFY = [  # (pattern, replacement) that make a statement of the law false; None: a number with a unit is changed
    (r"하여야 한다\.$", "하지 아니할 수 있다."), (r"할 수 있다\.$", "할 수 없다."), (r"할 수 없다\.$", "할 수 있다."),
    (r"하여서는 아니 된다\.$", "할 수 있다."), (r"(?<![\d제])(\d{1,3})(?=\s?(?:일|개월|년|시간|영업일)(?![가-힣]*조))", None),
    (r"(\d[\d,]*\s?[가-힣%]{0,3}) ?이상", r"\1 이하"), (r"(\d[\d,]*\s?[가-힣%]{0,3}) ?이하", r"\1 이상"),
    (r"(\d[\d,]*\s?[가-힣%]{0,3}) ?초과", r"\1 미만"), (r"(\d[\d,]*\s?[가-힣%]{0,3}) ?미만", r"\1 초과")]
PARTICLES = tuple("과와을를이가은는의에로으며고도만")  # a wrapped table cell whose next piece starts with one: no space
JOSA_RE = re.compile(r"(?:으로|에서|에게|과|와|을|를|이|가|은|는|의|에|로|도|만)$")
ISMS_SOURCE = "정보보호및개인정보보호관리체계인증"  # the ISMS-P notice in corpus/guidelines (별표 7: 인증기준)


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
def law_name(chunk):
    """「법령 시행령」 name of a chunk's law file, for template stems."""
    name = chunk.get("law") or Path(chunk["source"]).stem.split("__")[0]
    kind = chunk.get("kind", "")
    return name + (f" {kind}" if kind in ("시행령", "시행규칙") and not name.endswith(kind) else "")


def where(chunk):
    """「법령 시행령」 제N조(제목) of a chunk, for template stems."""
    name = law_name(chunk)
    article, title = chunk.get("article", ""), chunk.get("title", "")
    if article and article not in ("부칙", "별표"):
        return f"「{name}」 {article}" + (f"({title})" if title else "")
    return f"「{name}」의 '{title}'" if title else f"「{name}」"


def body_lines(chunk):
    """The chunk's body lines (header line dropped) without amendment notes and escapes."""
    return [NOISE_RE.sub("", line) for line in chunk["text"].split("\n")[1:]]


def sentences(chunk):
    """Whole sentences of a chunk body (header line, amendment notes and item numbers removed) of usable length."""
    out = []
    for line in body_lines(chunk):
        line = ITEM_RE.sub("", line).strip()
        for sent in re.split(r"(?<=다\.)\s+", line):
            sent = sent.strip()
            if (SENTENCE_CHARS[0] <= len(sent) <= SENTENCE_CHARS[1] and sent.endswith("다.") and "삭제" not in sent
                    and not DANGLING_RE.match(sent) and sent.count("(") == sent.count(")")
                    and sent.count("「") == sent.count("」")):
                out.append(sent)
    return list(dict.fromkeys(out))


def items(chunk):
    """The numbered items (호: "1. …", "2. …", on lines of their own or run together as in the guidelines' text) of
    the first list in a chunk, in order, each cut before its sub-items (가목) and kept when of usable length."""
    text = "\n".join(body_lines(chunk))
    found, expected, marks = [], 1, []
    for m in ITEM_MARK_RE.finditer(text):
        if int(m.group(1)) == expected:
            marks.append(m)
            expected += 1
        elif marks and int(m.group(1)) == 1:
            break  # a second list starts: one list per chunk
    for m, nxt in zip(marks, marks[1:] + [None]):
        item = text[m.end():nxt.start() if nxt else len(text)]
        item = re.split(r"\s[가-하]\.\s|\n", item.strip())[0].strip().rstrip(";,")
        if (ITEM_CHARS[0] <= len(item) <= ITEM_CHARS[1] and "삭제" not in item and not item.endswith(":")
                and not item.startswith("그 밖에")  # the catch-all item closes many lists: it is no one's own
                and "다음 각" not in item and item.count("(") == item.count(")")
                and item.count("「") == item.count("」")):
            found.append(item)
    return list(dict.fromkeys(found)) if len(marks) >= 2 else []


def definitions(chunk):
    """[(term, definition)] of the chunk's definitions ("X"란 … 말한다), the definition without the term itself and
    self-contained (no "다음 각 목" list, no mention of the term)."""
    out = []
    for m in DEFINITION_RE.finditer("\n".join(body_lines(chunk))):
        term, body = m.group(1).strip(), m.group(2).strip()
        if (DEFINITION_CHARS[0] <= len(body) <= DEFINITION_CHARS[1] and term not in body and "다음 각" not in body
                and 1 < len(term) <= 20 and body.count("(") == body.count(")")
                and "정하는" not in term and "정한" not in term):  # "대통령령으로 정하는 기관": a reference, no term
            out.append((term, body))
    return list(dict.fromkeys(out))


def falsified(sentence, rng):
    """The sentence made false by one edit (obligation to permission, can to cannot, a period or count changed, a
    threshold flipped), or None when no rule applies: the key of an "옳지 않은 것" question."""
    rules = list(FALSIFY)
    rng.shuffle(rules)
    for pattern, replacement in rules:
        if replacement is None:  # a number with a unit: another number
            m = re.search(pattern, sentence)
            if m:
                n = int(m.group(1))
                other = n * 2 if n < 50 else n // 2
                return sentence[:m.start(1)] + str(other) + sentence[m.end(1):]
            continue
        changed = re.sub(pattern, replacement, sentence, count=1)
        if changed != sentence:
            return changed
    return None


# ----------------------------------------------------------------------------- ISMS-P 인증기준 (별표 7)
def isms_criteria(text):
    """[{variant, code, name, desc, field, field_code, area}] of the 인증기준 tables of the ISMS-P notice (별표 7, 7의2,
    7의3: box-drawing rows "┃분야│분야명│항목│항목명│상세 내용┃", a cell wrapped over several lines)."""
    rows, variant, area, field, current = [], None, "", None, None
    for line in text.split("\n"):
        head = re.match(r"\[별표 (7(?:의\d)?)\]", line.strip())
        if head:
            variant = head.group(1)
            continue
        if line.startswith("## ") and "인증기준" not in line:
            variant = None
        if variant is None:
            continue
        part = re.match(r"^([가-하])\.\s+(\S.*)$", line.strip())
        if part:
            area = part.group(2).strip()
            continue
        if not line.startswith("┃") or "─" in line or "━" in line:
            continue
        cells = [c.replace("\u3000", " ").strip() for c in re.split(r"[┃│]", line)[1:-1]]
        if len(cells) != 5:
            continue
        field_code, field_name, code, name, desc = cells
        if re.match(r"^\d+\.\d+\.?$", field_code):
            field = dict(code=field_code.rstrip("."), name=[field_name])
        elif field_name and field is not None:
            field["name"].append(field_name)
        if re.match(r"^\d+\.\d+\.\d+$", code):
            current = dict(variant=variant, code=code, name=[name], desc=[desc], field=field, area=area)
            rows.append(current)
        elif current is not None:
            current["name"] += [name] if name else []
            current["desc"] += [desc] if desc else []
    return [dict(variant=r["variant"], code=r["code"], name=r["name"], desc=r["desc"], area=r["area"],
                 field=r["field"]["name"] if r["field"] else [], field_code=r["field"]["code"] if r["field"] else "")
            for r in rows]


def join_wrapped(pieces, vocabulary):
    """Cell text wrapped over lines, joined: without a space where the break splits a word (the next piece starts
    with a particle, or the two halves make a word of the corpus), else with one."""
    out = ""
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if not out:
            out = piece
            continue
        left, right = out.split()[-1], piece.split()[0]
        glued = left + right
        split_word = (right.startswith(PARTICLES) and len(right) <= 2) or glued in vocabulary or \
            JOSA_RE.sub("", glued) in vocabulary or out.endswith(("ㆍ", "("))
        out += ("" if split_word else " ") + piece
    return out


def isms_variant(chunk):
    """The 별표 7 variant of a chunk of the ISMS-P notice from its title ("(제23조제3항 관련)" = 7의2), None elsewhere."""
    title = chunk.get("title", "")
    if "인증기준" not in title:
        return None
    return "7의2" if "제3항" in title else "7의3" if "제4항" in title else "7"


def isms_pool(chunks, corpus):
    """ISMS-P criteria [{…, chunk_ids}] read from the notice in the corpus (ISMS_SOURCE), each with the chunks whose
    text holds its code and name; [] when the notice is not among the chunks' sources."""
    sources = {c["source"] for c in chunks if ISMS_SOURCE in c["source"]}
    path = Path(corpus) / next(iter(sources)) if sources else None
    if path is None or not path.exists():
        return []
    vocabulary = {w for c in chunks for w in c["text"].split()}
    vocabulary |= {JOSA_RE.sub("", w) for w in vocabulary}
    rows = []
    for r in isms_criteria(path.read_text(encoding="utf-8")):
        r = dict(r, name=join_wrapped(r["name"], vocabulary), desc=join_wrapped(r["desc"], vocabulary),
                 field=join_wrapped(r["field"], vocabulary))
        first = r["name"].split()[0] if r["name"] else ""
        pattern = re.compile(re.escape(r["code"]) + r"\s+" + re.escape(first))
        r["chunk_ids"] = [c["id"] for c in chunks if c["source"] in sources and isms_variant(c) == r["variant"]
                          and pattern.search(c["text"])]
        if r["name"] and ISMS_DESC_CHARS[0] <= len(r["desc"]) <= ISMS_DESC_CHARS[1]:
            rows.append(r)
    return rows


# ----------------------------------------------------------------------------- the pool and the builders
def template_pool(chunks, corpus=None):
    """Per law file: its chunks' sentences, titles, numbered-item lists and definitions, the distractor pool of
    template questions; under "isms", the ISMS-P criteria (isms_pool, from the notice in corpus, common.CORPUS by
    default)."""
    pool = {}
    for c in chunks:
        if c.get("article") == "부칙":
            continue  # addenda amend other laws: their sentences would be distractors from elsewhere
        entry = pool.setdefault(c["source"], dict(sentences=[], titles=[], items=[], definitions=[]))
        entry["sentences"] += [(c["id"], x) for x in sentences(c)]
        if c.get("title") and c.get("article", "").startswith("제"):
            entry["titles"].append((c["id"], c["title"]))
        entry["items"] += [(c["id"], c.get("article", ""), x) for x in items(c)]
        entry["definitions"] += [(c["id"], term, body) for term, body in definitions(c)]
    pool["isms"] = isms_pool(chunks, common.CORPUS if corpus is None else corpus)
    return pool


def law_entry(pool, chunk):
    return pool.get(chunk["source"], dict(sentences=[], titles=[], items=[], definitions=[]))


def distinct(values, exclude=()):
    """values in first-seen order without repeats and without those in exclude."""
    exclude = set(exclude)
    return [v for v in dict.fromkeys(values) if v not in exclude]


def build_in(chunk, pool, n, rng):
    own, entry = sentences(chunk), law_entry(pool, chunk)
    others = distinct((x for cid, x in entry["sentences"] if cid != chunk["id"]), own)
    if not own or len(others) < n - 1:
        return None
    right = rng.choice(own)
    return where(chunk), right, rng.sample(others, n - 1), [right]


def build_not_in(chunk, pool, n, rng):
    own, entry = sentences(chunk), law_entry(pool, chunk)
    others = distinct((x for cid, x in entry["sentences"] if cid != chunk["id"]), own)
    if len(own) < n - 1 or not others:
        return None
    wrong = rng.sample(own, n - 1)
    return where(chunk), rng.choice(others), wrong, wrong


def build_false(chunk, pool, n, rng):
    """n - 1 true sentences and one falsified: of this article when it has n sentences (the stem names it), else
    topped up with other sentences of the same law (the stem names the law)."""
    own = sentences(chunk)
    order = rng.sample(own, len(own))
    for source in order:
        key = falsified(source, rng)
        if key is None or key in own:
            continue
        true = [x for x in order if x != source][:n - 1]
        place = where(chunk)
        if len(true) < n - 1:
            entry = law_entry(pool, chunk)
            others = distinct((x for cid, x in entry["sentences"] if cid != chunk["id"]), own)
            if len(others) < n - 1 - len(true):
                return None
            true += rng.sample(others, n - 1 - len(true))
            place = f"「{law_name(chunk)}」"
        return place, key, true, [source] + [x for x in true if x in own]
    return None


def build_item_not(chunk, pool, n, rng):
    own, entry = items(chunk), law_entry(pool, chunk)
    foreign = distinct((x for cid, article, x in entry["items"] if cid != chunk["id"]
                        and article != chunk.get("article")), own)
    if len(own) < n - 1 or not foreign:
        return None
    wrong = rng.sample(own, n - 1)
    return where(chunk), rng.choice(foreign), wrong, wrong


def build_definition(chunk, pool, n, rng):
    """Which definition is that of a term (key: its definition; distractors: other terms' definitions)."""
    own, entry = definitions(chunk), law_entry(pool, chunk)
    if not own:
        return None
    term, body = rng.choice(own)
    others = distinct((b for cid, t, b in entry["definitions"] if t != term), [body])
    if len(others) < n - 1:
        return None
    return (f"「{law_name(chunk)}」", term), body, rng.sample(others, n - 1), [body]


def build_term(chunk, pool, n, rng):
    """Which term a definition defines (key: the term; distractors: other terms of the same law)."""
    own, entry = definitions(chunk), law_entry(pool, chunk)
    if not own:
        return None
    term, body = rng.choice(own)
    others = distinct((t for cid, t, b in entry["definitions"]), [term])
    if len(others) < n - 1:
        return None
    return (f"「{law_name(chunk)}」", body), term, rng.sample(others, n - 1), [body]


def isms_rows(chunk, pool):
    """The ISMS-P criteria of the chunk's variant found in the chunk."""
    return [r for r in pool.get("isms", []) if chunk["id"] in r["chunk_ids"]]


def isms_line(r):
    return f"{r['code']} {r['name']}: {r['desc']}"


def build_isms_desc(chunk, pool, n, rng):
    own = isms_rows(chunk, pool)
    if not own:
        return None
    r = rng.choice(own)
    others = distinct((x["desc"] for x in pool["isms"] if x["variant"] == r["variant"] and x["name"] != r["name"]),
                      [r["desc"]])
    if len(others) < n - 1:
        return None
    return r["name"], r["desc"], rng.sample(others, n - 1), [isms_line(r)]


def build_isms_item(chunk, pool, n, rng):
    own = isms_rows(chunk, pool)
    if not own:
        return None
    r = rng.choice(own)
    others = distinct((x["name"] for x in pool["isms"] if x["variant"] == r["variant"]), [r["name"]])
    if len(others) < n - 1:
        return None
    return r["desc"], r["name"], rng.sample(others, n - 1), [isms_line(r)]


def build_isms_not(chunk, pool, n, rng):
    """Which item is not of a field (key: an item of another field of the same area)."""
    own = isms_rows(chunk, pool)
    if not own:
        return None
    r = rng.choice(own)
    same = [x for x in pool["isms"] if x["variant"] == r["variant"] and x["field_code"] == r["field_code"]]
    names = distinct(x["name"] for x in same)
    foreign = distinct((x["name"] for x in pool["isms"] if x["variant"] == r["variant"] and x["area"] == r["area"]
                        and x["field_code"] != r["field_code"]), names)
    if len(names) < n - 1 or not foreign:
        return None
    wrong = rng.sample(names, n - 1)
    return r["field"], rng.choice(foreign), wrong, [isms_line(x) for x in same if x["name"] in wrong]


def build_title(chunk, pool, n, rng):
    titles = distinct((t for cid, t in law_entry(pool, chunk)["titles"] if cid != chunk["id"]), [chunk.get("title")])
    if not (chunk.get("article", "").startswith("제") and chunk.get("title") and len(titles) >= n - 1):
        return None
    # A title question names the article without its title: in 「법령」 제N조(제목) the stem would hold the answer
    # (it did in 42 of the 119 pairs of the first runs, reports/distill-notes.md).
    return where(dict(chunk, title="")), chunk["title"], rng.sample(titles, n - 1), [chunk["title"]]


BUILDERS = {"in": build_in, "not_in": build_not_in, "false": build_false, "item_not": build_item_not,
            "definition": build_definition, "term": build_term, "isms_desc": build_isms_desc,
            "isms_item": build_isms_item, "isms_not": build_isms_not, "title": build_title}


def template_stem(kind, subject):
    """The stem of a template kind about its subject (where, a definition's law and term, an ISMS-P item …)."""
    if kind in ("definition", "term"):
        return TEMPLATE_STEMS[kind].format(law=subject[0], text=subject[1])
    key = "where" if kind in ("in", "not_in", "false", "item_not", "title") else "text"
    return TEMPLATE_STEMS[kind].format(**{key: subject})


def template_kinds(chunk, pool, n, rng):
    """{kind: built question} of every TEMPLATE_KINDS kind the chunk and the pool can make with n options ("title"
    only for an article that makes none of the others, with TITLE_FALLBACK)."""
    built = {}
    for kind in TEMPLATE_KINDS:
        result = BUILDERS[kind](chunk, pool, n, rng)
        if result is not None:
            built[kind] = result
    if not built and TITLE_FALLBACK:
        result = build_title(chunk, pool, n, rng)
        if result is not None:
            built["title"] = result
    return built


def template_question(job, pool, rng):
    """Raw question text in the teacher writer's output format ("문제: …", "N 보기", "정답: k") built from the chunk
    and the pool (template_pool): one of the TEMPLATE_KINDS the chunk can make, chosen at random, with the kind and
    the evidence (the passage text the key rests on) in job["template"] and job["evidence"]. Returns "" when the
    chunk makes none with the asked option count."""
    chunk, n = job["chunk"], job["n_options"]
    if job["kind"] == "desc":
        return f"문제: {TEMPLATE_DESC.format(where=where(chunk))}"
    built = template_kinds(chunk, pool, n, rng)
    if not built:
        return ""
    kinds = sorted(built)
    kind = rng.choices(kinds, weights=[TEMPLATE_WEIGHTS.get(k, 1) for k in kinds])[0]
    subject, right, wrong, evidence = built[kind]
    options = list(wrong) + [right]
    rng.shuffle(options)
    job["template"], job["evidence"] = kind, evidence
    return "\n".join([f"문제: {template_stem(kind, subject)}"] + [f"{i} {o}" for i, o in enumerate(options, 1)]
                     + [f"정답: {options.index(right) + 1}"])


def template_questions(jobs, pool, seed):
    """template_question for each job (same signature role as write_questions, no model)."""
    rng = random.Random(seed)
    return {j["id"]: template_question(j, pool, rng) for j in jobs}


def evidence_context(tokenizer, chunk, evidence, max_tokens):
    """The passage the teacher reads with the question (privileged context): the chunk's header and its lines that
    hold the evidence, then its other lines in order while max_tokens allows; the evidence itself when the chunk
    has none of it (ISMS-P rows, rebuilt definitions)."""
    lines = chunk["text"].split("\n")
    clean = [NOISE_RE.sub("", x).strip() for x in lines]
    hold = [i for i, x in enumerate(clean) if x and any(e[:30] in x for e in evidence)]
    body = [clean[i] for i in hold] if hold else [e for e in evidence]
    used = len(tokenizer("\n".join([lines[0]] + body), add_special_tokens=False).input_ids)
    keep = set(hold)
    for i, x in enumerate(clean[1:], 1):
        if i in keep or not x or not hold:
            continue
        cost = len(tokenizer(x, add_special_tokens=False).input_ids) + 1
        if used + cost > max_tokens:
            break
        keep.add(i)
        used += cost
    text = "\n".join([lines[0]] + ([clean[i] for i in sorted(keep)] if hold else body))
    return clip_tokens(tokenizer, text, max_tokens)


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


def teacher_messages(q, passage, style=None):
    """The teacher's privileged prompt of a parsed multiple-choice question: the student's prompt with the passage,
    in 04's retrieval layout ("retrieval") or as a reading task ("reading": READING_INSTRUCTION, the passage, the
    question and its options), TEACHER_CONTEXT_STYLE unless given."""
    if (style or TEACHER_CONTEXT_STYLE) == "retrieval":
        return common.mc_messages(q.stem, q.options, context=passage)
    lines = [READING_INSTRUCTION, "", "조문:", passage.strip(), "", "문제: " + q.stem.strip()]
    lines += [f"{i} {text}" for i, text in enumerate(q.options, 1)]
    return [{"role": "system", "content": common.SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


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


@torch.no_grad()
def answer_position(model, tokenizer, prompts, option_ids, k=0, batch_size=8):
    """Per rendered prompt, from one prefill (left padding, batches of similar length): the log-probabilities of
    the option digits at the answer position (the next token after the prefix, which 04_infer.py reads) and, with
    k, the top-k of the whole next-token distribution {ids, logprobs, rest = log of the mass outside the top k,
    options = the option digits' log-probabilities}, over the shared vocabulary as 01 reads it."""
    out = [None] * len(prompts)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits[:, :len(tokenizer.get_vocab())], dim=-1)  # as 01 slices: no padding rows
        top = logprobs.topk(k, dim=-1) if k else None
        for row, i in enumerate(idx):
            stored = None
            if top is not None:
                rest = torch.logsumexp(logprobs[row].scatter(0, top.indices[row], float("-inf")), 0).item()
                stored = dict(ids=top.indices[row].tolist(), logprobs=[round(x, 5) for x in top.values[row].tolist()],
                              rest=round(rest, 5), options=[round(x, 5) for x in logprobs[row, option_ids].tolist()])
            out[i] = (logprobs[row, option_ids].tolist(), stored)
    return out


def sample_digits(model, tokenizer, prompts, n_options, temperature, seed, k=0):
    """Option numbers sampled from the next-token distribution over the option digits after the prefix (the
    position 04_infer.py reads); returns (answers, renormalised option probabilities, top-k of answer_position)."""
    answers, probs, tops = [], [], []
    gen = torch.Generator().manual_seed(seed)
    token_ids = lm.option_token_ids(tokenizer, max(max(n_options), *OPTION_COUNTS))  # every digit an option can be
    for (logprobs, top), n in zip(answer_position(model, tokenizer, prompts, token_ids, k, max(len(prompts), 1)),
                                  n_options):
        lp = torch.tensor(logprobs[:n])
        p = torch.softmax(lp, -1)
        choice = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen)) if temperature > 0 \
            else int(p.argmax())
        answers.append(str(choice + 1))
        probs.append([round(x, 4) for x in p.tolist()])
        tops.append(top)
    return answers, probs, tops


def answer(model, tokenizer, records, seed, seconds=None, prompt_key="prompt", k=0):
    """Each prompt record answered by one model from its messages under prompt_key (records without them are
    skipped): MC -> {answer: digit, probs: option probabilities, topk: the top-k at the answer position when k},
    descriptive -> {answer: sampled short text}. Adds the seconds spent per kind to seconds[kind] when given."""
    out, seconds = {}, {} if seconds is None else seconds
    mc = [r for r in records if r["kind"] == "mc" and r.get(prompt_key)]
    t0 = time.time()
    if mc:
        prompts = [lm.render(tokenizer, r[prompt_key], r["prefix"]) for r in mc]
        digits, probs, tops = sample_digits(model, tokenizer, prompts, [r["n_options"] for r in mc],
                                            ANSWER_TEMPERATURE, seed, k)
        out.update({r["id"]: dict(answer=d, probs=p, topk=t) for r, d, p, t in zip(mc, digits, probs, tops)})
        seconds["mc"] = seconds.get("mc", 0.0) + time.time() - t0
    desc = [r for r in records if r["kind"] == "desc" and r.get(prompt_key)]
    t0 = time.time()
    if desc:
        prompts = [lm.render(tokenizer, r[prompt_key], r["prefix"]) for r in desc]
        texts = sample(model, tokenizer, prompts, ANSWER_MAX_NEW_TOKENS, ANSWER_TEMPERATURE, ANSWER_TOP_P, seed)
        out.update({r["id"]: dict(answer=t, probs=None, topk=None) for r, t in zip(desc, texts)})
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
    these chunks (the longest stem with the longest subject, max(OPTION_COUNTS) times the longest option text: a
    sentence, title, item, definition, term or ISMS-P item; the key line) plus WRITE_MC_MARGIN. A 5-option Korean
    question in the competition's layout fits it."""
    pool = template_pool(chunks)
    laws = [entry for name, entry in pool.items() if name != "isms"]
    options = {x for entry in laws for key in ("sentences", "titles") for _, x in entry[key]}
    options |= {x[-1] for entry in laws for x in entry["items"]}
    in_stems = {body for entry in laws for _, _, body in entry["definitions"]}  # texts a stem quotes
    in_stems |= {r["desc"] for r in pool.get("isms", [])}
    options |= {x for entry in laws for _, term, body in entry["definitions"] for x in (term, body)}
    options |= {r[key] for r in pool.get("isms", []) for key in ("name", "desc", "field")}
    options = sorted(options)
    places = sorted({where(c) for c in chunks})
    if not options or not places:
        raise SystemExit("00: no sentences in the corpus chunks to size the question writer by: run `make data`.")
    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    longest = max(tokens(x) for x in options)
    quoted = max(sorted(in_stems) or [""], key=tokens)
    place = max(places, key=tokens)
    n = max(OPTION_COUNTS)
    stems = [t.format(where=place, law=place, text=quoted) for t in TEMPLATE_STEMS.values()]
    frame = "\n".join([f"문제: {max(stems, key=tokens)}"] + [f"{i} " for i in range(1, n + 1)] + [f"정답: {n}"])
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
    return common.settings_of(sys.modules[__name__], ("_RE", "_WRITER", "BUILDERS"))


def checked_question(job, raw, rng):
    """(question text, duplicate key, answer key) of a written question, or (None, None, reason) when malformed;
    multiple-choice options are shuffled."""
    if not raw.strip():
        return None, None, "nothing written (template: no kind the chunk and the law can make with these options)"
    if job["kind"] == "mc":
        parsed, reason = parse_mc(raw, job["n_options"])
        if not parsed:
            return None, None, reason
        options, key = shuffle_options(parsed[1], parsed[2], rng)
        return mc_question_text(parsed[0], options), mc_key(parsed[0], options), key
    question, reason = parse_desc(raw)
    return (question, norm_key(question), None) if question else (None, None, reason)


def mc_key(stem, options):
    """Duplicate key of a multiple-choice question: its stem and its set of options (template stems repeat with
    other options, and one question shuffled is the same question)."""
    return norm_key(stem) + "|" + "|".join(sorted(norm_key(o) for o in options))


def pair_stems(pairs):
    """Duplicate keys of the questions of pairs (mc_key of a multiple-choice question, a descriptive one whole)."""
    keys = set()
    for p in pairs:
        if p["kind"] == "desc":
            keys.add(norm_key(p["question"].split("\n")[0]))
        else:
            q = competition.parse_question(p["id"], p["question"])
            keys.add(mc_key(q.stem, q.options))
    return keys


def heldout_set(chunks, used, seen, n_chunks, seed=common.SEED):
    """(questions [{ID, Question}], keys [{ID, kind, Answer, domain, template, chunk_id}]) of template multiple-choice
    questions from the first n_chunks sampled chunks that are not in used (chunk ids a pair was written from), nor
    another window of a used article, and not in seen (duplicate keys): the same templates, option counts and
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
        question, dup_key, key = checked_question(job, template_question(job, pool, rng), rng)
        if question is None or dup_key in seen:
            continue
        seen.add(dup_key)
        qid = f"HELDOUT_{len(questions):04d}"
        questions.append(dict(ID=qid, Question=question))
        keys.append(dict(ID=qid, kind="mc", Answer=str(key), domain=c.get("law") or Path(c["source"]).stem,
                         template=job.get("template", ""), chunk_id=c["id"]))
    return questions, keys


def write_heldout(chunks, out_dir, n_chunks):
    """heldout_set over the chunks and pairs of out_dir, written to common.HELDOUT and common.HELDOUT_KEYS."""
    used = {a["id"].rsplit("-", 1)[0] for a in lm.read_jsonl(Path(out_dir) / "attempts.jsonl")}
    questions, keys = heldout_set(chunks, used, pair_stems(lm.read_jsonl(Path(out_dir) / "pairs.jsonl")), n_chunks)
    common.write_csv(common.HELDOUT, ["ID", "Question"], questions)
    common.write_csv(common.HELDOUT_KEYS, ["ID", "kind", "Answer", "domain", "template", "chunk_id"], keys)
    return len(questions)


def top_option(probs):
    """1-based number of the most likely option."""
    return probs.index(max(probs)) + 1


def process_batch(chunks, teacher, student, tokenizer, seen, rng, stats, pool=None, kinds=("mc", "desc"),
                  caps=None):
    """Write (by the teacher within caps {kind: new tokens}, or from the template pool when given), check and answer
    the questions of a batch of chunks; returns (pairs, attempts). With TEACHER_CONTEXT the teacher answers each
    multiple-choice question twice: as the student sees it, and with its source passage (evidence_context) in the
    prompt; both answers keep the top-k of the answer position."""
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
        question, dup_key, key_or_reason = checked_question(j, raw[j["id"]], rng)
        key = key_or_reason if question is not None else None
        record, reason = None, key_or_reason if question is None else None
        if question is not None and dup_key in seen:
            reason = "duplicate"
        elif question is not None:
            context = clip_tokens(tokenizer, j["chunk"]["text"], CONTEXT_MAX_TOKENS)
            record = build_prompt(j["id"], j["kind"], question, context, rng)
            reason = None if record else "does not parse in the competition layout"
        if record:
            seen.add(dup_key)
            record.update(key=key, source=j["chunk"]["source"], chunk_id=j["chunk"]["id"],
                          template=j.get("template"))
            if TEACHER_CONTEXT and record["kind"] == "mc":
                evidence = evidence_context(tokenizer, j["chunk"], j.get("evidence") or [], EVIDENCE_MAX_TOKENS)
                record.update(teacher_prompt=teacher_messages(competition.parse_question(j["id"], question),
                                                              evidence), evidence=evidence)
            prompts.append(record)
        attempts.append(dict(id=j["id"], kind=j["kind"], kept=record is not None, reason=reason,
                             template=j.get("template"), raw=raw[j["id"]][:600]))
    by_kind = {}
    answer_seed = seed_of("answer", jobs[0]["id"])
    t0 = time.time()
    teacher_answers = answer(teacher, tokenizer, prompts, answer_seed, by_kind, k=TOPK_STORED)
    stats["teacher_answer_seconds"] += time.time() - t0
    t0 = time.time()
    context_answers = answer(teacher, tokenizer, prompts, answer_seed, by_kind, "teacher_prompt", k=TOPK_STORED)
    stats["teacher_context_answer_seconds"] += time.time() - t0
    t0 = time.time()
    student_answers = answer(student, tokenizer, prompts, answer_seed, by_kind)
    stats["student_answer_seconds"] += time.time() - t0
    stats["answers"] += len(prompts)
    stats["context_answers"] += len(context_answers)
    for kind in ("mc", "desc"):
        stats[f"{kind}_answers"] += sum(r["kind"] == kind for r in prompts)
        stats[f"{kind}_answer_seconds"] += by_kind.get(kind, 0.0)  # all models
    pairs = []
    answer_settings = dict(temperature=ANSWER_TEMPERATURE, top_p=ANSWER_TOP_P, max_new_tokens=ANSWER_MAX_NEW_TOKENS)
    for r in prompts:
        plain, student_answer = teacher_answers[r["id"]], student_answers[r["id"]]
        with_context = context_answers.get(r["id"])
        target = with_context or plain  # the teacher's answer the pair is built on
        probs = dict(teacher_probs=plain["probs"], teacher_context_probs=with_context and with_context["probs"],
                     student_probs=student_answer["probs"])
        if not target["answer"].strip() or not student_answer["answer"].strip():
            attempts.append(dict(id=r["id"], kind=r["kind"], kept=False, reason="empty answer", raw=""))
            continue
        if r["kind"] == "mc" and not KEEP_TEACHER_WRONG and top_option(target["probs"]) != r["key"]:
            attempts.append(dict(id=r["id"], kind=r["kind"], kept=False, raw="", key=r["key"],
                                 template=r["template"], **probs,
                                 reason="the teacher's most likely option is not the key"))
            continue
        topk = {name: a["topk"] for name, a in (("plain", plain), ("context", with_context)) if a and a["topk"]}
        pairs.append(dict(id=r["id"], kind=r["kind"], prompt=r["prompt"], prefix=r["prefix"], chosen=target["answer"],
                          rejected=student_answer["answer"], question=r["question"], key=r["key"],
                          context=r["context"], template=r["template"], teacher_prompt=r.get("teacher_prompt"),
                          evidence=r.get("evidence"), **probs, teacher_topk=topk, source=r["source"],
                          chunk_id=r["chunk_id"], writer="teacher" if pool is None else "template",
                          settings=answer_settings))
    return pairs, attempts


TIMED = ("write_seconds", "teacher_answer_seconds", "teacher_context_answer_seconds", "student_answer_seconds",
         "answers", "context_answers", "mc_answers", "desc_answers", "mc_answer_seconds",
         "desc_answer_seconds")  # per-batch counters in timings.jsonl


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
    stats = dict({k: 0.0 if k.endswith("seconds") else 0 for k in TIMED},
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


def key_accuracy(records):
    """Over multiple-choice records with option probabilities: {n, teacher, teacher_context, student} = the share whose
    most likely option is the key (teacher: the prompt the student sees; teacher_context: with the source passage,
    None without), and the mean probability of the key under each."""
    out = dict(n=len(records))
    for who in ("teacher", "teacher_context", "student"):
        rows = [r for r in records if r.get(f"{who}_probs")]
        out[who] = round(sum(top_option(r[f"{who}_probs"]) == r["key"] for r in rows) / len(rows), 3) if rows else None
        out[f"{who}_key_probability"] = round(sum(r[f"{who}_probs"][r["key"] - 1] for r in rows) / len(rows), 3) \
            if rows else None
    return out


def per_minute(count, seconds):
    return round(count / seconds * 60, 1) if seconds else None


def summary(out_dir, stats, seconds):
    """meta.json content: counts over the whole file (all runs), accuracy on the key per template kind, throughput
    of this run."""
    pairs, attempts = lm.read_jsonl(Path(out_dir) / "pairs.jsonl"), lm.read_jsonl(Path(out_dir) / "attempts.jsonl")
    reasons = {}
    for a in attempts:
        if not a["kept"]:
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
    timings = lm.read_jsonl(Path(out_dir) / "timings.jsonl")  # per batch, over every run (resumed runs too)
    total = {k: sum(t.get(k, 0) for t in timings) for k in TIMED + ("chunks", "questions")}
    model_seconds = total["teacher_answer_seconds"] + total["teacher_context_answer_seconds"] + \
        total["student_answer_seconds"]
    mc = [p for p in pairs if p["kind"] == "mc"]
    answered = mc + [a for a in attempts if a.get("teacher_probs")]  # every MC the models answered, kept or not
    overall = key_accuracy(answered)
    templates = sorted({r.get("template") or "teacher-written" for r in answered})
    return dict(pairs=len(pairs), mc_pairs=len(mc), desc_pairs=len(pairs) - len(mc),
                attempts=len({a["id"] for a in attempts}),  # a question dropped after answering is logged twice
                dropped=reasons, with_context=sum(p["context"] for p in pairs),
                with_teacher_context=sum(bool(p.get("teacher_prompt")) for p in pairs),
                templates={t: sum((p.get("template") or "teacher-written") == t for p in mc) for t in templates},
                teacher_matches_key=round(sum(p["chosen"] == str(p["key"]) for p in mc) / max(len(mc), 1), 3),
                student_matches_key=round(sum(p["rejected"] == str(p["key"]) for p in mc) / max(len(mc), 1), 3),
                mc_answered=len(answered), teacher_top1_on_key=overall["teacher"],
                teacher_context_top1_on_key=overall["teacher_context"], student_top1_on_key=overall["student"],
                key_accuracy=overall,
                key_accuracy_per_template={t: key_accuracy([r for r in answered
                                                            if (r.get("template") or "teacher-written") == t])
                                           for t in templates},
                this_run=dict(stats, seconds=round(seconds, 1)),
                timed_batches=dict(total, batches=len(timings),
                                   answers_per_minute=per_minute(2 * total["answers"] + total["context_answers"],
                                                                 model_seconds),
                                   teacher_answers_per_minute=per_minute(total["answers"],
                                                                         total["teacher_answer_seconds"]),
                                   teacher_context_answers_per_minute=per_minute(
                                       total["context_answers"], total["teacher_context_answer_seconds"]),
                                   student_answers_per_minute=per_minute(total["answers"],
                                                                         total["student_answer_seconds"]),
                                   questions_per_minute_all_models=per_minute(total["answers"], model_seconds),
                                   mc_prompts_per_minute_both_models=per_minute(total["mc_answers"],
                                                                                total["mc_answer_seconds"]),
                                   desc_prompts_per_minute_both_models=per_minute(total["desc_answers"],
                                                                                  total["desc_answer_seconds"]),
                                   questions_per_minute=per_minute(total["questions"], total["write_seconds"])
                                   if total["write_seconds"] > 1 else None),
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
