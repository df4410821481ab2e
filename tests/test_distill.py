"""01_train_distillm.py: losses against hand-computed formulas, stop-gradient, masking and template, chunking,
adaptive alpha and gradual beta, the stored top-k (exact when k covers the vocabulary, bounded at TOPK), a few LoRA
steps on a tiny random model, steps from epochs, adapter save and merge from the loaded teacher and from the
store."""
import importlib
import json
import math

import pytest
import torch

import common
import competition
import lm
from conftest import build_tiny_model

d = importlib.import_module("01_train_distillm")

P = [0.7, 0.2, 0.1]  # teacher, 3-token vocabulary
Q = [0.2, 0.5, 0.3]  # student


def logits(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64))


def test_skl_matches_the_formula():
    a = 0.1
    expected = sum(p * (math.log(p) - math.log(a * p + (1 - a) * q)) for p, q in zip(P, Q))
    assert d.skl(logits(P), logits(Q), a).item() == pytest.approx(expected, rel=1e-6)


def test_srkl_matches_the_formula():
    a = 0.1
    expected = sum(q * (math.log(q) - math.log((1 - a) * p + a * q)) for p, q in zip(P, Q))
    assert d.srkl(logits(P), logits(Q), a).item() == pytest.approx(expected, rel=1e-6)


def test_baselines_match_the_formulas():
    fkl = sum(p * math.log(p / q) for p, q in zip(P, Q))
    tv = 0.5 * sum(abs(p - q) for p, q in zip(P, Q))
    lam = 0.9
    m = [lam * p + (1 - lam) * q for p, q in zip(P, Q)]
    js = lam * sum(p * math.log(p / mi) for p, mi in zip(P, m)) + (1 - lam) * sum(q * math.log(q / mi)
                                                                                  for q, mi in zip(Q, m))
    assert d.forward_kl(logits(P), logits(Q)).item() == pytest.approx(fkl, rel=1e-6)
    assert d.tvd(logits(P), logits(Q)).item() == pytest.approx(tv, rel=1e-6)
    assert d.gjsd(logits(P), logits(Q), lam).item() == pytest.approx(js, rel=1e-6)
    assert d.nll(logits(Q), torch.tensor([1])).item() == pytest.approx(-math.log(0.5), rel=1e-6)


def test_temperature_softens_both_distributions():
    tau = 2.0
    p = [x ** (1 / tau) for x in P]
    q = [x ** (1 / tau) for x in Q]
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert d.forward_kl(logits(P), logits(Q), tau).item() == pytest.approx(expected, rel=1e-6)


def test_skew_divergences_reduce_to_kl_at_alpha_zero_and_vanish_when_equal():
    kl_pq = d.forward_kl(logits(P), logits(Q)).item()
    assert d.skl(logits(P), logits(Q), 1e-9).item() == pytest.approx(kl_pq, rel=1e-6)
    assert d.skl(logits(P), logits(P), 0.1).item() == pytest.approx(0.0, abs=1e-9)
    assert d.srkl(logits(Q), logits(Q), 0.1).item() == pytest.approx(0.0, abs=1e-9)


def test_srkl_stops_the_gradient_through_the_mixture():
    # d/dz of sum_v q (log q - log((1-a) p + a sg[q])) with q = softmax(z): only the outer q and log q carry the
    # gradient. Reference: the same expression with the mixture built from a constant copy of q.
    a = 0.3
    z = logits(Q).clone().requires_grad_(True)
    d.srkl(logits(P), z, a).sum().backward()
    q_const = torch.tensor([Q], dtype=torch.float64)
    z_ref = logits(Q).clone().requires_grad_(True)
    q = torch.softmax(z_ref, -1)
    mix = (1 - a) * torch.tensor([P], dtype=torch.float64) + a * q_const
    (q * (torch.log(q) - torch.log(mix))).sum().backward()
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-10)
    z_full = logits(Q).clone().requires_grad_(True)  # without the stop-gradient the gradient differs
    qf = torch.softmax(z_full, -1)
    (qf * (torch.log(qf) - torch.log((1 - a) * torch.tensor([P], dtype=torch.float64) + a * qf))).sum().backward()
    assert not torch.allclose(z.grad, z_full.grad, atol=1e-6)


