"""competition.py: the question parser, the CSV readers and the submission checks on every accepted layout and on
each bad input of issue 15 (each stops with `line N (ID): what is wrong, what to do` or is a reported kind);
prepare_data.py leaves data/prepared untouched when a check fails."""
import csv
import importlib
import re
import sys

import pytest

import common
import competition

OPTIONS = ["대칭키 암호화 방식이다.", "소인수분해의 어려움을 기반으로 한다.", "해시 함수를 사용한다.", "빠른 속도를 가진다."]
STEM = "다음 중 RSA 알고리즘의 주요 특징으로 옳은 것은?"


def mc(options=OPTIONS, numbers=None, stem=STEM):
    """A question text: stem, then one line "k option" per option (numbered 1..n unless numbers are given)."""
    numbers = numbers or range(1, len(options) + 1)
    return stem + "\n" + "\n".join(f"{k} {o}" for k, o in zip(numbers, options))


def write(tmp_path, content, name="q.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    return path


def csv_text(rows, header=("ID", "Question")):
    """CSV text (LF line ends) of rows, quoted where needed, as the competition's files are."""
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join('"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\n') else f for f in row))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- accepted layouts
@pytest.mark.parametrize("sep", [" ", ". ", ") ", ".", ")", "  "])
def test_option_layouts(sep):
    text = STEM + "\n" + "\n".join(f"{i}{sep}{o}" for i, o in enumerate(OPTIONS, 1))
    q = competition.parse_question("Q", text)
    assert (q.kind, q.stem, q.options, q.note) == ("mc", STEM, OPTIONS, "")


def test_bom_crlf_blank_lines_and_stray_spaces():
    text = "\ufeff  " + STEM + "  \r\n\r\n" + "\r\n".join(f"  {i} {o}   \r\n" for i, o in enumerate(OPTIONS, 1))
    q = competition.parse_question("Q", text)
    assert (q.stem, q.options) == (STEM, OPTIONS)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_two_to_nine_options_and_other_than_four_or_five_are_reported(n):
    options = [f"보기 {k}" for k in range(1, n + 1)]
    q = competition.parse_question("Q", mc(options))
    assert q.kind == "mc" and q.options == options
    assert (q.note == "") == (n in (4, 5)), q.note


def test_numbers_in_the_stem_are_not_options():
    stem = "2025년 개정된 법의 내용이다.\n1 항목은 아래와 같다.\n제3조에 따르면 옳은 것은?"
    q = competition.parse_question("Q", mc(stem=stem))
    assert q.stem == stem and q.options == OPTIONS


def test_a_decimal_is_not_an_option_number():
    q = competition.parse_question("Q", mc(["1.5배", "2.5배"]))
    assert q.options == ["1.5배", "2.5배"]
    assert competition.parse_question("Q", "이 비율은\n1.5배이다. 설명하세요.").kind == "desc"


def test_wrapped_option_line_joins_the_option_above():
    text = f"{STEM}\n1 첫째\n2 둘째는\n길게 이어진다\n3 셋째\n4 넷째"
    assert competition.parse_question("Q", text).options == ["첫째", "둘째는 길게 이어진다", "셋째", "넷째"]


@pytest.mark.parametrize("text", [
    "전자금융업자의 자본금 요건이 차등화된 이유를 설명하세요.",
    "CISO의 독립성 확보를 위한 통제 방안은 무엇인가요?",
    "제3조에 따른 2025년 개정 사항을\n두 문장으로 설명하세요.",
    "1 년 이내에 신고해야 하는 이유를\n설명하세요.",  # a line starting "1 …" that is text, not an option
])
def test_descriptive_questions(text):
    q = competition.parse_question("Q", text)
    assert (q.kind, q.options, q.note, q.stem) == ("desc", [], "", competition.clean_text(text))


def test_split_options_never_raises():
    assert competition.split_options(mc()) == (STEM, OPTIONS)
    bad = mc(numbers=[1, 2, 4, 5])
    assert competition.split_options(bad) == (competition.clean_text(bad), [])


