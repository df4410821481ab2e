"""The competition's file formats: questions (test.csv: ID,Question) and submissions (ID,Answer).

Parsing a question into stem and options, reading a question file, checking, reading and writing a submission.
Only the competition's layout is accepted: anything else stops with `<file> line N (ID): what is wrong, what to do`
(issue 15). Plain Python: no torch import, no side effects at import.
"""
import csv
import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import common

# ---------------------------------------------------------------- questions
QUESTION_COLUMNS = ["ID", "Question"]  # the competition's test.csv header, exactly
SUBMISSION_COLUMNS = ["ID", "Answer"]  # sample_submission.csv / submission.csv
# An option number: 1-2 digits, then a space, "." or ")" (not a decimal point: "1.5배" is text) or the line's end.
OPTION_RE = re.compile(r"^\s*(\d{1,2})(?:\s*[.)](?!\d)|\s|$)\s*(.*?)\s*$")
MIN_OPTIONS, MAX_OPTIONS = 2, 9
TEST_MC, TEST_DESC, TEST_FIVE = 500, 15, 253  # the competition's test: MC and descriptive questions, MC with 5 options
USUAL_OPTIONS = (4, 5)  # what the competition's questions have; other counts are accepted and reported
# A request to write an answer, and a request to choose one: they decide the kind of the unusual shapes only.
WRITE_RE = re.compile(r"(?:설명|서술|기술|논술|논|작성|제시|쓰)\s*(?:하|해)?\s*(?:주)?\s*(?:세요|시오|십시오)")
CHOOSE_RE = re.compile(r"다음\s*중|것은\s*[?？]|것을\s*(?:고르|골라|선택)|(?:고르|골라|선택하)\s*(?:세요|시오|십시오)")


class QuestionError(ValueError):
    """A question that is not in the competition's layout; the message says what is wrong and what to do."""


@dataclass
class Question:
    """One parsed question: kind is "mc" (stem + options) or "desc" (free text). note says why the kind rule decided
    it from an unusual shape ("" for the usual ones); the prepare step reports it."""

    id: str
    text: str
    kind: str
    stem: str
    options: list = field(default_factory=list)
    note: str = ""

    @property
    def digest(self):
        """Short hash of the text: a checkpointed answer is reused only for the same text under the same id."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]


def clean_text(text):
    """Strip a BOM, normalise CRLF/CR to LF and trim stray whitespace at the line ends."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def question_lines(text):
    """The non-blank lines of a question, cleaned and stripped."""
    return [line.strip() for line in clean_text(text).split("\n") if line.strip()]


def option_number(line):
    """(number, text) of a line numbered like an option ("3 text", "3. text", "3) text", a bare "3"), else None."""
    match = OPTION_RE.match(line)
    return (int(match.group(1)), match.group(2)) if match else None


def numbering_problem(numbers, before):
    """What is wrong with the numbers of an option run (before: the number of the line just above option 1, or
    None), as "what: what to do"; None when they are 1..n with n from 2 to 9."""
    shown = ", ".join(str(n) for n in ([0] if before == 0 else []) + numbers)
    if numbers != list(range(1, len(numbers) + 1)) or before == 0:
        return f"options numbered {shown}: number the options 1 to n in order, one per line"
    if len(numbers) < MIN_OPTIONS:
        return (f"a single option (numbered 1): a multiple-choice question has {MIN_OPTIONS} to {MAX_OPTIONS} "
                "options numbered 1 to n; a descriptive one has none")
    if len(numbers) > MAX_OPTIONS:
        return (f"{len(numbers)} options: the competition's questions have {MIN_OPTIONS} to {MAX_OPTIONS} "
                "(4 or 5), numbered 1 to n")
    return None


