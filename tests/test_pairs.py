"""00_generate_pairs.py: question checking, layout, no test data, chunking fallback and resume on a tiny model."""
import importlib
import inspect
import random

import pytest

import common
import lm

g = importlib.import_module("00_generate_pairs")

GOOD_MC = """문제: 전자금융거래법상 전자금융거래의 정의로 옳은 것은?
1 금융회사가 전자적 장치로 금융상품을 제공하는 거래
2 현금을 직접 주고받는 거래
3 종이 어음으로 하는 거래
4 대면 창구에서만 하는 거래
정답: 1"""


def test_parse_mc_accepts_the_requested_layout():
    (stem, options, key), reason = g.parse_mc(GOOD_MC, 4)
    assert reason is None and key == 1 and len(options) == 4 and stem.startswith("전자금융거래법상")


@pytest.mark.parametrize("text,n,reason", [
    (GOOD_MC, 5, "4 options instead of 5"),
    (GOOD_MC.replace("정답: 1", ""), 4, "no answer key"),
    (GOOD_MC.replace("정답: 1", "정답: 7"), 4, "no answer key"),
    (GOOD_MC.replace("3 종이 어음으로 하는 거래", "3 현금을 직접 주고받는 거래"), 4, "repeated options"),
    (GOOD_MC.replace("문제: 전자금융거래법상 전자금융거래의 정의로 옳은 것은?", "문제: <질문>"), 4, "stem"),
    (GOOD_MC.replace("4 대면 창구에서만 하는 거래", "4 <보기>"), 4, "placeholder"),
])
def test_parse_mc_drops_malformed_questions(text, n, reason):
    parsed, why = g.parse_mc(text, n)
    assert parsed is None and reason in why


def test_parse_desc():
    assert g.parse_desc("문제: 전자서명법상 전자서명인증사업자의 의무를 설명하시오.")[0].startswith("전자서명법상")
    assert g.parse_desc("")[0] is None
    assert g.parse_desc("문제: <질문>")[0] is None


def test_shuffled_question_is_in_the_competition_layout_and_keeps_the_key():
    (stem, options, key), _ = g.parse_mc(GOOD_MC, 4)
    rng = random.Random(0)
    shuffled, new_key = g.shuffle_options(options, key, rng)
    assert shuffled[new_key - 1] == options[key - 1] and sorted(shuffled) == sorted(options)
    q = common.parse_question("x", g.mc_question_text(stem, shuffled))
    assert q.kind == "mc" and q.options == shuffled and q.stem == stem


def test_prompt_matches_04_and_context_is_shared():
    (stem, options, _), _ = g.parse_mc(GOOD_MC, 4)
    text = g.mc_question_text(stem, options)
    plain = g.build_prompt("a", "mc", text, "제1조 목적", random.Random(1))  # rng().random() = 0.13 < 0.5
    assert plain["prefix"] == common.MC_ANSWER_PREFIX and plain["context"] is True
    assert getattr(common, "CONTEXT_HEADER", g.CONTEXT_HEADER) in plain["prompt"][-1]["content"]
    assert "제1조 목적" in plain["prompt"][-1]["content"]
    g_rng = random.Random(3)  # first draw 0.237 ...; find a draw above CONTEXT_RATE
    while True:
        state = g_rng.getstate()
        if g_rng.random() >= g.CONTEXT_RATE:
            g_rng.setstate(state)
            break
    bare = g.build_prompt("a", "mc", text, "제1조 목적", g_rng)
    assert bare["prompt"] == common.mc_messages(stem, options)  # exactly what 04_infer.py asks


def test_never_reads_the_development_or_competition_questions():
    source = inspect.getsource(g)
    for name in ("SHARED", "QUESTIONS", "LABELS", "USER_TEST", "PREPARED", "fsku_dev", "test.csv", "eval/"):
        assert name not in source


def test_article_chunks_fallback():
    text = "# 법\n## 제1장 총칙\n##### 제1조 (목적)\n\n이 법은 목적으로 한다.\n##### 제2조 (정의)\n\n1\\. 정의\n"
    chunks = g.article_chunks(text, "laws/전자금융거래법__법률.md")
    assert [c["text"].split("\n")[0] for c in chunks] == ["전자금융거래법 제1조 (목적)", "전자금융거래법 제2조 (정의)"]