# ---------------------------------------------------------------- the kind rule on unusual shapes (reported)
def test_descriptive_question_with_numbered_points_stays_descriptive_and_is_reported():
    text = "전자서명의 다음 두 측면을 설명하세요.\n1 법적 효력\n2 기술적 요건"
    q = competition.parse_question("Q", text)
    assert (q.kind, q.options, q.stem) == ("desc", [], competition.clean_text(text))
    assert "설명하세요" in q.note and "read as descriptive" in q.note
    untold = competition.parse_question("Q", "두 개념의 차이는 무엇인가요?\n1 전자서명\n2 전자인증")  # no request to write
    assert untold.kind == "mc" and untold.note.startswith("2 options (the competition's questions have 4 or 5)")


def test_asking_to_choose_and_to_write_is_multiple_choice_and_reported():
    q = competition.parse_question("Q", mc(["가", "나"], stem="다음 중 옳은 것을 고르고 이유를 설명하시오."))
    assert (q.kind, q.options) == ("mc", ["가", "나"]) and "read as multiple choice" in q.note


@pytest.mark.parametrize("text,fragment", [
    ("다음 중 옳은 것은?", "asks to choose"),
    ("다음 사항을 참고하라.\n2 가지 관점\n마지막 줄", "numbered 2"),
])
def test_descriptive_of_an_unusual_shape_is_reported(text, fragment):
    q = competition.parse_question("Q", text)
    assert q.kind == "desc" and fragment in q.note


# ---------------------------------------------------------------- layouts that are errors
@pytest.mark.parametrize("text,message", [
    (mc(numbers=[1, 2, 4, 5]), "options numbered 1, 2, 4, 5: number the options 1 to n"),  # "4 …" was glued on
    (mc(["가", "나", "다"], numbers=[1, 2, 4]), "options numbered 1, 2, 4:"),
    (mc(numbers=[0, 1, 2, 3]), "options numbered 0, 1, 2, 3:"),  # option 0 went into the stem
    (mc(numbers=[1, 2, 2, 3]), "options numbered 1, 2, 2, 3:"),
    (mc([f"보기 {k}" for k in range(1, 11)]), "10 options: the competition's questions have 2 to 9"),
    (mc([f"보기 {k}" for k in range(1, 13)]), "12 options"),
    (mc(["하나뿐인 보기"]), "a single option"),
    ("1 보기\n2 보기\n3 보기", "the question starts with option 1: put the question text above"),
    (mc(["가", "나"], numbers=[2, 3]), "lines numbered 2, 3 end the question but there is no option 1"),
    (f"{STEM}\n1 가\n2\n3 다", "option 2 is empty"),
])
def test_bad_option_layouts_are_errors(text, message):
    with pytest.raises(competition.QuestionError, match=message):
        competition.parse_question("Q", text)


# ---------------------------------------------------------------- question files
def test_read_questions_ok_with_bom_and_crlf(tmp_path):
    body = "ID,Question\r\nA,\"" + STEM + "\r\n1 가\r\n2 나\r\n3 다\r\n4 라\"\r\nB,설명하세요.\r\n\r\n"
    qs = competition.read_questions(write(tmp_path, "\ufeff" + body))
    assert [(q.id, q.kind, len(q.options)) for q in qs] == [("A", "mc", 4), ("B", "desc", 0)]


GOOD_ROWS = [("A", mc()), ("B", mc(OPTIONS + ["다섯째"]))]  # lines 2-6 and 7-12 of the file


@pytest.mark.parametrize("rows,message", [
    (GOOD_ROWS + [("C", mc(numbers=[1, 2, 4, 5]))], "line 13 (C): options numbered 1, 2, 4, 5: number the options"),
    (GOOD_ROWS + [("C", mc(numbers=[0, 1, 2, 3]))], "line 13 (C): options numbered 0, 1, 2, 3"),
    (GOOD_ROWS + [("C", mc(numbers=[1, 2, 2, 3]))], "line 13 (C): options numbered 1, 2, 2, 3"),
    (GOOD_ROWS + [("C", mc([f"보기 {k}" for k in range(1, 11)]))], "line 13 (C): 10 options"),
    (GOOD_ROWS + [("C", mc(), "extra")], "line 13 (C): 3 fields where the header has 2: put the text in double quotes"),
    (GOOD_ROWS + [("B", "설명하세요.")], "line 13 (B): duplicate ID, first at line 7: give each question its own ID"),
    (GOOD_ROWS + [("C", "  ")], "line 13 (C): empty question: write its text or remove the row"),
    (GOOD_ROWS + [("", "설명하세요.")], "line 13: empty ID: give every question an ID"),
])
def test_read_questions_names_the_line_and_id(tmp_path, rows, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        competition.read_questions(write(tmp_path, csv_text(rows)))


@pytest.mark.parametrize("cut", [
    "1 가\n2 나",  # inside the options: the question used to lose its last options
    "",  # right after the stem: it used to become descriptive
])
def test_a_file_cut_inside_a_quoted_question_is_an_error(tmp_path, cut):
    content = csv_text(GOOD_ROWS) + f'C,"{STEM}\n{cut}'
    with pytest.raises(SystemExit, match=r"line 13 \(C\): the quoted field that starts here is never closed"):
        competition.read_questions(write(tmp_path, content))


def test_text_after_a_closing_quote_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match=r'line 2 \(A\): not a valid CSV row .*write a quote inside a quoted field'):
        competition.read_questions(write(tmp_path, 'ID,Question\nA,"설명"하세요\n'))


