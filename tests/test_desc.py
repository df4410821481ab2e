"""eval_desc.py on a tiny model: every variant, cut and subject-first row beside the echo baseline; resumable."""
import importlib

import answering
import common
import competition

eval_desc = importlib.import_module("eval_desc")


def test_report_rows_and_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    questions = [competition.parse_question(f"D{i}", f"개념 {i}의 목적을 설명하세요.") for i in range(3)]
    labels = {q.id: dict(kind="desc", Answer="안전성을 확보하기 위함입니다.", Keyword="목적", Question=q.text)
              for q in questions}
    monkeypatch.setattr(eval_desc, "desc_questions", lambda: (questions, labels))
    monkeypatch.setattr(eval_desc, "OUT", tmp_path / "cache")
    monkeypatch.setattr(eval_desc, "VARIANTS", {k: eval_desc.VARIANTS[k] for k in ("plain", "no-repeat")})
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 6)
    monkeypatch.setattr("sys.argv", ["eval_desc.py", "--model", str(tiny_model_dir), "--out", str(tmp_path / "d.md")])
    eval_desc.main()
    text = (tmp_path / "d.md").read_text(encoding="utf-8")
    assert "| echo: the question itself |" in text and "| reference answers |" in text
    assert "| no-repeat, 2 sentences, subject first |" in text and "| plain, 1 sentence |" in text
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2
    calls = []
    monkeypatch.setattr(eval_desc.lm, "generate", lambda *a, **k: calls.append(1) or [])
    eval_desc.main()  # every answer comes from the checkpoints
    assert calls == []


def test_repeated_sentences_are_counted():
    assert eval_desc.repeats_a_sentence("정보를 보호합니다. 정보를 보호합니다.")
    assert not eval_desc.repeats_a_sentence("정보를 보호합니다. 접근을 통제합니다.")


def test_subject_drops_the_closing_request():
    assert answering.subject("CISO의 독립성을 설명하세요.") == "CISO의 독립성"
    assert answering.subject("HSM의 장점은 무엇인가요?") == "HSM의 장점"
    assert answering.clean_description("답입니다. 둘째.", "HSM의 장점은 무엇인가요?", 1, True) == "HSM의 장점: 답입니다."
    assert common.DESC_INSTRUCTION  # the default instruction stays defined for the plain variant