def test_skl_gradient_flows_through_the_student_only():
    zt = logits(P).clone().requires_grad_(True)
    zs = logits(Q).clone().requires_grad_(True)
    d.skl(zt, zs, 0.1).sum().backward()
    assert zs.grad.abs().sum() > 0


def test_loss_terms_weights():
    assert d.loss_terms("distillm_v2", 1.5) == [("chosen", "skl", 0.5), ("rejected", "srkl", 1.5)]
    assert [t[1] for t in d.loss_terms("distillm_v1", 1.0)] == ["srkl", "srkl"]
    with pytest.raises(SystemExit, match="unknown LOSS_TYPE"):
        d.loss_terms("dpo", 1.0)


def test_gradual_beta_schedule():
    assert d.scheduled_beta(1.0, 0, 100, True) == 1.0
    assert d.scheduled_beta(1.0, 25, 100, True) == pytest.approx(1.25)
    assert d.scheduled_beta(1.0, 50, 100, True) == pytest.approx(1.5)
    assert d.scheduled_beta(1.0, 99, 100, True) == pytest.approx(1.5)
    assert d.scheduled_beta(0.7, 99, 100, False) == 0.7


def test_adaptive_alpha_formula_and_clipping():
    gap = torch.tensor([0.5, 0.2, 0.05, 0.0])
    alpha = d.adaptive_alpha(0.1, gap, torch.tensor(0.2))
    expected = [min(max(1 - 0.9 * 0.2 / (g + 1e-5), 0.01), 0.1) for g in gap.tolist()]
    assert alpha.tolist() == pytest.approx(expected, rel=1e-5)
    assert alpha[0] == pytest.approx(0.1) and alpha[-1] == pytest.approx(0.01)


def test_alpha_state_keeps_a_running_mean_per_side():
    state = d.AlphaState(momentum=0.5)
    state.alphas("chosen", 0.1, torch.tensor([0.2, 0.4]))
    assert state.mean["chosen"].item() == pytest.approx(0.3)
    state.alphas("chosen", 0.1, torch.tensor([0.1, 0.1]))
    assert state.mean["chosen"].item() == pytest.approx(0.2)
    assert "rejected" not in state.mean


# ----------------------------------------------------------------------------- template, masking, truncation
@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = lm.load_tokenizer(tiny_model_dir)
    t.padding_side = "right"
    return t


MC = dict(prompt=common.mc_messages("다음 중 전자금융거래법 정의로 옳은 것은?", ["금융", "보안", "정보", "답"]),
          prefix=common.MC_ANSWER_PREFIX, chosen="3", rejected="1")
DESC = dict(prompt=common.desc_messages("개인정보 보호법 목적을 설명하세요."), prefix="",
            chosen="개인정보 보호법은 금융보안 전문가 답하세요.<|im_end|>", rejected=" 핵심 용어 ")


def test_template_applied_once_and_matches_the_full_conversation(tok):
    enc = d.encode_example(tok, MC["prompt"], MC["prefix"], MC["chosen"])
    full = tok.apply_chat_template(MC["prompt"] + [{"role": "assistant", "content": MC["prefix"] + "3"}],
                                   tokenize=False)
    assert tok.decode(enc["input_ids"]) + "\n" == full  # the template writes "<|im_end|>\n" after a turn
    assert tok.decode(enc["input_ids"]).count("<|im_start|>system") == 1


