"""answering.py and 04_infer.py: option calibration, descriptive clean-up, batched scoring and resume on a tiny random
model."""
import csv
import dataclasses
import importlib
import json
import math

import pytest
import torch

import answering
import common
import competition
import lm
import retrieval
from conftest import TINY_LAWS

infer = importlib.import_module("04_infer")


def cfg(model, passages=0, **fields):
    """An answering.Config for a model folder."""
    return answering.Config(candidate=str(model), passages=passages, **fields)


def record(qid, probs):
    return dict(id=qid, kind="mc", logprobs=[math.log(p) for p in probs])


def test_batch_calibration_removes_a_shared_option_prior():
    # Every question puts most mass on option 1; the true answer is the option the question lifts above the prior.
    prior = [0.7, 0.1, 0.1, 0.1]
    records = []
    for i in range(answering.BATCH_MIN):
        boost = i % 4
        probs = [p * (3.0 if k == boost else 1.0) for k, p in enumerate(prior)]
        records.append(record(f"q{i}", [p / sum(probs) for p in probs]))
    none = answering.calibrated_answers(records, "none")
    batch = answering.calibrated_answers(records, "batch")
    assert set(none.values()) == {"1"}
    assert all(batch[f"q{i}"] == str(i % 4 + 1) for i in range(answering.BATCH_MIN))


def test_content_free_calibration_divides_by_the_given_prior():
    records = [record("a", [0.5, 0.3, 0.1, 0.1])]
    content_free = {"4": [math.log(p) for p in (0.8, 0.1, 0.05, 0.05)]}
    # 0.5/0.8 < 0.3/0.1: option 2 wins once the prior is removed
    assert answering.calibrated_answers(records, "content_free", content_free) == {"a": "2"}


def test_batch_calibration_falls_back_to_content_free_on_few_questions():
    records = [record("a", [0.5, 0.3, 0.1, 0.1])]
    content_free = {"4": [math.log(p) for p in (0.8, 0.1, 0.05, 0.05)]}
    assert answering.calibrated_answers(records, "batch", content_free) == {"a": "2"}
    assert answering.calibrated_answers(records, "batch") == {"a": "1"}  # no prior at all: plain argmax


def test_calibration_per_option_count():
    records = [record("four", [0.1, 0.2, 0.3, 0.4]), record("five", [0.1, 0.1, 0.1, 0.1, 0.6])]
    assert answering.calibrated_answers(records, "none") == {"four": "4", "five": "5"}


def test_unknown_calibration_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown CALIBRATION"):
        answering.calibrated_answers([record("a", [0.5, 0.5])], "median")


@pytest.mark.parametrize("raw,expected", [
    ("**접근통제**는 중요합니다. 둘째 문장입니다. 셋째입니다. 넷째는 잘립니다.", "접근통제는 중요합니다. 둘째 문장입니다. 셋째입니다."),
    ("- 첫째 항목\n- 둘째 항목", "첫째 항목 둘째 항목"),
    ("### 제목\n1. 내용", "제목 내용"),
])
def test_clean_description(raw, expected):
    assert answering.clean_description(raw, "질문", 3, restate=False) == expected
    assert answering.clean_description(raw, "질문을 설명하세요.", 3, restate=True) == "질문: " + expected


