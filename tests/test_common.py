"""The question parser, the CSV reader and the submission validator on every layout and on broken input."""
import pytest

import common
import competition

OPTIONS = ["대칭키 암호화 방식이다.", "소인수분해의 어려움을 기반으로 한다.", "해시 함수를 사용한다.", "빠른 속도를 가진다."]
STEM = "다음 중 RSA 알고리즘의 주요 특징으로 옳은 것은?"


@pytest.mark.parametrize("sep", [" ", ". ", ") ", ".", ")", "  "])
def test_option_layouts(sep):
    text = STEM + "\n" + "\n".join(f"{i}{sep}{o}" for i, o in enumerate(OPTIONS, 1))
    q = competition.parse_question("Q", text)
    assert (q.kind, q.stem, q.options) == ("mc", STEM, OPTIONS)


def test_bom_crlf_blank_lines_and_stray_spaces():
    text = "\ufeff  " + STEM + "  \r\n\r\n" + "\r\n".join(f"  {i} {o}   \r\n" for i, o in enumerate(OPTIONS, 1))
    q = competition.parse_question("Q", text)
    assert (q.stem, q.options) == (STEM, OPTIONS)


def test_five_options():
    options = OPTIONS + ["다섯 번째 보기"]
    q = competition.parse_question("Q", STEM + "\n" + "\n".join(f"{i} {o}" for i, o in enumerate(options, 1)))
    assert len(q.options) == 5 and q.options[-1] == "다섯 번째 보기"


def test_numbers_in_the_stem_are_not_options():
    stem = "2025년 개정된 법의 내용이다.\n1 항목은 아래와 같다.\n제3조에 따르면 옳은 것은?"
    text = stem + "\n" + "\n".join(f"{i} {o}" for i, o in enumerate(OPTIONS, 1))
    q = competition.parse_question("Q", text)
    assert q.stem == stem and q.options == OPTIONS


def test_wrapped_option_line_joins_the_option_above():
    text = f"{STEM}\n1 첫째\n2 둘째는\n길게 이어진다\n3 셋째\n4 넷째"
    assert competition.parse_question("Q", text).options == ["첫째", "둘째는 길게 이어진다", "셋째", "넷째"]


@pytest.mark.parametrize("text", [
    "전자금융업자의 자본금 요건이 차등화된 이유를 설명하세요.",
    f"{STEM}\n1 하나뿐인 보기",  # a single numbered line is not a list of options
    "1 보기\n2 보기\n3 보기",  # options without a stem
    f"{STEM}\n2 보기\n3 보기",  # numbering not starting at 1
])
def test_unparsable_options_are_descriptive(text):
    q = competition.parse_question("Q", text)
    assert q.kind == "desc" and q.options == []


def write(tmp_path, content, name="q.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    return path


def test_read_questions_ok_with_bom_and_crlf(tmp_path):
    body = "ID,Question\r\nA,\"" + STEM + "\r\n1 가\r\n2 나\r\n3 다\r\n4 라\"\r\nB,설명하세요.\r\n"
    qs = competition.read_questions(write(tmp_path, "\ufeff" + body))
    assert [(q.id, q.kind, len(q.options)) for q in qs] == [("A", "mc", 4), ("B", "desc", 0)]


@pytest.mark.parametrize("content,message", [
    ("ID,Text\nA,x\n", "missing ['Question']"),
    ("ID,Question\nA,x\nA,y\n", "line 3: duplicate ID 'A'"),
    ("ID,Question\nA,x\nB,  \n", "line 3 (B): empty question"),
    ("ID,Question\n,x\n", "line 2: empty ID"),
    ("ID,Question\n", "missing"),
])
def test_read_questions_names_the_bad_row(tmp_path, content, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        competition.read_questions(write(tmp_path, content))


def test_read_questions_rejects_non_utf8(tmp_path):
    with pytest.raises(SystemExit, match="not UTF-8"):
        competition.read_questions(write(tmp_path, "ID,Question\nA,개인정보\n", encoding="cp949"))


def test_read_questions_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="make data"):
        competition.read_questions(tmp_path / "absent.csv")


QUESTIONS = [competition.parse_question("A", STEM + "\n1 가\n2 나\n3 다\n4 라"),
             competition.parse_question("B", STEM + "\n1 가\n2 나\n3 다\n4 라\n5 마"),
             competition.parse_question("C", "설명하세요.")]


def test_valid_submission_has_no_problems():
    assert competition.validate_submission([("A", "2"), ("B", "5"), ("C", "답")], QUESTIONS, ["A", "B", "C"]) == []


@pytest.mark.parametrize("rows,fragment", [
    ([("B", "1"), ("A", "2"), ("C", "답")], "do not match the questions in order"),
    ([("A", "1"), ("B", "1")], "2 rows vs 3"),
    ([("A", "1"), ("B", "1"), ("C", "답"), ("Z", "1")], "1 unknown"),
    ([("A", "5"), ("B", "1"), ("C", "답")], "A: '5' is not an option number 1-4"),
    ([("A", "0"), ("B", "1"), ("C", "답")], "not an option number"),
    ([("A", "1.0"), ("B", "1"), ("C", "답")], "not an option number"),
    ([("A", "nan"), ("B", "1"), ("C", "답")], "A: empty answer"),
    ([("A", "1"), ("B", "1"), ("C", "  ")], "C: empty answer"),
    ([("A", "1"), ("B", "1"), ("C", None)], "C: empty answer"),
])
def test_validator_catches(rows, fragment):
    problems = competition.validate_submission(rows, QUESTIONS)
    assert any(fragment in p for p in problems), problems


def test_validator_checks_the_sample_order():
    problems = competition.validate_submission([("A", "1"), ("B", "1"), ("C", "답")], QUESTIONS, ["B", "A", "C"])
    assert problems == ["sample_submission IDs differ from the questions (count or order)"]


def test_submission_roundtrip_and_header_check(tmp_path):
    rows = [("A", "2"), ("C", "쉼표, 그리고 \"따옴표\"\n줄바꿈")]
    competition.write_submission(tmp_path / "s.csv", rows)
    assert competition.read_submission(tmp_path / "s.csv") == rows
    assert not (tmp_path / "s.csv.tmp").exists()
    with pytest.raises(SystemExit, match="header must be ID,Answer"):
        competition.read_submission(write(tmp_path, "id,answer\nA,1\n", "bad.csv"))


def test_answer_model_uses_only_a_finished_final_student(tmp_path, monkeypatch):
    monkeypatch.delenv("FSKU_STUDENT", raising=False)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "FINAL", tmp_path / "models" / "student-final")
    assert common.answer_model() == common.STUDENT_MODEL
    common.FINAL.mkdir(parents=True)
    assert common.answer_model() == common.STUDENT_MODEL  # no DONE stamp yet
    (common.FINAL / "DONE").touch()
    assert common.answer_model() == "models/student-final"
    monkeypatch.setenv("FSKU_STUDENT", "elsewhere")
    assert common.answer_model() == common.STUDENT_MODEL