def options_layout(text):
    """(stem, options, problem) of a question's text, by the layout rule of parse_question.

    The options are the lines from the last line numbered 1 to the end; an unnumbered line among them continues
    the option above. problem ("what: what to do", None when the layout is the competition's) names numbering that
    is not 1..n, n outside 2..9, a line numbered 0 above option 1, an empty option, options with no question above
    them, and numbered last lines with no option 1. Without options, stem is the whole text. Does not decide kinds.
    """
    lines = question_lines(text)
    numbers = [option_number(line) for line in lines]
    start = next((i for i in range(len(lines) - 1, -1, -1) if numbers[i] and numbers[i][0] == 1), None)
    if start is None or (start == 0 and len(lines) == 1):
        if len(lines) > 1 and numbers[-1]:
            shown = ", ".join(str(n[0]) for n in numbers[1:] if n)
            problem = f"lines numbered {shown} end the question but there is no option 1: number the options 1 to n"
            return clean_text(text), [], problem
        return clean_text(text), [], None
    run, options = [], []
    for line, number in zip(lines[start:], numbers[start:]):
        if number:
            run.append(number[0])
            options.append(number[1])
        else:
            options[-1] = f"{options[-1]} {line}".strip()
    if start == 0:
        if len(run) < MIN_OPTIONS:  # "1 년 …" wrapped onto a second line: text, not an option
            return clean_text(text), [], None
        return "", options, "the question starts with option 1: put the question text above the options"
    problem = numbering_problem(run, numbers[start - 1][0] if numbers[start - 1] else None)
    empty = next((n for n, option in zip(run, options) if not option), None)
    if problem is None and empty is not None:
        problem = f"option {empty} is empty: write its text or remove it and renumber"
    return "\n".join(lines[:start]), options, problem


def split_options(text):
    """(stem, options) of a question in the competition's layout, or (text, []) when it has no valid options.

    Never raises: parse_question says what is wrong with an invalid layout. Digits inside the stem ("2025년",
    "제3조", "1.5배") are never option numbers.
    """
    stem, options, problem = options_layout(text)
    return (stem, options) if options and problem is None else (clean_text(text), [])


def kind_of(text, stem, options):
    """(kind, note) of a question whose layout is valid, by the kind rule of parse_question."""
    writes, chooses = WRITE_RE.search(text), CHOOSE_RE.search(stem or text)
    if options and writes and not chooses:
        return "desc", (f"asks to write ({writes.group(0)}) and lists points 1-{len(options)} with no request to "
                        "choose: read as descriptive")
    if options and writes:
        return "mc", f"asks to write ({writes.group(0)}) and to choose ({chooses.group(0)}): read as multiple choice"
    if options and len(options) not in USUAL_OPTIONS:
        return "mc", f"{len(options)} options (the competition's questions have 4 or 5): read as multiple choice"
    if options:
        return "mc", ""
    if chooses and not writes:
        return "desc", f"asks to choose ({chooses.group(0)}) but has no options 1..n: read as descriptive"
    numbered = [n[0] for n in map(option_number, question_lines(text)[1:]) if n]
    if numbered:
        return "desc", f"has lines numbered {', '.join(map(str, numbered))} but no options: read as descriptive"
    return "desc", ""


def parse_question(qid, text):
    """Parse one question into kind, stem and options; raise QuestionError when its layout is not the competition's.

    The rule (issue 15):
    - Layout. The options are the lines from the last line numbered 1 to the end ("1 text", "1. text", "1) text";
      an unnumbered line continues the option above). They must be numbered 1..n in order with n from 2 to 9,
      non-empty, below at least one line of question text, with no line numbered 0 just above option 1. A question
      whose last line is numbered must have such options. Anything else is an error. Digits inside the text
      ("2025년", "제3조", "1.5배") do not number a line.
    - Kind. A question with options is multiple choice ("mc"); one without is descriptive ("desc"). One exception:
      options in a question that asks to write (설명/서술/기술/논술/작성/제시하세요, …하시오, 쓰시오) and not to
      choose (다음 중, …것은?, 고르시오) are points to cover, and the question is descriptive.
    - Reported (Question.note): that exception; a question with options that asks both to write and to choose, or
      has other than 4 or 5 options (mc); a question without options that asks to choose, or has numbered lines
      (desc).
    """
    stem, options, problem = options_layout(text)
    if problem:
        raise QuestionError(problem)
    kind, note = kind_of(text, stem, options)
    if kind == "desc":
        stem, options = clean_text(text), []
    return Question(id=qid, text=clean_text(text), kind=kind, stem=stem, options=options, note=note)