def test_chunk_ids_are_content_hashes():
    assert g.chunk_id("가") == g.chunk_id("가") != g.chunk_id("나")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch

    tok = lm.load_tokenizer(tiny_model_dir)
    return tok, lm.load_model(str(tiny_model_dir), "cpu", torch.float32)


def fake_writer(teacher, tokenizer, jobs, seed):
    """A question writer that always produces a well-formed, distinct question (the tiny model writes noise)."""
    out = {}
    for j in jobs:
        n = j["chunk"]["n"]
        if j["kind"] == "mc":
            out[j["id"]] = "\n".join([f"문제: 금융보안 문제 번호 {n} 정답은 무엇인가요?"] +
                                     [f"{i} 보기 {n} {'가나다라마'[i - 1]}" for i in range(1, j["n_options"] + 1)]
                                     + ["정답: 2"])
        else:
            out[j["id"]] = f"문제: 개인정보 보호법 목적 {n} 을 설명하세요."
    return out


def test_resume_appends_only_new_chunks(tiny, tmp_path, monkeypatch):
    tok, model = tiny
    monkeypatch.setattr(g, "write_questions", fake_writer)
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "BATCH", 2)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    chunks = [dict(id=g.chunk_id(f"조문 {i} 내용입니다"), source="laws/x.md", text=f"조문 {i} 내용입니다", n=i)
              for i in range(6)]
    g.run(chunks, model, model, tok, tmp_path, n_chunks=2)
    first = g.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(first) == 4 and {p["kind"] for p in first} == {"mc", "desc"}
    with open(tmp_path / "pairs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # a kill in the middle of a line
    stats = g.run(chunks, model, model, tok, tmp_path, n_chunks=4)
    assert stats["chunks_done_before"] == 2 and stats["chunks_now"] == 2
    pairs = g.read_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == 8 and len({p["id"] for p in pairs}) == 8
    for p in pairs:
        assert p["chosen"].strip() and p["rejected"].strip() and p["settings"]["temperature"] == g.ANSWER_TEMPERATURE
        if p["kind"] == "mc":
            assert p["chosen"] in {"1", "2", "3", "4", "5"} and p["prefix"] == common.MC_ANSWER_PREFIX
    assert g.run(chunks, model, model, tok, tmp_path, n_chunks=4)["chunks_now"] == 0
    meta = g.summary(tmp_path, stats, 1.0)
    assert meta["pairs"] == 8 and meta["attempts"] == 8 and meta["timed_batches"]["batches"] == 2


def test_duplicates_are_dropped(tiny, tmp_path, monkeypatch):
    tok, model = tiny

    def same_writer(teacher, tokenizer, jobs, seed):
        return {j["id"]: fake_writer(teacher, tokenizer, [dict(j, chunk=dict(j["chunk"], n=0))], seed)[j["id"]]
                for j in jobs}

    monkeypatch.setattr(g, "write_questions", same_writer)
    monkeypatch.setattr(g, "ANSWER_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(g, "MIN_CHUNK_CHARS", 5)
    monkeypatch.setattr(g, "OPTION_COUNTS", (4,))
    chunks = [dict(id=g.chunk_id(f"조문 {i}"), source="laws/x.md", text=f"조문 {i} 내용", n=i) for i in range(3)]
    g.run(chunks, model, model, tok, tmp_path, n_chunks=3)
    attempts = g.read_jsonl(tmp_path / "attempts.jsonl")
    assert len(g.read_jsonl(tmp_path / "pairs.jsonl")) == 2
    assert sum(a["reason"] == "duplicate" for a in attempts) == 4


def test_sweep_grid_and_gap_closed():
    sweep = importlib.import_module("sweep_distill")
    points = sweep.grid_points(dict(loss_type=["distillm_v2"], alpha=[0.1, 0.3], beta=[1.0], temperature=[1.0, 2.0]),
                               [dict(loss_type="kd", alpha=0.1, beta=1.0, temperature=1.0)])
    assert len(points) == 5 and len({p["name"] for p in points}) == 5
    assert points[-1]["name"] == "kd-a0.1-b1.0-t1.0"
    assert sweep.gap_closed(0.25, 0.45, 0.35) == pytest.approx(0.5)
    assert sweep.gap_closed(0.3, 0.3, 0.4) is None