@pytest.mark.parametrize("content,message", [
    ("ID,Question\n", "has no questions (only the header)"),
    ("ID,Question\r\n\r\n", "has no questions (only the header)"),
    ("", "is empty: expected the header ID,Question"),
    ("ID,Text\nA,x\n", "line 1: header must be ID,Question (got ID,Text): make it the competition's header"),
    ("ID,Question,Answer\nA,x,1\n", "header must be ID,Question"),
])
def test_read_questions_rejects_a_wrong_or_empty_file(tmp_path, content, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        competition.read_questions(write(tmp_path, content))


def test_read_questions_rejects_non_utf8_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"q.csv line 2: not UTF-8 \(byte 14: .*\): re-save it as UTF-8\.$"):
        competition.read_questions(write(tmp_path, "ID,Question\nA,개인정보\n", encoding="cp949"))


def test_read_questions_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="make data"):
        competition.read_questions(tmp_path / "absent.csv")


DEV = common.SHARED / "eval"


@pytest.mark.skipif(not (DEV / "fsku_dev_mc.csv").exists(), reason="needs the development set in ../shared/eval")
@pytest.mark.parametrize("name,kind,n,options", [("fsku_dev_mc.csv", "mc", 498, {4}),
                                                 ("fsku_dev_subjective.csv", "desc", 54, {0})])
def test_the_development_files_parse(tmp_path, name, kind, n, options):
    with open(DEV / name, encoding="utf-8-sig", newline="") as f:
        rows = [(r["ID"], r["Question"]) for r in csv.DictReader(f)]
    questions = competition.read_questions(write(tmp_path, csv_text(rows)))
    assert len(questions) == n and {q.kind for q in questions} == {kind}
    assert {len(q.options) for q in questions} == options and not [q.id for q in questions if q.note]


# ---------------------------------------------------------------- sample_submission.csv
QUESTIONS = [competition.parse_question("A", mc()),
             competition.parse_question("B", mc(OPTIONS + ["마"])),
             competition.parse_question("C", "설명하세요.")]


def sample(tmp_path, ids, encoding="utf-8-sig"):
    return write(tmp_path, csv_text([(i, "") for i in ids], header=("ID", "Answer")), "sample.csv", encoding)


def test_a_matching_sample_passes(tmp_path):
    assert competition.check_sample(sample(tmp_path, ["A", "B", "C"]), QUESTIONS) is None


@pytest.mark.parametrize("ids,message", [
    (["A", "C", "B"], "sample.csv line 3 (C): ID 'C' at position 2, where test.csv has 'B'"),
    (["A", "B", "C", "D"], "sample.csv line 5 (D): ID 'D' at position 4, after the last question"),
    (["A", "B"], "2 rows for 3 questions; the first missing ID is 'C' (question 3 of test.csv)"),
    ([], "has no rows (only the header)"),
])
def test_a_differing_sample_names_the_first_id_and_its_position(tmp_path, ids, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)") + ".*or remove it"):
        competition.check_sample(sample(tmp_path, ids), QUESTIONS)


def test_a_cp949_sample_gets_the_same_message_as_a_cp949_test_csv(tmp_path):
    messages = []
    for read, content in ((competition.read_questions, "ID,Question\nA,개인정보\n"),
                          (lambda p: competition.check_sample(p, QUESTIONS), "ID,Answer\nA,개인정보\n")):
        with pytest.raises(SystemExit) as e:
            read(write(tmp_path, content, "x.csv", "cp949"))
        messages.append(re.sub(r"byte \d+", "byte N", str(e.value)))  # the headers differ in length
    assert messages[0] == messages[1] and "\n" not in messages[0] and "re-save it as UTF-8" in messages[0]


