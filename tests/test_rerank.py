"""The LLM reranker (retrieval.py) on a tiny random model: shared-prefix scores equal the plain ones, FIRST labels,
blend, fallback; 03_rerank.run checkpoints and resumes; eval_rerank's metrics by hand."""
import importlib

import pytest
import torch

import answering
import competition
import eval_rerank
import lm
import retrieval
from conftest import TINY_LAWS

rerank = importlib.import_module("03_rerank")  # its run only: the reranker itself is retrieval's

QUESTION = "전자서명의 정의로 옳은 것은?"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return lm.load_model(str(tiny_model_dir), "cpu", torch.float32), lm.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def tiny_labels(monkeypatch):
    # "Yes"/"No" are several tokens in the tiny tokenizer; digits are single tokens there.
    monkeypatch.setattr(retrieval, "YES", "1")
    monkeypatch.setattr(retrieval, "NO", "2")


@torch.no_grad()
def plain_scores(model, tokenizer, passages):
    """The oracle: one full prompt per passage, log p(Yes) - log p(No) over the two tokens."""
    yes, no = tokenizer.encode("1", add_special_tokens=False)[0], tokenizer.encode("2", add_special_tokens=False)[0]
    out = []
    for p in passages:
        ids = tokenizer(retrieval.pointwise_prompt(tokenizer, QUESTION, p), add_special_tokens=False).input_ids
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1, [yes, no]].log_softmax(-1)
        out.append((logits[0] - logits[1]).item())
    return out


def test_shared_prefix_equals_plain_prompts(tiny):
    model, tokenizer = tiny
    expected = plain_scores(model, tokenizer, TINY_LAWS)
    assert retrieval.pointwise_scores(model, tokenizer, QUESTION, TINY_LAWS) == pytest.approx(expected, abs=1e-4)
    assert retrieval.pointwise_scores(model, tokenizer, QUESTION, TINY_LAWS[:1]) == pytest.approx(expected[:1],
                                                                                                   abs=1e-4)


def test_prompts_part_at_the_passage(tiny):
    _, tokenizer = tiny
    a = retrieval.pointwise_prompt(tokenizer, QUESTION, TINY_LAWS[0])
    b = retrieval.pointwise_prompt(tokenizer, QUESTION, TINY_LAWS[1])
    shared = lm.common_prefix(a, b)
    assert QUESTION in a[:shared] and a[shared:].startswith(TINY_LAWS[0][lm.common_prefix(TINY_LAWS[0],
                                                                                          TINY_LAWS[1]):])


def test_token_count_counts_the_question_part_once(tiny):
    model, tokenizer = tiny
    stats = {}
    retrieval.pointwise_scores(model, tokenizer, QUESTION, TINY_LAWS, stats=stats)
    ids = [tokenizer(retrieval.pointwise_prompt(tokenizer, QUESTION, p), add_special_tokens=False).input_ids
           for p in TINY_LAWS]
    assert stats["tokens"] == len(ids[0]) + sum(len(i) - lm.common_prefix(ids[0], i) for i in ids[1:])
    assert stats["tokens"] < sum(map(len, ids))


def test_listwise_reads_the_label_logits(tiny):
    model, tokenizer = tiny
    scores = retrieval.listwise_scores(model, tokenizer, QUESTION, TINY_LAWS)
    assert len(scores) == len(TINY_LAWS) and all(s < 0 for s in scores)
    with pytest.raises(SystemExit, match="at most 20"):
        retrieval.listwise_scores(model, tokenizer, QUESTION, ["x"] * 21)


def test_blend_weights():
    llm, first = [0.1, 0.9, 0.5], [3.0, 2.0, 1.0]
    assert retrieval.blend(llm, first, weight=1.0) == [1, 2, 0]
    assert retrieval.blend(llm, first, weight=0.0) == [0, 1, 2]
    assert retrieval.blend([1.0], [1.0]) == [0]


def test_long_passages_are_cut_not_dropped(tiny):
    _, tokenizer = tiny
    long = "개인정보 " * 500
    cut = retrieval.cut(tokenizer, long, 20)
    assert 0 < len(tokenizer(cut, add_special_tokens=False).input_ids) <= 21 and long.startswith(cut)
    assert retrieval.cut(tokenizer, "짧다", 20) == "짧다"


class FakeChunk:
    def __init__(self, i, text):
        self.id, self.text = i, text