def test_the_default_answer_is_the_first_sentence_alone(monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_SENTENCES", 1)
    monkeypatch.setattr(answering, "DESC_RESTATE", False)
    assert answering.clean_description("접근통제는 중요합니다. 둘째 문장입니다.", "접근통제를 설명하세요.") == "접근통제는 중요합니다."


def test_clean_description_is_never_empty():
    assert answering.clean_description(" ** ", "CISO의 독립성을 설명하세요.") == "CISO의 독립성"
    assert answering.clean_description("", "설명하세요.") == "설명하세요."


RAW_ANSWERS = [  # shapes the teacher writes: prose, markdown lists, headings, a numbered list after a lead sentence
    "접근통제는 권한 있는 사용자만 자원에 접근하게 하는 통제입니다. 이는 인증과 인가로 이루어진다. 셋째 문장입니다.",
    "**HSM**은 암호키를 안전하게 보관하는 장치이다.\n\n- 키 생성\n- 키 보관\n1. 서명",
    "### 개요\n전자서명은 서명자를 확인한다. 또한 변경 여부를 확인할 수 있다!  그 밖에?",
    "정보보호 최고책임자의 독립성 보장이 필요합니다.\n1) 조직상 독립\n2) 예산",
]


@pytest.mark.parametrize("raw", RAW_ANSWERS)
@pytest.mark.parametrize("kept", [1, 2])
def test_stopping_at_the_kept_sentences_never_changes_the_answer(raw, kept, monkeypatch):
    """Every prefix on which the stop test fires cleans to the full answer's text, and the stop fires before the
    end wherever the full answer has more sentences than are kept."""
    monkeypatch.setattr(answering, "DESC_MAX_SENTENCES", kept)
    full = answering.clean_description(raw, "질문", restate=False)
    fired = [n for n in range(1, len(raw) + 1) if answering.kept_sentences_done(raw[:n])]
    assert all(answering.clean_description(raw[:n], "질문", restate=False) == full for n in fired)
    if len(answering.sentences(raw)) > kept:
        assert fired and fired[0] < len(raw)
    else:  # list items without a sentence end run together as one sentence: nothing to stop early
        assert not fired
    assert not answering.kept_sentences_done(full)  # the kept text itself does not count as finished early


def test_the_descriptive_key_names_where_generation_stops(monkeypatch):
    key = answering.desc_key()
    monkeypatch.setattr(answering, "DESC_MAX_SENTENCES", answering.DESC_MAX_SENTENCES + 1)
    assert answering.desc_key() != key


def test_stopped_rows_are_prefixes_of_free_generation(tiny_model_dir):
    tokenizer = lm.load_tokenizer(tiny_model_dir)
    model = lm.load_model(tiny_model_dir, "cpu", torch.float32)
    prompts = [lm.render(tokenizer, common.desc_messages("질문" * n, "")) for n in (1, 4, 9)]
    free = lm.generate(model, tokenizer, prompts, 24, batch_size=3)
    stopped = lm.generate(model, tokenizer, prompts, 24, batch_size=3, done=lambda text: len(text) >= 6)
    assert lm.generate(model, tokenizer, prompts, 24, batch_size=3, done=lambda text: False) == free
    assert all(f.startswith(s) and len(s) >= min(6, len(f)) for s, f in zip(stopped, free))
    assert any(len(s) < len(f) for s, f in zip(stopped, free))  # the stop did cut something


def test_batched_logprobs_match_one_by_one(tiny_model_dir):
    tokenizer = lm.load_tokenizer(tiny_model_dir)
    model = lm.load_model(tiny_model_dir, "cpu", torch.float32)
    prompts = [lm.render(tokenizer, common.mc_messages("질문" * n, ["가", "나", "다", "라"]), "정답: ")
               for n in (1, 5, 12)]
    ids = lm.option_token_ids(tokenizer, 4)
    batched = lm.next_token_logprobs(model, tokenizer, prompts, ids, batch_size=3)
    single = [lm.next_token_logprobs(model, tokenizer, [p], ids, batch_size=1)[0] for p in prompts]
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    # they are log-probabilities of a full-vocabulary softmax: each below 0, their mass below 1
    assert all(sum(math.exp(x) for x in row) < 1 for row in batched)


def test_shared_prefix_logprobs_equal_each_prompt_alone(tiny_model_dir):
    # Oracle: every prompt scored on its own (batch 1, no cache). Groups of unequal lengths in one padded batch, their
    # other prompts parting from the first at different tokens, a group of one, and a prompt equal to its first.
    tokenizer = lm.load_tokenizer(tiny_model_dir)
    model = lm.load_model(tiny_model_dir, "cpu", torch.float32)
    options = ["가나다", "라마", "바사아자", "차"]

    def prompt(stem, shift, context=""):
        return lm.render(tokenizer, common.mc_messages(stem, answering.shifted(options, shift), context), "정답: ")
    groups = [[prompt("질문" * 9, s) for s in (0, 1, 2, 3)], [prompt("짧은 질문", 0)],
              [prompt("문제", s, "참고 " * 30) for s in (0, 2)], [prompt("같은", 0), prompt("같은", 0)]]
    ids = lm.option_token_ids(tokenizer, 4)
    stats = {}
    shared = lm.shared_prefix_logprobs(model, tokenizer, groups, ids, batch_size=8, stats=stats)
    for group, rows in zip(groups, shared):
        alone = [lm.next_token_logprobs(model, tokenizer, [p], ids, batch_size=1)[0] for p in group]
        assert torch.allclose(torch.tensor(rows), torch.tensor(alone), atol=1e-4)
    assert stats["shift_prompts"] == 5
    # the other prompts run only their own tokens: fewer than the whole prompts
    whole = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for g in groups for p in g)
    assert stats["prefill_tokens"] < whole
    # the first prompts' figures do not depend on the others (the batches a run without shifts forms)
    firsts = lm.next_token_logprobs(model, tokenizer, [g[0] for g in groups], ids, batch_size=8)
    assert [rows[0] for rows in shared] == firsts


def test_bf16_option_logits_are_exact_in_float32(tiny_model_dir):
    # Oracle: the last hidden state times the options' output rows in float64. The bf16 model's own logits are rounded
    # (ties at the top option on real models); the float32 ones match the oracle, and differ from the rounded ones
    # by no more than bf16's rounding.
    tokenizer = lm.load_tokenizer(tiny_model_dir)
    model = lm.load_model(tiny_model_dir, "cpu", torch.bfloat16)
    prompts = [lm.render(tokenizer, common.mc_messages("질문" * n, ["가", "나", "다", "라"]), "정답: ") for n in (1, 7)]
    ids = lm.option_token_ids(tokenizer, 4)
    assert lm.exact_head(model) is model.get_output_embeddings()
    exact = torch.tensor(lm.next_token_logprobs(model, tokenizer, prompts, ids, batch_size=1))
    rounded = torch.tensor(lm.next_token_logprobs(model, tokenizer, prompts, ids, batch_size=1, option_logits="model"))
    weight = model.get_output_embeddings().weight[ids].double()
    for row, prompt in enumerate(prompts):
        enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1].double()
        oracle = weight @ hidden
        assert torch.allclose((exact[row] - exact[row, 0]).double(), oracle - oracle[0], atol=1e-5)
    assert (exact - rounded).abs().max() <= 0.01 * rounded.abs().max() + 0.05
    # float32 weights: the model's logits are exact already; the setting "model" keeps them for any dtype
    assert lm.exact_head(lm.load_model(tiny_model_dir, "cpu", torch.float32)) is None
    assert lm.exact_head(model, "model") is None