# ---------------------------------------------------------------- submissions
def test_valid_submission_has_no_problems():
    assert competition.validate_submission([("A", "2"), ("B", "5"), ("C", "답")], QUESTIONS, ["A", "B", "C"]) == []


@pytest.mark.parametrize("rows,expected", [
    ([("B", "1"), ("A", "2"), ("C", "답")],
     ["IDs out of order: position 1 has 'B' where the questions have 'A': write the rows in the questions' order"]),
    ([("A", "1"), ("A", "1"), ("B", "1"), ("C", "답")],
     ["repeated IDs: 'A' at positions 1, 2: write one row per question",
      "4 rows vs 3 questions: no ID missing or unknown"]),
    ([("A", "1"), ("B", "1"), ("B", "1")],
     ["repeated IDs: 'B' at positions 2, 3: write one row per question", "3 rows vs 3 questions: 1 missing (C)"]),
    ([("A", "1"), ("B", "1")], ["2 rows vs 3 questions: 1 missing (C)"]),
    ([("A", "1"), ("B", "1"), ("C", "답"), ("Z", "1")], ["4 rows vs 3 questions: 1 unknown (Z)"]),
])
def test_validator_names_repeated_missing_unknown_and_out_of_order_ids(rows, expected):
    assert competition.validate_submission(rows, QUESTIONS) == expected


@pytest.mark.parametrize("rows,fragment", [
    ([("A", "5"), ("B", "1"), ("C", "답")], "A: '5' is not an option number 1-4"),
    ([("A", "0"), ("B", "1"), ("C", "답")], "not an option number"),
    ([("A", "1.0"), ("B", "1"), ("C", "답")], "not an option number"),
    ([("A", "nan"), ("B", "1"), ("C", "답")], "A: empty answer"),
    ([("A", "1"), ("B", "1"), ("C", "  ")], "C: empty answer"),
    ([("A", "1"), ("B", "1"), ("C", None)], "C: empty answer"),
])
def test_validator_catches_bad_answers(rows, fragment):
    problems = competition.validate_submission(rows, QUESTIONS)
    assert any(fragment in p for p in problems), problems


def test_validator_checks_the_sample_order():
    problems = competition.validate_submission([("A", "1"), ("B", "1"), ("C", "답")], QUESTIONS, ["B", "A", "C"])
    assert problems == ["sample_submission IDs differ from the questions: position 1 has 'B' where the questions "
                        "have 'A': rerun `make data` with the sample that came with test.csv"]


def test_submission_is_written_with_a_bom_and_read_with_or_without(tmp_path):
    rows = [("A", "2"), ("C", "쉼표, 그리고 \"따옴표\"\n줄바꿈")]
    competition.write_submission(tmp_path / "s.csv", rows)
    assert (tmp_path / "s.csv").read_bytes().startswith(b"\xef\xbb\xbfID,Answer\r\n")
    assert competition.read_submission(tmp_path / "s.csv") == rows
    assert not (tmp_path / "s.csv.tmp").exists()
    plain = write(tmp_path, (tmp_path / "s.csv").read_text(encoding="utf-8-sig"), "plain.csv")
    assert competition.read_submission(plain) == rows


@pytest.mark.parametrize("content,encoding,message", [
    ("id,answer\nA,1\n", "utf-8", "line 1: header must be ID,Answer"),
    ("ID,Answer,note\nA,1,x\n", "utf-8", "line 1: header must be ID,Answer"),
    ("ID,Answer\nA,1\nB,2,x\n", "utf-8", r"line 3 \(B\): 3 fields where the header has 2"),
    ("ID,Answer\nA,개인정보\n", "cp949", "line 2: not UTF-8"),
    ('ID,Answer\nA,"답\n', "utf-8", r"line 2 \(A\): the quoted field that starts here is never closed"),
])
def test_read_submission_errors_are_one_line(tmp_path, content, encoding, message):
    with pytest.raises(SystemExit, match=message):
        competition.read_submission(write(tmp_path, content, "bad.csv", encoding))