@pytest.mark.parametrize("mode", ["pointwise", "listwise"])
def test_failure_falls_back_to_the_first_stage(tiny, monkeypatch, caplog, mode):
    model, tokenizer = tiny
    hits = [(FakeChunk(i, t), 1.0 / (i + 1)) for i, t in enumerate(TINY_LAWS)]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(retrieval, f"{mode}_scores", broken)
    order, scores, failed = retrieval.rerank_question(model, tokenizer, QUESTION, hits, mode)
    assert (order, scores, failed) == ([0, 1, 2, 3], None, True)
    assert "first-stage order kept" in caplog.text


def test_fewer_candidates_than_asked(tiny):
    model, tokenizer = tiny
    assert retrieval.rerank_question(model, tokenizer, QUESTION, [(FakeChunk(0, "하나"), 1.0)]) == ([0], None, False)
    assert retrieval.rerank_question(model, tokenizer, QUESTION, []) == ([], None, False)


@pytest.mark.parametrize("mode", ["pointwise", "listwise"])
def test_run_writes_every_question_and_resumes(tiny_model_dir, tiny_index, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(retrieval, "RERANK_CANDIDATES", 3)
    monkeypatch.setattr(retrieval, "SEARCH_METHOD", "fused")  # dense always finds the nearest chunks
    questions = [competition.parse_question(f"Q{i}", t) for i, t in enumerate(["전자서명을 설명하세요.",
                                                                            "개인정보처리자의 의무를 설명하세요."])]
    config = answering.Config(candidate=str(tiny_model_dir))
    records, meta = rerank.run(questions, tmp_path / "rr", config, mode, "float32")
    assert [r["id"] for r in records] == ["Q0", "Q1"] and meta["failures"] == 0
    assert all(sorted(r["chunks"]) == sorted(r["first_stage"]) and len(r["chunks"]) == 3 for r in records)
    assert meta["tokens_per_question"] > 0
    again, meta2 = rerank.run(questions, tmp_path / "rr", config, mode, "float32")
    assert meta2["reranked_now"] == 0 and again == records
    # a checkpoint-only rerun reports the cost measured when the questions were reranked (eval_rerank's table)
    assert meta2["tokens_per_question"] == meta["tokens_per_question"] and meta2["timed_questions"] == 2
    assert meta2["seconds"]["per_question"] == meta["seconds"]["per_question"] > 0
    assert lm.read_records(tmp_path / "rr" / f"ranked-{meta['key']}.jsonl")["Q0"] == records[0]
    edited = [questions[0], competition.parse_question("Q1", "금융회사의 보안 의무를 설명하세요.")]  # same id, new text
    _, meta3 = rerank.run(edited, tmp_path / "rr", config, mode, "float32")
    assert meta3["reranked_now"] == 1


def test_key_names_the_dtype_and_the_option_logits_as_04s(tiny_model_dir, tiny_index, monkeypatch):
    keys = {}
    for setting in ("float32", "model"):
        monkeypatch.setattr(lm, "OPTION_LOGITS", setting)
        keys[setting] = {d: rerank.config_key(str(tiny_model_dir), d, "float", "pointwise")
                         for d in ("bfloat16", "float32")}
    assert keys["model"]["bfloat16"] != keys["model"]["float32"]  # rankings read at another dtype are not reused
    assert keys["float32"]["bfloat16"] != keys["model"]["bfloat16"]
    assert keys["float32"]["float32"] == keys["model"]["float32"]  # float32 logits are exact either way


def test_only_questions_that_read_passages_are_reranked(monkeypatch):
    mc = competition.parse_question("M", "전자서명의 정의로 옳은 것은?\n1 가\n2 나\n3 다\n4 라")
    desc = competition.parse_question("D", "전자서명을 설명하세요.")
    assert rerank.to_rerank([mc, desc]) == [mc]
    assert rerank.to_rerank([mc, desc], {"D"}) == [desc]  # a measurement's ids, descriptive ones too
    monkeypatch.setattr(answering, "DESC_PASSAGES", True)
    assert rerank.to_rerank([mc, desc]) == [mc, desc]


def test_rerank_report_metrics_by_hand():
    class Keyed:
        def __init__(self, key):
            self.key = key

    chunks = [Keyed(("법", "법률", f"제{i}조")) for i in range(6)]
    items = [dict(golds=[("법", "법률", "제2조")]), dict(golds=[("법", "법률", "제5조")]), dict(golds=[("x",)])]
    ranks = eval_rerank.ranks_of([[2, 0], [0, 1, 3, 4, 5], [1]], items, chunks)
    assert ranks == [1, 5, None]
    m = eval_rerank.summary(ranks)
    assert (m["recall@1"], m["recall@3"], m["recall@5"]) == (1 / 3, 1 / 3, 2 / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 5) / 3)