# ---------------------------------------------------------------- CSV files
def decode(path):
    """The text of a UTF-8 file without its BOM; stops with one line naming the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SystemExit(f"{path} line {line}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}; "
                         "cp949/EUC-KR?): re-save it as UTF-8.") from e


def csv_problem(error):
    """What a csv.Error means for the user, and what to do."""
    if "unexpected end of data" in str(error):
        return ("the quoted field that starts here is never closed (the file ends inside it): check the file is "
                "complete and every quote inside a quoted field is doubled (\"\")")
    return f"not a valid CSV row ({error}): write a quote inside a quoted field as \"\""


def read_rows(path, columns):
    """[(line, fields)] of the data rows of a UTF-8 CSV (BOM and CRLF allowed; blank lines skipped); line is where the
    row starts in the file. Stops with one line naming the file, and the line and ID where there is one, for a
    missing file, a wrong encoding, an empty file, a broken quote, a header other than columns and a row with more
    fields than the header."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found.")
    text = decode(path)
    if not text.strip():
        raise SystemExit(f"{path} is empty: expected the header {','.join(columns)} and one row per line.")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start = [], 1
    try:
        for fields in reader:
            if fields:
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        lines = io.StringIO(text, newline="").readlines()  # counted as csv counts them
        qid = lines[start - 1].split(",")[0].strip().strip('"') if start <= len(lines) else ""
        raise SystemExit(f"{path} line {start} ({qid}): {csv_problem(e)}.") from e
    header = [h.strip() for h in rows[0][1]]
    if header != columns:
        raise SystemExit(f"{path} line {rows[0][0]}: header must be {','.join(columns)} (got {','.join(header)}): "
                         "make it the competition's header.")
    for line, fields in rows[1:]:
        if len(fields) > len(columns):
            raise SystemExit(f"{path} line {line} ({fields[0].strip()}): {len(fields)} fields where the header has "
                             f"{len(columns)}: put the text in double quotes (a comma outside quotes starts a new "
                             "field).")
    return rows[1:]