def test_logits_changed_after_the_output_layer_stay_the_models_own():
    rounded = torch.tensor([[20.0, 18.5, -3.0]])
    assert lm.agrees(rounded + 0.04, rounded)
    assert not lm.agrees(rounded * 30.0, rounded)  # Gemma 2's soft cap or Granite's scale: not the head's product


def test_config_key_names_the_option_logits_below_float32(monkeypatch, tiny_model_dir):
    keys = {}
    for setting in ("float32", "model"):
        monkeypatch.setattr(lm, "OPTION_LOGITS", setting)
        keys[setting] = {d: answering.config_key(str(tiny_model_dir), d) for d in ("bfloat16", "float32")}
    assert keys["float32"]["bfloat16"] != keys["model"]["bfloat16"]
    assert keys["float32"]["float32"] == keys["model"]["float32"]  # float32 logits are exact either way


def write_questions(path, n_mc=5, n_desc=2):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Question"])
        for i in range(n_mc):
            options = 4 + i % 2
            w.writerow([f"M{i}", f"문제 {i} 옳은 것은?\n" + "\n".join(f"{k} 보기{k}" for k in range(1, options + 1))])
        for i in range(n_desc):
            w.writerow([f"D{i}", f"개념 {i}을 설명하세요."])
    return path


def test_run_answers_every_question_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(answering, "MC_BATCH", 2)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv"))
    out = tmp_path / "run"
    records, meta = answering.run(questions, out, cfg(tiny_model_dir), "float32")
    rows = answering.submission_rows(questions, records, "batch", meta["content_free"])
    assert competition.validate_submission(rows, questions) == []
    assert meta["answered_now"] == 7 and meta["prefill_tokens_per_s"] > 0
    assert sorted(meta["content_free"]) == ["4", "5"]

    # A kill mid-write leaves a torn last line: those questions are redone, the rest come from the checkpoint.
    checkpoint = out / meta["predictions"]
    lines = checkpoint.read_text(encoding="utf-8").splitlines()
    checkpoint.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10], encoding="utf-8")
    again, meta2 = answering.run(questions, out, cfg(tiny_model_dir), "float32")
    assert meta2["answered_now"] == 4
    for a, b in zip(records, again):
        assert a["id"] == b["id"]
        if a["kind"] == "mc":
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        else:
            assert a["raw"] == b["raw"]  # greedy decoding is deterministic

    # A question whose text changed under the same id is answered again, never taken from the checkpoint.
    edited = [competition.parse_question(q.id, q.text.replace("옳은 것은", "옳지 않은 것은")) if q.id == "M0" else q
              for q in questions]
    _, meta3 = answering.run(edited, out, cfg(tiny_model_dir), "float32")
    assert meta3["answered_now"] == 1


def test_checkpoint_key_changes_with_the_prompt(tiny_model_dir, monkeypatch):
    key = answering.config_key(str(tiny_model_dir), "float32")
    monkeypatch.setattr(common, "MC_INSTRUCTION", "다른 지시문")
    assert answering.config_key(str(tiny_model_dir), "float32") != key