# ---------------------------------------------------------------- prepare_data: nothing prepared is overwritten
@pytest.fixture
def prepare(tmp_path, monkeypatch):
    """prepare_data.main on a tmp data folder (an earlier data/prepared in it) and a one-file corpus; returns a
    function running it and a snapshot function of data/prepared and data/corpus."""
    data = tmp_path / "data"
    paths = dict(DATA=data, PREPARED=data / "prepared", QUESTIONS=data / "prepared" / "questions.csv",
                 SAMPLE=data / "prepared" / "sample_submission.csv", LABELS=data / "prepared" / "labels.csv",
                 USER_TEST=data / "test.csv", USER_SAMPLE=data / "sample_submission.csv", CORPUS=data / "corpus")
    for name, path in paths.items():
        monkeypatch.setattr(common, name, path)
    (tmp_path / "src" / "laws").mkdir(parents=True)
    (tmp_path / "src" / "laws" / "전자금융거래법.md").write_text("제1조 목적", encoding="utf-8")
    for folder, name in ((paths["PREPARED"], "questions.csv"), (paths["CORPUS"] / "laws", "old.md")):
        folder.mkdir(parents=True)
        (folder / name).write_text("earlier run", encoding="utf-8")
    (paths["PREPARED"] / "DONE").touch()
    prepare_data = importlib.import_module("prepare_data")

    def run():
        argv = ["prepare_data.py", "--corpus-src", str(tmp_path / "src"), "--eval-dir", str(tmp_path / "eval")]
        monkeypatch.setattr(sys, "argv", argv)
        prepare_data.main()

    def snapshot():
        return {str(p.relative_to(data)): p.read_bytes() for folder in (paths["PREPARED"], paths["CORPUS"])
                for p in sorted(folder.rglob("*")) if p.is_file()}

    return run, snapshot, paths


@pytest.mark.parametrize("test_csv,sample_ids,message", [
    (csv_text([("A", mc(numbers=[1, 2, 4, 5]))]), None, r"test.csv line 2 \(A\): options numbered 1, 2, 4, 5"),
    ("ID,Question\n", None, "has no questions"),
    (csv_text([("A", mc())]), ["B"], r"sample_submission.csv line 2 \(B\): ID 'B' at position 1"),
])
def test_a_bad_test_csv_or_sample_leaves_data_prepared_untouched(prepare, test_csv, sample_ids, message):
    run, snapshot, paths = prepare
    paths["USER_TEST"].write_text(test_csv, encoding="utf-8")
    if sample_ids:
        paths["USER_SAMPLE"].write_text(csv_text([(i, "") for i in sample_ids], ("ID", "Answer")), encoding="utf-8")
    before = snapshot()
    with pytest.raises(SystemExit, match=message):
        run()
    assert snapshot() == before
    assert not paths["PREPARED"].with_name("prepared.tmp").exists()


def test_a_good_test_csv_replaces_data_prepared_and_reports_the_kinds(prepare, capsys):
    run, snapshot, paths = prepare
    rows = [("A", mc()), ("B", "전자서명의 다음 두 측면을 설명하세요.\n1 법적 효력\n2 기술적 요건"), ("C", "설명하세요.")]
    paths["USER_TEST"].write_text("\ufeff" + csv_text(rows).replace("\n", "\r\n"), encoding="utf-8")
    paths["USER_SAMPLE"].write_text(csv_text([(i, "") for i, _ in rows], ("ID", "Answer")), encoding="utf-8-sig")
    run()
    out = capsys.readouterr().out
    assert "3 test questions (1 multiple choice, 2 descriptive)" in out and "  B (desc): asks to write" in out
    assert [q.id for q in competition.read_questions(paths["QUESTIONS"])] == ["A", "B", "C"]
    assert competition.read_submission(paths["SAMPLE"]) == [("A", ""), ("B", ""), ("C", "")]
    assert paths["SAMPLE"].read_bytes().startswith(b"\xef\xbb\xbf")
    assert (paths["PREPARED"] / "DONE").exists() and not paths["LABELS"].exists()
    assert sorted(p.name for p in paths["DATA"].iterdir()) == ["corpus", "prepared", "sample_submission.csv",
                                                                "test.csv"]
    assert [p.name for p in (paths["CORPUS"] / "laws").iterdir()] == ["전자금융거래법.md"]