def read_questions(path):
    """Read an ID,Question CSV (UTF-8, BOM and CRLF allowed) into parsed Questions, in file order.

    Stops with `<path> line N (ID): what is wrong, what to do` for a wrong encoding, header or quoting, a row with
    more fields than the header, an empty or repeated ID, an empty question and a question not in the
    competition's layout (parse_question); says so when the file has no questions.
    """
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make data` (or put the competition test.csv at {common.USER_TEST}).")
    rows = read_rows(path, QUESTION_COLUMNS)
    if not rows:
        raise SystemExit(f"{path} has no questions (only the header): put one ID,Question row per question below it.")
    first_line, questions = {}, []
    for line, fields in rows:
        qid, text = fields[0].strip(), fields[1] if len(fields) > 1 else ""
        where = f"{path} line {line}" + (f" ({qid})" if qid else "")
        if not qid:
            raise SystemExit(f"{where}: empty ID: give every question an ID.")
        if qid in first_line:
            raise SystemExit(f"{where}: duplicate ID, first at line {first_line[qid]}: give each question its own ID.")
        if not clean_text(text):
            raise SystemExit(f"{where}: empty question: write its text or remove the row.")
        try:
            questions.append(parse_question(qid, text))
        except QuestionError as e:
            raise SystemExit(f"{where}: {e}.") from e
        first_line[qid] = line
    return questions


# ---------------------------------------------------------------- submissions
def first_difference(ids, expected):
    """(position from 1, id, expected id) where two ID lists first differ (None past the end of a list); None when
    they are equal."""
    for position, (got, want) in enumerate(zip(ids, expected), start=1):
        if got != want:
            return position, got, want
    if len(ids) == len(expected):
        return None
    n = min(len(ids), len(expected))
    return n + 1, ids[n] if len(ids) > n else None, expected[n] if len(expected) > n else None


def describe_difference(difference, where="the questions"):
    """One phrase for a first_difference: which ID is at which position, and what was expected there."""
    position, got, want = difference
    if got is None:
        return f"it ends before position {position}, where {where} have {want!r}"
    if want is None:
        return f"position {position} has {got!r} after the last of {where}"
    return f"position {position} has {got!r} where {where} have {want!r}"


def id_problems(ids, expected):
    """Problems of submission IDs against the questions' IDs, in order: repeated, missing or unknown IDs, and (when
    there is none of those) the first out-of-order one; [] when they are equal. Positions count rows from 1."""
    if ids == expected:
        return []
    counts, known, given = Counter(ids), set(expected), set(ids)
    repeated = [i for i in dict.fromkeys(ids) if counts[i] > 1]
    missing, unknown = [i for i in expected if i not in given], [i for i in dict.fromkeys(ids) if i not in known]
    problems = []
    if repeated:
        where = "; ".join(f"{i!r} at positions {', '.join(str(p) for p, x in enumerate(ids, 1) if x == i)}"
                          for i in repeated[:3])
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        problems.append(f"repeated IDs: {where}{more}: write one row per question")
    if missing or unknown or len(ids) != len(expected):
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unknown)} unknown ({', '.join(unknown[:3])})" if unknown else ""]
        detail = "; ".join(p for p in parts if p) or "no ID missing or unknown"
        problems.append(f"{len(ids)} rows vs {len(expected)} questions: {detail}")
    if not problems:
        problems.append(f"IDs out of order: {describe_difference(first_difference(ids, expected))}: write the rows "
                        "in the questions' order")
    return problems


def validate_submission(rows, questions, sample_ids=None):
    """List every problem of submission rows [(ID, Answer)] against the parsed questions; [] when valid.

    Checks: rows in the questions' order (and sample_submission's, when given), no repeated, missing or unknown
    IDs, multiple-choice answers an option number, descriptive answers non-empty. Does not read files.
    """
    problems = []
    ids = [str(r[0]).strip() for r in rows]
    expected = [q.id for q in questions]
    if sample_ids is not None:
        difference = first_difference([str(i).strip() for i in sample_ids], expected)
        if difference:
            problems.append(f"sample_submission IDs differ from the questions: {describe_difference(difference)}: "
                            "rerun `make data` with the sample that came with test.csv")
    problems += id_problems(ids, expected)
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


def check_sample(path, questions, test_csv="test.csv"):
    """Stop with `<path> line N (ID): …` at the first sample_submission row whose ID differs from the questions'
    (read from test_csv); return None when the sample lists exactly the questions' IDs, in order."""
    rows = read_rows(path, SUBMISSION_COLUMNS)
    if not rows:
        raise SystemExit(f"{path} has no rows (only the header): use the sample_submission.csv that came with "
                         f"{Path(test_csv).name}, or remove it.")
    ids, expected = [fields[0].strip() for _, fields in rows], [q.id for q in questions]
    difference = first_difference(ids, expected)
    if difference is None:
        return None
    position, got, want = difference
    todo = f"use the sample_submission.csv that came with this {Path(test_csv).name}, or remove it"
    if got is None:
        raise SystemExit(f"{path}: {len(ids)} rows for {len(expected)} questions; the first missing ID is {want!r} "
                         f"(question {position} of {test_csv}): {todo}.")
    where = "after the last question" if want is None else f"where {test_csv} has {want!r}"
    raise SystemExit(f"{path} line {rows[position - 1][0]} ({got}): ID {got!r} at position {position}, {where}: "
                     f"{todo}.")


def read_submission(path):
    """Rows [(ID, Answer)] of a submission CSV (UTF-8 with or without a BOM); stops with one line (read_rows) for a
    missing file, a wrong encoding, header or quoting, or a row with more than two fields."""
    return [(fields[0], fields[1] if len(fields) > 1 else "") for _, fields in
            read_rows(path, SUBMISSION_COLUMNS)]


def write_submission(path, rows):
    """Write ID,Answer rows atomically, in UTF-8 with a BOM as the competition's sample_submission.csv is."""
    common.write_csv(path, SUBMISSION_COLUMNS, [dict(ID=i, Answer=a) for i, a in rows], bom=True)