def test_checkpoint_key_follows_the_weights_not_the_checkout(tmp_path, monkeypatch):
    """A moved checkout, or the same weights converted again (other timings), keeps its checkpoints; other weights
    do not."""
    def key_in(root, meta):
        (root / "models" / "m").mkdir(parents=True)
        (root / "models" / "m" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        monkeypatch.setattr(common, "ROOT", root)
        return answering.config_key("models/m", "bfloat16")

    meta = dict(name="teacher", gguf_sha256="ab" * 32, seconds=dict(total=102.7))
    key = key_in(tmp_path / "a", meta)
    assert key_in(tmp_path / "b", dict(meta, seconds=dict(total=99.0))) == key
    assert key_in(tmp_path / "c", dict(meta, gguf_sha256="cd" * 32)) != key


def test_main_writes_a_valid_submission(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    questions = write_questions(tmp_path / "q.csv", n_mc=3, n_desc=1)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["04_infer.py", "--model", str(tiny_model_dir), "--out", str(out),
                                     "--questions", str(questions), "--dtype", "float32", "--passages", "0"])
    infer.main()
    rows = competition.read_submission(out / "submission.csv")
    assert [r[0] for r in rows] == ["M0", "M1", "M2", "D0"]
    assert competition.validate_submission(rows, competition.read_questions(questions)) == []
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert (out / "DONE").exists() and meta["questions"] == 4 and meta["seconds"]["per_question"] > 0
    infer.main()  # everything from the checkpoint: the measurements of the first run are kept
    again = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert again["answered_now"] == 0
    assert [again[f] for f in answering.MEASURED] == [meta[f] for f in answering.MEASURED]
    assert again["prefill_tokens_per_s"] > 0


def passage_prompts(monkeypatch, desc_passages):
    """The user turns of every prompt rendered from now on, with fused retrieval (dense always finds the nearest
    chunks of the tiny index) and answering.DESC_PASSAGES as given."""
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(answering, "DESC_PASSAGES", desc_passages)
    monkeypatch.setattr(retrieval, "SEARCH_METHOD", "fused")
    seen = []
    real_render = lm.render
    monkeypatch.setattr(lm, "render", lambda tok, messages, prefix="": seen.append(messages[1]["content"])
                        or real_render(tok, messages, prefix))
    return seen


def test_retrieved_context_goes_into_the_prompt_and_the_key(tiny_model_dir, tiny_index, tmp_path, monkeypatch):
    seen = passage_prompts(monkeypatch, desc_passages=True)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=2, n_desc=1))
    records, meta = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir, 3), "float32")
    assert meta["rag"]["passages"] == 3
    assert all(len(r["context"]) == min(3, len(TINY_LAWS)) for r in records)
    question_prompts = [p for p in seen if "옳은 것은" in p or "설명하세요" in p]
    assert question_prompts and all(common.CONTEXT_HEADER in p and "[1] " in p for p in question_prompts)
    _, plain = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir), "float32")
    assert plain["key"] != meta["key"] and plain["rag"] is None


def test_descriptive_questions_read_no_passages_unless_asked(tiny_model_dir, tiny_index, tmp_path, monkeypatch):
    seen = passage_prompts(monkeypatch, desc_passages=False)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=2, n_desc=1))
    records, meta = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir, 3), "float32")
    context = {r["kind"]: r["context"] for r in records}
    assert context["mc"] and context["desc"] == [] and "no_copy" not in next(r for r in records if r["kind"] == "desc")
    assert all(common.CONTEXT_HEADER in p for p in seen if "옳은 것은" in p)
    assert not any(common.CONTEXT_HEADER in p for p in seen if "설명하세요" in p)
    monkeypatch.setattr(answering, "DESC_PASSAGES", True)  # the setting is in the key: no descriptive answer reused
    _, again = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir, 3), "float32")
    assert again["key"] != meta["key"] and again["answered_now"] == len(questions)


def test_a_share_of_the_questions_reads_passages_where_retrieval_looks_surest(tiny_model_dir, tiny_index, tmp_path,
                                                                             monkeypatch):
    passage_prompts(monkeypatch, desc_passages=False)
    options = "\n1 가\n2 나\n3 다\n4 라"
    rows = [dict(ID="mixed", Question="전자서명과 개인정보와 금융회사 중 옳은 것은?" + options),
            dict(ID="sure", Question="전자서명은 서명자의 신원을 나타내는가?" + options),
            dict(ID="none", Question="여행 일정으로 옳은 것은?" + options),
            dict(ID="fair", Question="개인정보처리자의 개인정보 보호와 전자서명으로 옳은 것은?" + options),
            dict(ID="desc", Question="전자서명을 설명하세요.")]
    common.write_csv(tmp_path / "q.csv", ["ID", "Question"], rows)
    questions = competition.read_questions(tmp_path / "q.csv")
    index = retrieval.load_index(tiny_index)
    ratio = dict(zip([q.id for q in questions[:4]], (s["ratio"] for s in retrieval.bm25_signals(
        index, [q.text for q in questions[:4]]))))
    assert ratio["sure"] > ratio["fair"] > ratio["mixed"] > ratio["none"] == 0.0
    assert answering.passage_readers(index, questions, 0.5) == {"sure", "fair"}
    config = cfg(tiny_model_dir, 1, rerank=False, passage_share=0.5)
    groups, meta = answering.run_groups(questions, tmp_path / "share", config, "float32")
    records = {r["id"]: r for _, group, _ in groups for r in group}
    assert sorted(records) == sorted(q.id for q in questions)
    assert [i for i in records if records[i]["context"]] == ["sure", "fair"]  # neither the others nor "desc"
    # the records a run of every question with, or without, passages writes: its checkpoints serve both
    full, _ = answering.run(questions, tmp_path / "all", cfg(tiny_model_dir, 1, rerank=False), "float32")
    plain, _ = answering.run(questions, tmp_path / "none", cfg(tiny_model_dir), "float32")
    for r in full + plain:
        if r["kind"] == "mc" and bool(r["context"]) == (r["id"] in ("sure", "fair")):
            assert r["logprobs"] == pytest.approx(records[r["id"]]["logprobs"], abs=1e-4)
    assert meta["config"]["passage_share"] == 0.5 and meta["questions"] == 5 and len(meta["groups"]) == 2
    written = json.loads((tmp_path / "share" / "meta.json").read_text(encoding="utf-8"))
    assert lm.read_records(tmp_path / "share" / written["predictions"]).keys() == records.keys()
    rows = answering.grouped_submission_rows(questions, groups, "batch")
    assert [i for i, _ in rows] == [q.id for q in questions] and all(str(a).strip() for _, a in rows)
    _, again = answering.run_groups(questions, tmp_path / "share", config, "float32")
    assert again["answered_now"] == 0  # both groups resume from their checkpoints, with the first run's times
    assert again["seconds"] == meta["seconds"] and again["seconds"]["answering"] > 0
    written["config"].pop("cascade")  # a meta.json written before Config had that field: still the same config
    common.write_json(tmp_path / "share" / "meta.json", written)
    _, older = answering.run_groups(questions, tmp_path / "share", config, "float32")
    assert older["seconds"] == meta["seconds"]
    with pytest.raises(SystemExit, match="passage_share"):
        cfg(tiny_model_dir, 1, passage_share=0.0).check()


