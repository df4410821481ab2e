"""The competition's file formats: questions (test.csv: ID,Question) and submissions (ID,Answer).

Parsing a question into stem and options, reading a question file with clear errors, checking and writing a
submission. Plain Python: no torch import, no side effects at import.
"""
import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import common

# ---------------------------------------------------------------- questions
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
        raise SystemExit(f"{path} not found: run `make data` (or put the competition test.csv at {common.USER_TEST}).")
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


# ---------------------------------------------------------------- submissions
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


def write_submission(path, rows):
    """Write ID,Answer rows atomically."""
    common.write_csv(path, ["ID", "Answer"], [dict(ID=i, Answer=a) for i, a in rows])