def test_response_span_is_content_plus_one_end_of_turn(tok):
    enc = d.encode_example(tok, DESC["prompt"], DESC["prefix"], DESC["chosen"])
    resp = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    text = tok.decode(resp)
    assert text == "개인정보 보호법은 금융보안 전문가 답하세요.<|im_end|>"  # the duplicated end-of-turn is removed
    assert text.count("<|im_end|>") == 1 and "<|im_start|>" not in text and "system" not in text
    assert resp[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_mc_response_starts_with_the_digit_04_reads(tok):
    enc = d.encode_example(tok, MC["prompt"], MC["prefix"], "3")
    first = enc["labels"].index(next(l for l in enc["labels"] if l != -100))
    prompt_text = lm.render(tok, MC["prompt"], common.MC_ANSWER_PREFIX)
    assert enc["input_ids"][:first] == tok(prompt_text, add_special_tokens=False).input_ids
    assert enc["input_ids"][first] == lm.option_token_ids(tok, 4)[2]


def test_prompt_tokens_are_masked(tok):
    enc = d.encode_example(tok, DESC["prompt"], "", DESC["rejected"])
    n_prompt = len(tok(lm.render(tok, DESC["prompt"]), add_special_tokens=False).input_ids)
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert all(l != -100 for l in enc["labels"][n_prompt:])


def test_truncation_keeps_the_end_of_the_prompt(tok):
    full = d.encode_example(tok, MC["prompt"], MC["prefix"], "3", max_length=10_000)
    short = d.encode_example(tok, MC["prompt"], MC["prefix"], "3", max_length=12)
    assert len(short["input_ids"]) == 12
    assert short["input_ids"] == full["input_ids"][-12:]
    assert short["labels"][-2:] == full["labels"][-2:]


def test_long_response_is_cut_without_end_of_turn(tok):
    enc = d.encode_example(tok, DESC["prompt"], "", "금융보안 " * 50, max_length=512, max_response=8)
    resp = [i for i in enc["labels"] if i != -100]
    assert len(resp) == 8 and tok.convert_tokens_to_ids("<|im_end|>") not in resp


def test_collate_pads_right_and_masks_padding(tok):
    batch = d.collate([d.encode_pair(tok, MC), d.encode_pair(tok, DESC)], tok.pad_token_id)
    for side in ("chosen", "rejected"):
        ids, att, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        assert ids.shape == att.shape == labels.shape
        assert (labels[att == 0] == -100).all() and (ids[att == 0] == tok.pad_token_id).all()


def test_a_multiple_choice_answer_is_its_digit_alone(tok):
    enc = d.encode_pair(tok, dict(MC, kind="mc"))
    for side, digit in (("chosen", "3"), ("rejected", "1")):
        response = [x for x in enc[f"{side}_labels"] if x != -100]
        assert response == tok(digit, add_special_tokens=False).input_ids  # one position, no end-of-turn
    assert enc["chosen_input_ids"][:-1] == enc["rejected_input_ids"][:-1]  # the same prompt before the digits
    desc = d.encode_pair(tok, dict(DESC, kind="desc"))
    assert [x for x in desc["chosen_labels"] if x != -100][-1] == tok.convert_tokens_to_ids(d.END_OF_TURN)


def test_response_positions_shift_by_one():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    rows, pos, targets = d.response_positions(labels)
    assert rows.tolist() == [0, 0, 1] and pos.tolist() == [1, 2, 0] and targets.tolist() == [7, 8, 5]


# ----------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    teacher_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), seed=1)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return student, teacher, teacher_dir


@pytest.fixture(scope="module")
def batch(tok):
    return d.collate([d.encode_pair(tok, MC), d.encode_pair(tok, DESC)], tok.pad_token_id)


@pytest.mark.parametrize("loss_type", d.LOSS_TYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_chunked_loss_and_gradient_equal_the_naive_version(models, batch, tok, loss_type, adaptive):
    student, teacher, _ = models
    results = []
    for chunk in (0, 3):
        student.zero_grad()
        cfg = d.LossConfig(loss_type=loss_type, chunk=chunk, adaptive_alpha=adaptive,
                           vocab_size=len(tok.get_vocab()))
        loss, _ = d.distill_loss(student, teacher, batch, cfg, alpha_state=d.AlphaState())
        loss.backward()
        results.append((loss.item(), student.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


MC_PAIRS = [dict(MC, kind="mc"), dict(MC, kind="mc", prompt=common.mc_messages("전자서명법 목적으로 옳은 것은?",
                                                                               ["가", "나", "다", "라", "마"]),
                                          chosen="5", rejected="2")]


@pytest.mark.parametrize("loss_type", d.LOSS_TYPES)
@pytest.mark.parametrize("stored", [False, True])
def test_one_forward_for_pairs_that_share_their_context(models, tok, loss_type, stored):
    student, teacher, _ = models
    vocab = len(tok.get_vocab())
    batch = d.collate([d.encode_pair(tok, p) for p in MC_PAIRS], tok.pad_token_id)
    data, ranges = d.stack_sides(batch, ["chosen", "rejected"])
    assert d.shared_context(data, ranges)
    if stored:
        batch = with_stored_topk(batch, teacher, vocab, vocab)
    calls, results = [], []
    hook = student.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]
                                                                         if args else None))
    for share in (False, True):
        student.zero_grad()
        cfg = d.LossConfig(loss_type=loss_type, chunk=3, vocab_size=vocab, share_context=share)
        loss, _ = d.distill_loss(student, None if stored else teacher, batch, cfg)
        loss.backward()
        results.append((loss.item(), student.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    hook.remove()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert len(calls) == 2  # one student forward per call either way (the sides are stacked)
    mixed = d.collate([d.encode_pair(tok, dict(DESC, kind="desc")), d.encode_pair(tok, MC_PAIRS[0])],
                      tok.pad_token_id)
    assert not d.shared_context(*d.stack_sides(mixed, ["chosen", "rejected"]))  # other answers, other contexts


def test_adaptive_alpha_takes_effect(models, batch):
    student, teacher, _ = models
    fixed, _ = d.distill_loss(student, teacher, batch, d.LossConfig(chunk=4))
    adaptive, parts = d.distill_loss(student, teacher, batch, d.LossConfig(chunk=4, adaptive_alpha=True),
                                     alpha_state=d.AlphaState())
    # two samples: the one below the mean gap gets alpha 0.01, the other keeps 0.1
    assert parts["chosen_alpha"] == pytest.approx((0.1 + 0.01) / 2, rel=1e-4)
    assert adaptive.item() != pytest.approx(fixed.item(), rel=1e-4)


def test_padding_does_not_change_the_loss(models, tok):
    student, teacher, _ = models
    cfg = d.LossConfig(chunk=4)
    alone = d.collate([d.encode_pair(tok, MC)], tok.pad_token_id)
    padded = d.collate([d.encode_pair(tok, MC), d.encode_pair(tok, DESC)], tok.pad_token_id)
    with torch.no_grad():
        loss_alone, p_alone = d.distill_loss(student, teacher, alone, cfg)
        _, p_pair = d.distill_loss(student, teacher, {k: v[:1] for k, v in padded.items()}, cfg)
    assert p_alone["chosen_skl"] == pytest.approx(p_pair["chosen_skl"], rel=1e-4)


def test_a_few_lora_steps_lower_the_loss(tiny_model_dir, models, batch, tok):
    _, teacher, _ = models
    student = d.lora_student(tiny_model_dir, torch.float32, gradient_checkpointing=True).train()
    optim = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    cfg = d.LossConfig(chunk=4, vocab_size=len(tok.get_vocab()))
    losses = []
    for _ in range(8):
        loss, _ = d.distill_loss(student, teacher, batch, cfg)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def test_trainer_saves_a_standard_adapter_and_merges(tiny_model_dir, models, tmp_path, monkeypatch):
    _, _, teacher_dir = models
    pairs = write_pairs(tmp_path / "pairs.jsonl", [MC, DESC] * 2)
    monkeypatch.setattr(d, "LORA_DROPOUT", 0.0)
    out = tmp_path / "adapter"
    meta, main = d.train(pairs, out, tmp_path / "run", d.LossConfig(chunk=4), 1, str(tiny_model_dir),
                         str(teacher_dir))
    assert main and (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "DONE").exists() and meta["n_pairs"] == 4 and len(meta["pairs_sha256"]) == 64
    assert meta["world_size"] == 1 and meta["ranks"][0]["teacher_device"] == "cpu" and "peak_gpu_gib" in meta
    assert json.loads((out / "meta.json").read_text())["loss_config"]["loss_type"] == "distillm_v2"
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # the steps moved the adapter (no LR-0 warm-up step)
    merged = d.merge_adapter(out, str(tiny_model_dir), tmp_path / "merged")
    model = lm.load_model(str(merged), "cpu", torch.float32)  # what 04_infer.py --model does
    assert model.config.vocab_size == 300 and (merged / "meta.json").exists() and (merged / "tokenizer.json").exists()


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    run = tmp_path / "run"
    assert d.fresh_or_resumable(run, dict(a=1)) is False
    (run / "checkpoint-10").mkdir()
    assert d.fresh_or_resumable(run, dict(a=1)) is True
    assert d.fresh_or_resumable(run, dict(a=2)) is False and not (run / "checkpoint-10").exists()


# ----------------------------------------------------------------------------- the stored top-k
def with_stored_topk(batch, teacher, k, vocab, temperature=1.0):
    """The batch with the teacher's top-k at every response position, as --store-topk writes it."""
    batch = dict(batch)
    head = d.output_head(teacher)
    for side in ("chosen", "rejected"):
        rows, pos, targets = d.response_positions(batch[f"{side}_labels"])
        with torch.no_grad():
            hidden = d.teacher_hidden(teacher, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            stored = d.teacher_topk(d.head_logits(head, hidden[rows, pos], vocab), targets, k, temperature)
        batch.update({f"{side}_topk_{f}": v for f, v in stored.items()})
    return batch


@pytest.mark.parametrize("loss_type", d.LOSS_TYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_topk_loss_equals_the_full_vocabulary_loss_when_k_covers_it(models, batch, tok, loss_type, adaptive):
    student, teacher, _ = models
    vocab = len(tok.get_vocab())
    stored = with_stored_topk(batch, teacher, vocab, vocab, temperature=1.5)
    results = []
    for b, t in ((batch, teacher), (stored, None)):  # the teacher loaded, then only its stored distribution
        student.zero_grad()
        cfg = d.LossConfig(loss_type=loss_type, chunk=3, adaptive_alpha=adaptive, vocab_size=vocab, temperature=1.5)
        loss, _ = d.distill_loss(student, t, b, cfg, alpha_state=d.AlphaState())
        loss.backward()
        results.append((loss.item(), student.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def peaked_logits(n, vocab, gen, candidates=32, boost=(8.0, 16.0)):
    """Logits of a peaked next-token distribution: a unit-normal bulk over the vocabulary and `candidates` tokens
    boosted by 8-16 (the teacher's mass outside its top 64 is then ~0.5% on average, ~2% at most)."""
    logits = torch.randn(n, vocab, generator=gen)
    ids = torch.randint(0, vocab, (n, candidates), generator=gen)
    return logits.scatter_add(1, ids, boost[0] + (boost[1] - boost[0]) * torch.rand(n, candidates, generator=gen))


@pytest.mark.parametrize("name", ["skl", "srkl", "fkl", "tvd", "gjsd"])
def test_topk_loss_stays_within_two_percent_at_the_default_k(name):
    """The stated bound: at TOPK = 64 on peaked teachers over Qwen2.5's 151,936 ids, with a student near the teacher,
    the bucketed divergence is below the full one (data processing inequality) by less than 2%."""
    vocab, gen = 151_936, torch.Generator().manual_seed(0)
    t_logits = peaked_logits(32, vocab, gen)
    s_logits = t_logits + torch.randn(32, vocab, generator=gen)
    targets = torch.randint(0, vocab, (32,), generator=gen)
    cfg = d.LossConfig(vocab_size=vocab)
    stored = d.teacher_topk(t_logits, targets, d.TOPK)
    assert 0.001 < stored["rest"].exp().mean() < 0.02  # the case the bound is stated for
    lp, lq = d.topk_buckets(stored["ids"], stored["logprobs"], stored["rest"], d.log_probs(s_logits))
    full = d.token_divergence(name, t_logits, s_logits, targets, 0.1, cfg).mean().item()
    bucketed = d.token_divergence(name, lp, lq, targets, 0.1, cfg).mean().item()
    assert 0 <= (full - bucketed) / full < 0.02


def test_store_topk_is_resumable_and_training_reads_it(tiny_model_dir, models, tmp_path, monkeypatch):
    _, _, teacher_dir = models
    monkeypatch.setattr(d, "TOPK_DIR", tmp_path / "01_topk")
    monkeypatch.setattr(d, "TOPK_SHARD", 3)
    pairs = write_pairs(tmp_path / "pairs.jsonl", [MC, DESC] * 2)
    meta = d.store_topk(pairs, d.topk_dir(d.TEMPERATURE), str(teacher_dir), str(tiny_model_dir))
    store = tmp_path / "01_topk"
    assert meta["n_pairs"] == 4 and sorted(p.name for p in store.glob("shard-*")) == ["shard-00000.safetensors",
                                                                                      "shard-00001.safetensors"]
    assert (store / "DONE").exists() and "peak_gpu_gib" in meta
    (store / "shard-00001.safetensors").unlink()  # a kill before the last shard: only that one is written again
    (store / "DONE").unlink()
    first = (store / "shard-00000.safetensors").stat().st_mtime_ns
    d.store_topk(pairs, store, str(teacher_dir), str(tiny_model_dir))
    assert (store / "shard-00001.safetensors").exists() and (store / "shard-00000.safetensors").stat().st_mtime_ns \
        == first
    monkeypatch.setattr(d, "LORA_DROPOUT", 0.0)
    out = tmp_path / "adapter"
    trained, _ = d.train(pairs, out, tmp_path / "run", d.LossConfig(chunk=4), 2, str(tiny_model_dir),
                         str(teacher_dir), source="topk")
    assert trained["teacher_source"] == "topk" and trained["ranks"][0]["teacher_device"] is None
    assert (out / "DONE").exists() and all(h["loss"] > 0 for h in trained["history"])
    vocab = len(lm.load_tokenizer(tiny_model_dir).get_vocab())
    with pytest.raises(SystemExit, match="make topk"):  # another temperature has no store yet
        d.load_topk(d.topk_dir(2.0), d.topk_inputs(pairs, str(teacher_dir), vocab, 2.0))
    with pytest.raises(SystemExit, match="answer positions"):  # the encoding changed since the store was written
        d.with_topk([d.encode_pair(tok_of(tiny_model_dir), DESC)], d.load_topk(store, d.topk_inputs(
            pairs, str(teacher_dir), vocab, d.TEMPERATURE)))


def test_the_top_k_recorded_by_00_is_what_the_teacher_gives_and_needs_no_teacher(tiny_model_dir, models, tmp_path,
                                                                                 monkeypatch):
    """00 answers each question once and keeps the top-k of the answer position (00_generate_pairs.answer_position);
    --store-topk turns that into the store without loading the teacher, equal to what the teacher's forward over
    the training encoding gives. The privileged target reads teacher_prompt, the student trains on prompt."""
    _, teacher, teacher_dir = models
    pairs_step = importlib.import_module("00_generate_pairs")
    tok = lm.load_tokenizer(teacher_dir)
    passage = common.mc_messages("다음 중 전자금융거래법 정의로 옳은 것은?", ["금융", "보안", "정보", "답"], context="제2조 정의 금융")
    pairs = [dict(p, teacher_prompt=passage if i == 0 else common.mc_messages("전자서명법 목적으로 옳은 것은?", [
        "가", "나", "다", "라", "마"], context="전자서명 보안")) for i, p in enumerate(MC_PAIRS)]
    k = d.TOPK
    for pair in pairs:
        pair["teacher_topk"] = {}
        for target, key in d.TARGET_PROMPT.items():
            rendered = lm.render(tok, pair[key], pair["prefix"])
            n = len(competition.split_options(pair["prompt"][-1]["content"])[1])  # 00 records digits 1-5 at least
            pair["teacher_topk"][target] = pairs_step.answer_position(teacher, tok, [rendered],
                                                                      lm.option_token_ids(tok, max(n, 5)), k + 4)[0][1]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    vocab = len(tok.get_vocab())
    train_tok = d.training_tokenizer(str(tiny_model_dir))
    for target in d.TOPK_TARGETS:
        recorded = d.recorded_topk(train_tok, pairs, target, k, 1.0, mc_target="topk")
        forward = d.pairs_topk(teacher, train_tok, pairs, 0, vocab, 1.0, k, 2, prompt_key=d.TARGET_PROMPT[target])
        assert set(recorded) == set(forward)
        for key in forward:
            if key.endswith("ids"):
                assert recorded[key].tolist() == forward[key].tolist()
            else:
                assert torch.allclose(recorded[key], forward[key], atol=1e-4), key
        # "options": the digits 1-5 and one bucket, the whole distribution coarse-grained
        options = d.recorded_topk(train_tok, pairs, target, k, 1.0, mc_target="options")
        full = d.pairs_topk(teacher, train_tok, pairs, 0, vocab, 1.0, vocab, 2, prompt_key=d.TARGET_PROMPT[target])
        digits = lm.option_token_ids(tok, 5)
        for i in range(len(pairs)):
            assert options[f"{i}/chosen/ids"].tolist() == [digits]
            probs = torch.zeros(vocab).scatter(0, full[f"{i}/chosen/ids"][0].long(),
                                               full[f"{i}/chosen/logprobs"][0].exp())
            assert torch.allclose(options[f"{i}/chosen/logprobs"][0].exp(), probs[digits], atol=1e-5)
            assert options[f"{i}/chosen/rest"].exp().item() == pytest.approx(1 - probs[digits].sum().item(), abs=1e-5)
    monkeypatch.setattr(d, "TOPK_DIR", tmp_path / "01_topk")
    monkeypatch.setattr(lm, "load_teacher", lambda *a, **kw: pytest.fail("the teacher was loaded"))
    meta = d.store_topk(path, d.topk_dir(1.0, "context"), str(teacher_dir), str(tiny_model_dir), k=k,
                        target="context")
    assert meta["source"].startswith("00's") and meta["inputs"]["target"] == "context"
    plain = d.topk_dir(1.0, "plain")
    assert plain.name == "01_topk" and d.topk_dir(1.0, "context").name == "01_topk-context"  # plain: the default
    trained, _ = d.train(path, tmp_path / "adapter", tmp_path / "run", d.LossConfig(chunk=4), 1, str(tiny_model_dir),
                         str(teacher_dir), source="topk", target="context")
    assert trained["topk_target"] == "context"
    with pytest.raises(SystemExit, match=r"make topk` \(01_train_distillm.py --store-topk\)"):  # not stored yet
        d.train(path, tmp_path / "adapter2", tmp_path / "run2", d.LossConfig(chunk=4), 1, str(tiny_model_dir),
                str(teacher_dir), source="topk", target="plain")
    assert d.recorded_topk(d.training_tokenizer(str(tiny_model_dir)), [MC], "context", k, 1.0) is None  # no record


def tok_of(path):
    return d.training_tokenizer(str(path))


def test_store_topk_is_a_stamp_where_training_loads_the_teacher(tmp_path):
    d.skip_topk(tmp_path / "01_topk", "cpu")
    meta = json.loads((tmp_path / "01_topk" / "meta.json").read_text())
    assert (tmp_path / "01_topk" / "DONE").exists() and "TEACHER_SOURCE[cpu] is 'model'" in meta["skipped"]


def test_steps_come_from_epochs_pairs_batch_accumulation_and_world_size():
    assert d.train_steps(1.35, 88, 2, 2, 1) == 30  # the first CPU runs: 30 steps of 4 pairs
    assert d.train_steps(2.0, 5000, 4, 4, 8) == 79  # 10,000 pair passes / 128 pairs per step
    assert d.train_steps(2.0, 5000, 4, 4, 1) == 625 and d.train_steps(1.0, 3, 4, 4, 2) == 1


def test_several_processes_refuse_a_shared_teacher_device(tiny_model_dir, models, tmp_path, monkeypatch):
    _, _, teacher_dir = models
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(lm, "TEACHER_DEVICE", "auto")
    pairs = write_pairs(tmp_path / "pairs.jsonl", [MC, DESC])
    with pytest.raises(SystemExit, match="every rank's teacher on the same GPUs"):
        d.train(pairs, tmp_path / "a", tmp_path / "run", d.LossConfig(), 1, str(tiny_model_dir), str(teacher_dir))