def test_a_cascade_keeps_the_surer_prompt_of_the_questions_it_asks_again():
    plain = [dict(record("sure", [0.9, 0.05, 0.03, 0.02]), seconds=1.0),
             dict(record("unsure", [0.4, 0.3, 0.2, 0.1]), seconds=1.0),
             dict(record("worse", [0.45, 0.35, 0.1, 0.1]), seconds=1.0),
             dict(id="d", kind="desc", raw="답", seconds=2.0)]
    assert answering.top_probability(plain[0]) == pytest.approx(0.9)
    assert answering.unsure(plain, 0.5) == {"unsure", "worse"} and answering.unsure(plain, 1.0) == {"sure", "unsure",
                                                                                                   "worse"}
    again = [dict(record("unsure", [0.1, 0.8, 0.05, 0.05]), seconds=3.0, context=[["법", "법률", "제1조"]]),
             dict(record("worse", [0.3, 0.3, 0.2, 0.2]), seconds=3.0, context=[["법", "법률", "제2조"]])]
    merged = {r["id"]: r for r in answering.cascade_merge(plain, again)}
    assert list(merged) == ["sure", "unsure", "worse", "d"]  # plain's order
    assert merged["sure"] is plain[0] and merged["d"] is plain[3]  # not asked again: as they were
    assert merged["unsure"]["cascade"] == "passages" and merged["unsure"]["context"]  # surer with the passage
    assert merged["worse"]["cascade"] == "plain" and "context" not in merged["worse"]  # surer without it
    assert merged["unsure"]["seconds"] == merged["worse"]["seconds"] == 4.0  # both prompts


def test_a_cascade_asks_again_with_passages_only_where_the_plain_answer_is_unsure(tiny_model_dir, tiny_index,
                                                                                  tmp_path, monkeypatch):
    seen = passage_prompts(monkeypatch, desc_passages=False)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=4, n_desc=1))
    plain, _ = answering.run(questions, tmp_path / "none", cfg(tiny_model_dir, calibration="none"), "float32")
    tops = sorted(answering.top_probability(r) for r in plain if r["kind"] == "mc")
    threshold = (tops[1] + tops[2]) / 2  # half of the multiple-choice questions below it
    config = cfg(tiny_model_dir, 1, rerank=False, calibration="none", cascade=threshold)
    seen.clear()
    groups, meta = answering.run_groups(questions, tmp_path / "cascade", config, "float32")
    [(_, records, _)] = groups
    asked = answering.unsure(plain, threshold)
    assert len(asked) == 2 and sum(common.CONTEXT_HEADER in p for p in seen) == 2  # only those read passages
    assert [r["id"] for r in records] == [q.id for q in questions]
    by_id = {r["id"]: r for r in records}
    assert {i for i in by_id if "cascade" in by_id[i]} == asked
    for r in plain:  # the plain records, or the surer of the two for the ones asked again
        surer = by_id[r["id"]]
        assert answering.top_probability(surer) >= answering.top_probability(r) - 1e-6 if r["kind"] == "mc" else True
    assert meta["config"]["cascade"] == threshold and len(meta["groups"]) == 2
    written = json.loads((tmp_path / "cascade" / "meta.json").read_text(encoding="utf-8"))
    assert lm.read_records(tmp_path / "cascade" / written["predictions"]).keys() == by_id.keys()
    rows = answering.grouped_submission_rows(questions, groups, "none")
    assert [i for i, _ in rows] == [q.id for q in questions] and all(str(a).strip() for _, a in rows)
    _, again = answering.run_groups(questions, tmp_path / "cascade", config, "float32")
    assert again["answered_now"] == 0 and again["seconds"] == meta["seconds"]  # both runs from their checkpoints
    # under permute 2 the questions asked again read their passage prompt in two option orders, the plain one in one
    permute = dataclasses.replace(config, calibration="permute", permutations=2)
    seen.clear()
    groups, meta = answering.run_groups(questions, tmp_path / "permute", permute, "float32")
    [(_, records, _)] = groups
    assert sum(common.CONTEXT_HEADER in p for p in seen) == 2 * len(asked)
    assert all(set(r.get("shifts", {})) == ({"1"} if r.get("cascade") == "passages" else set())
               for r in records if r["kind"] == "mc" and "cascade" in r)
    assert meta["groups"][0]["config"]["calibration"] == "none"  # the plain pass: the identity order only
    by_id = {r["id"]: r for r in records}
    assert [a for q, a in answering.grouped_submission_rows(questions, groups, "permute") if q in asked] == \
        [str(max(range(4), key=answering.permutation_mean(by_id[i]).__getitem__) + 1) for i in by_id if i in asked]
    for wrong in (dict(passages=0), dict(calibration="batch"), dict(passage_share=0.5), dict(cascade=1.5)):
        with pytest.raises(SystemExit, match="cascade"):
            cfg(tiny_model_dir, **dict(dict(passages=1, calibration="none", cascade=0.5), **wrong)).check()


def test_a_budgeted_cascade_affords_what_the_measured_seconds_allow(monkeypatch):
    monkeypatch.setattr(competition, "TEST_MC", 100)
    monkeypatch.setattr(competition, "TEST_DESC", 10)
    plain = [dict(record(f"m{i}", [0.4, 0.3, 0.2, 0.1]), seconds=1.0) for i in range(4)] + \
        [dict(id="d", kind="desc", raw="답", seconds=5.0)]
    again = [dict(record("m0", [0.4, 0.3, 0.2, 0.1]), seconds=4.0)]
    # 100 + 50 s without passages and 50 s of loads: 300 s leave 100 s, 25 of the test's 100 at 4 s: 1 of these 4
    assert answering.cascade_affordable(plain, again, 50.0, 300.0, 4) == 1
    assert answering.cascade_affordable(plain, again, 50.0, 600.0, 4) == 4  # 400 s spare: all of them
    assert answering.cascade_affordable(plain, again, 50.0, 10_000.0, 4) == 4  # never more than there are
    assert answering.cascade_affordable(plain, again, 50.0, 150.0, 4) == 0  # the plain pass alone is over
    monkeypatch.setattr(answering, "CASCADE_COST_BOUND", 2.0)  # nothing timed with passages: the bound, 2 s
    assert answering.cascade_affordable(plain, None, 50.0, 300.0, 4) == 2


def test_a_cascade_over_budget_asks_again_the_most_unsure_it_can_afford(tiny_model_dir, tiny_index, tmp_path,
                                                                        monkeypatch):
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=4, n_desc=1))
    config = cfg(tiny_model_dir, 1, rerank=False, calibration="none", cascade=1.0)  # every MC question is unsure
    plain, _ = answering.run(questions, tmp_path / "cascade", dataclasses.replace(config, passages=0, cascade=0.0),
                             "float32")
    order = [r["id"] for r in sorted((r for r in plain if r["kind"] == "mc"), key=answering.top_probability)]
    monkeypatch.setattr(answering, "CASCADE_PROBE", 1)
    monkeypatch.setattr(answering, "cascade_affordable",  # over at the bound; 2 at the speed the probe measures
                        lambda plain, again, loads, budget, n: 0 if again is None else 2)
    groups, meta = answering.run_groups(questions, tmp_path / "cascade", config, "float32", budget_s=100.0)
    [(_, records, _)] = groups
    assert {r["id"] for r in records if "cascade" in r} == set(order[:2])  # the two most unsure
    assert meta["cascade_budget"]["asked"] == 2 and meta["cascade_budget"]["unsure"] == 4
    assert meta["cascade_budget"]["mc_s_probe"] > 0 and meta["cascade_budget"]["mc_s_passages"] > 0
    assert len(meta["groups"]) == 3  # without passages, the probe, the rest it affords
    _, again = answering.run_groups(questions, tmp_path / "cascade", config, "float32", budget_s=100.0)
    assert again["answered_now"] == 0 and again["cascade_budget"]["asked"] == 2  # resumed: the same decision
    whole, _ = answering.run_groups(questions, tmp_path / "cascade", config, "float32")  # no budget: all four
    assert {r["id"] for r in whole[0][1] if "cascade" in r} == set(order)


def test_work_order_sorts_by_the_question_with_its_passages(tiny_model_dir):
    tokenizer = lm.load_tokenizer(str(tiny_model_dir))
    short, long = (competition.parse_question(i, f"{stem}\n1 가\n2 나\n3 다\n4 라") for i, stem in (
        ("s", "옳은 것은?"), ("l", "다음 중 전자금융거래법에 따른 접근매체의 관리 의무로 옳은 것은?")))
    desc = competition.parse_question("d", "전자서명을 설명하세요.")
    assert [q.id for q in answering.work_order([desc, long, short], tokenizer)] == ["s", "l", "d"]
    passage = "전자금융거래법 제6조 접근매체의 선정과 사용 및 관리 " * 5
    assert [q.id for q in answering.work_order([desc, long, short], tokenizer, {"s": passage})] == ["l", "s", "d"]


def test_a_question_with_nothing_retrieved_is_still_answered(tiny_model_dir, tiny_index, tmp_path, monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(answering, "DESC_PASSAGES", True)  # descriptive questions here: they retrieve
    monkeypatch.setattr(retrieval, "SEARCH_METHOD", "bm25")  # dense and fused always return the nearest chunks
    rows = [dict(ID="hit", Question="전자서명의 정의를 설명하세요."), dict(ID="none", Question="여행 일정을 설명하세요.")]
    common.write_csv(tmp_path / "q.csv", ["ID", "Question"], rows)
    questions = competition.read_questions(tmp_path / "q.csv")
    records, meta = answering.run(questions, tmp_path / "out", cfg(tiny_model_dir, 3), "float32")
    context = {r["id"]: r["context"] for r in records}
    assert context["hit"] and context["none"] == []  # no word of the second question is in the corpus
    answers = answering.submission_rows(questions, records, "none", meta["content_free"])
    assert [i for i, _ in answers] == ["hit", "none"] and all(a.strip() for _, a in answers)


def test_missing_index_says_what_to_do(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "INDEX", tmp_path / "absent")
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=1, n_desc=0))
    with pytest.raises(SystemExit, match="make index"):
        answering.run(questions, tmp_path / "out", cfg(tiny_model_dir, 3), "float32")


def test_auto_calibration_corrects_only_a_piled_up_prior():
    piled = [record(f"p{i}", [0.7, 0.1, 0.1, 0.1] if i % 4 else [0.2, 0.6, 0.1, 0.1]) for i in range(60)]
    spread = [record(f"s{i}", [0.1] * (i % 4) + [0.7] + [0.1] * (3 - i % 4)) for i in range(60)]
    assert answering.auto_mode(piled) == "batch" and answering.auto_mode(spread) == "none"
    assert answering.calibrated_answers(spread, "auto") == answering.calibrated_answers(spread, "none")
    assert answering.calibrated_answers(piled, "auto") == answering.calibrated_answers(piled, "batch")


def test_no_copy_bans_the_token_that_would_complete_a_source_run():
    assert lm.ngram_continuations([1, 2, 3, 2, 4], 2) == {(1,): {2}, (2,): {3, 4}, (3,): {2}}
    rule = lm.NoCopy([[5, 6, 7, 8], []], n=3, prompt_length=2)
    scores = torch.zeros(2, 10)
    rule(torch.tensor([[0, 0, 5, 6], [0, 0, 5, 6]]), scores)
    assert scores[0, 7] == float("-inf") and torch.isfinite(scores[0, :7]).all() and torch.isfinite(scores[1]).all()
    # the prompt's own tokens do not count: only one token generated so far
    scores = torch.zeros(1, 10)
    lm.NoCopy([[5, 6, 7]], n=3, prompt_length=3)(torch.tensor([[0, 5, 6, 1]]), scores)
    assert torch.isfinite(scores).all()


def test_generation_never_repeats_a_run_of_its_source(tiny_model_dir, monkeypatch):
    tokenizer = lm.load_tokenizer(str(tiny_model_dir))
    model = lm.load_model(str(tiny_model_dir), "cpu", torch.float32)
    calls, real_generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append((kw["input_ids"], real_generate(**kw)))
                        or calls[-1][1])

    def new_ids():  # token ids each prompt generated in the last call, in prompt order (a batch is sorted by length)
        prompt, out = calls[-1]
        rows = {tuple(r[r != tokenizer.pad_token_id].tolist()): out[k, prompt.shape[1]:].tolist()
                for k, r in enumerate(prompt)}
        return [rows[tuple(tokenizer(p, add_special_tokens=False).input_ids)] for p in prompts]

    def shares_a_run(ids, source_ids, n):
        grams = {tuple(source_ids[i:i + n]) for i in range(len(source_ids) - n + 1)}
        return any(tuple(ids[i:i + n]) in grams for i in range(len(ids) - n + 1))

    prompts = ["질문: 전자금융거래법의 목적을 설명하세요.", "질문: 개인정보를 설명하세요."]
    n = 3
    free = lm.generate(model, tokenizer, prompts, 12)  # the source: what the model says unconstrained
    free_ids = new_ids()
    sources = [tokenizer(t, add_special_tokens=False).input_ids for t in free]
    assert all(shares_a_run(ids, src, n) for ids, src in zip(free_ids, sources))
    kept = lm.generate(model, tokenizer, prompts, 12, sources=free, no_copy=n)
    assert kept != free
    assert not any(shares_a_run(ids, src, n) for ids, src in zip(new_ids(), sources))
    assert lm.generate(model, tokenizer, prompts, 12, sources=["", ""], no_copy=n) == free


def test_a_changed_copy_rule_answers_only_the_descriptive_questions_again(tiny_model_dir, tiny_index, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(answering, "DESC_PASSAGES", True)  # the copy rule applies to descriptive answers with passages
    monkeypatch.setattr(retrieval, "SEARCH_METHOD", "fused")
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=2, n_desc=1))
    records, meta = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir, 3), "float32")
    assert meta["no_copy"] == answering.RAG_NO_COPY_TOKENS
    assert [r.get("no_copy") for r in records if r["kind"] == "desc"] == [answering.RAG_NO_COPY_TOKENS]
    monkeypatch.setattr(answering, "RAG_NO_COPY_TOKENS", 2)
    again, meta2 = answering.run(questions, tmp_path / "rag", cfg(tiny_model_dir, 3), "float32")
    assert meta2["key"] == meta["key"] and meta2["answered_now"] == 1
    assert [r.get("no_copy") for r in again if r["kind"] == "desc"] == [2]
    # without passages the rule does not apply: a plain checkpoint stays valid under any rule
    _, plain = answering.run(questions, tmp_path / "plain", cfg(tiny_model_dir), "float32")
    monkeypatch.setattr(answering, "RAG_NO_COPY_TOKENS", 5)
    assert answering.run(questions, tmp_path / "plain", cfg(tiny_model_dir), "float32")[1]["answered_now"] == 0


def test_a_run_killed_at_any_moment_resumes_to_the_same_submission(tiny_model_dir, tmp_path):
    """kill -9 of a real 04_infer.py process after its first checkpoints: the rerun loses at most the batch in
    flight and writes a submission byte-identical to an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    questions = write_questions(tmp_path / "q.csv", n_mc=240, n_desc=6)

    def command(out):
        return [sys.executable, str(common.ROOT / "04_infer.py"), "--model", str(tiny_model_dir), "--out", str(out),
                "--questions", str(questions), "--dtype", "float32", "--passages", "0"]

    env = dict(os.environ, FSKU_CPU_DTYPE="float32")
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in killed.glob("predictions-*.jsonl"))
        if lines >= 2 * answering.MC_BATCH:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "DONE").exists(), "the run finished before the kill: the test needs a slower run"
    assert lines >= 2 * answering.MC_BATCH
    subprocess.run(command(killed), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads((killed / "meta.json").read_text(encoding="utf-8"))
    assert 0 < meta["answered_now"] < 246  # the checkpointed batches were not answered again
    clean = tmp_path / "clean"
    subprocess.run(command(clean), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert (killed / "submission.csv").read_bytes() == (clean / "submission.csv").read_bytes()


def test_a_missing_model_folder_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ROOT", tmp_path)
    for model, target in (("models/teacher-base", "make teacher"), ("models/student-base", "make student"),
                          ("models/student-distilled-merged", "make distill")):
        with pytest.raises(SystemExit, match=target):
            lm.load_tokenizer(model)
    with pytest.raises(SystemExit, match="FSKU_STUDENT"):
        lm.load_model("models/my-own-model", "cpu", torch.float32)


def test_changed_descriptive_settings_answer_only_the_descriptive_questions_again(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=3, n_desc=2))
    _, meta = answering.run(questions, tmp_path / "out", cfg(tiny_model_dir), "float32")
    monkeypatch.setattr(answering, "DESC_GENERATION", dict(no_repeat_ngram_size=2))
    _, again = answering.run(questions, tmp_path / "out", cfg(tiny_model_dir), "float32")
    assert again["key"] == meta["key"] and again["answered_now"] == 2  # the multiple-choice records stay valid


def test_timing_of_a_kind_answered_earlier_is_kept(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    questions = competition.read_questions(write_questions(tmp_path / "q.csv", n_mc=3, n_desc=2))
    _, first = answering.run(questions, tmp_path / "out", cfg(tiny_model_dir), "float32")
    monkeypatch.setattr(answering, "DESC_GENERATION", dict(no_repeat_ngram_size=2))  # only the descriptive redone
    _, again = answering.run(questions, tmp_path / "out", cfg(tiny_model_dir), "float32")
    assert again["answered_now"] == 2
    assert again["timing"]["mc_s_per_prompt"] == first["timing"]["mc_s_per_prompt"] > 0


def test_a_checkpoint_with_more_shifts_gives_the_answers_of_a_run_of_its_own(tiny_model_dir, tmp_path, monkeypatch):
    # `make select` scores every shift; `make submission` seeded from it must answer as a run with pride's shifts alone.
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(answering, "BATCH_MIN", 5)  # one question per option count estimates the prior
    questions = competition.read_questions(write_questions(tmp_path / "q.csv"))
    pride = cfg(tiny_model_dir, calibration="pride", permutations=4, pride_share=0.2)
    alone, meta = answering.run(questions, tmp_path / "alone", pride, "float32")
    every, _ = answering.run(questions, tmp_path / "seeded", cfg(tiny_model_dir, calibration="permute",
                                                                   permutations=5), "float32")
    assert any(len(r["shifts"]) > len(a["shifts"]) for r, a in zip(every, alone) if r["kind"] == "mc")
    seeded, meta2 = answering.run(questions, tmp_path / "seeded", pride, "float32")
    assert meta2["answered_now"] == 0
    assert [sorted(r.get("shifts", {})) for r in seeded] == [sorted(r.get("shifts", {})) for r in alone]
    assert answering.submission_rows(questions, seeded, "pride", meta["content_free"]) == \
        answering.submission_rows(questions, alone, "pride", meta["content_free"])
