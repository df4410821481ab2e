"""Distil the teacher into the student with DistiLLM-2 (Ko et al., ICML 2025) and LoRA.

Reads outputs/00_pairs/pairs.jsonl (`make pairs`: prompts with a teacher answer = chosen and a student answer =
rejected) and both models. Writes the LoRA adapter (adapter_config.json, adapter_model.safetensors), meta.json
(settings, data hash, losses, timings, versions) and DONE into models/student-distilled/ (or --out), resumable
Trainer checkpoints into outputs/01_train/<name>/, and with --merge a full model directory (adapter merged into
the base, tokenizer, meta.json) that `04_infer.py --model DIR` loads as is. Run by `make distill`; `make sweep`
(sweep_distill.py) calls it per grid point; `--measure` times naive vs chunked loss steps (reports/distill.md).

Loss API (pure functions on logits; p = teacher, q = student, both at temperature tau, sliced to the shared
vocabulary; every divergence returns one value per token position):
    skl(t_logits, s_logits, alpha, tau)     SKL_a(p||q)  = sum_v p [log p - log(a p + (1-a) q)]
    srkl(t_logits, s_logits, alpha, tau)    SRKL_a(q||p) = sum_v q [log q - log((1-a) p + a sg[q])]
    forward_kl, tvd, gjsd (mixture GKD_MIX), nll (of the answer tokens)
    distill_loss(student, teacher, batch, cfg)   the per-batch loss of a loss type, chunked over response tokens
Multi-GPU: `accelerate launch --num_processes N 01_train_distillm.py` (one teacher copy per process).
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
import lm

# ----------------------------------------------------------------------------- settings
LOSS_TYPE = "distillm_v2"  # distillm_v2 | distillm_v1 | kd | seqkd | gkd | tvd
ALPHA1 = 0.1  # SKL mixture weight on teacher answers (paper default)
ALPHA2 = 0.1  # SRKL mixture weight on student answers (paper default)
BETA = 1.0  # distillm_v2 = (2 - beta) SKL(chosen) + beta SRKL(rejected)
TEMPERATURE = 1.0  # tau for both distributions
GRADUAL_BETA = False  # beta(s) = 1 + 0.5 min(1, 2s/S): weight moves to the student's own answers
ADAPTIVE_ALPHA = False  # alpha = clip(1 - (1-a0) m / (d + 1e-5), 0.01, a0), d = geometric-mean probability gap
ADAPTIVE_MOMENTUM = 0.9  # running mean m of the gap d (exponential, per side)
GKD_MIX = 0.9  # generalized JSD: m = 0.9 p + 0.1 q (Agarwal et al. 2024)
LOSS_CHUNK = 128  # response positions per logits chunk; 0 = naive full [batch, length, vocab] logits
MAX_LENGTH = 512  # tokens per sequence; the prompt is cut from the left, keeping the end and the prefix (the
# template multiple-choice prompts of 00 are 300-480 tokens: 256 cut their stems)
MAX_RESPONSE = 128  # response tokens kept (a cut response has no end-of-turn token)
END_OF_TURN = "<|im_end|>"  # ChatML end of an assistant turn (checked against the chat template in the tests)

LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LEARNING_RATE = 2e-4
BATCH_PAIRS = 2  # pairs per device step (each pair is a teacher answer and a student answer sequence)
GRAD_ACCUM = 2  # effective batch 4 pairs
MAX_STEPS = 30  # optimizer steps: ~1.4 epochs of the 88 CPU pairs at batch 4 (GPU, thousands of pairs: ~2 epochs)
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.0
GRADIENT_CHECKPOINTING = dict(cpu=False, cuda=True)  # per device: the CPU has the memory for short sequences
MEASURE_GRADIENT_CHECKPOINTING = True  # --measure: as in reports/distill.md's naive-vs-chunked comparison
STUDENT_TRAIN_DTYPE = "bfloat16"  # CPU bf16 matmul is 2.4x fp32 (README); adapters and loss stay fp32
TEACHER_DTYPE = "bfloat16"
SAVE_STEPS = 10  # Trainer checkpoint interval (resume after a kill)
LOG_STEPS = 1
MEASURE_STEPS = 2  # --measure: steps per variant (the first is warm-up; s/step is the mean of the rest)
MEASURE_BATCH, MEASURE_LENGTH = 4, 256  # --measure: sequences x tokens per step; the second half is the answer
# -----------------------------------------------------------------------------

LOSS_TYPES = ("distillm_v2", "distillm_v1", "kd", "seqkd", "gkd", "tvd")


@dataclass
class LossConfig:
    loss_type: str = LOSS_TYPE
    alpha1: float = ALPHA1
    alpha2: float = ALPHA2
    beta: float = BETA
    temperature: float = TEMPERATURE
    gradual_beta: bool = GRADUAL_BETA
    adaptive_alpha: bool = ADAPTIVE_ALPHA
    gkd_mix: float = GKD_MIX
    chunk: int = LOSS_CHUNK
    vocab_size: int = 0  # shared vocabulary; 0 = all logits


# ----------------------------------------------------------------------------- divergences (per token)
def log_probs(logits, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def log_mixture(log_a, log_b, weight_a):
    """log(w a + (1 - w) b) from log a and log b; weight_a a float or a tensor broadcastable to them, in (0, 1)."""
    w = torch.as_tensor(weight_a, dtype=log_a.dtype, device=log_a.device)
    return torch.logaddexp(log_a + torch.log(w), log_b + torch.log1p(-w))


def _token_alpha(alpha, like):
    """A per-token alpha tensor [..., 1] (broadcast over the vocabulary) or a plain float."""
    if torch.is_tensor(alpha):
        return alpha.to(like.dtype).reshape(*alpha.shape, 1)
    return float(alpha)


def skl(t_logits, s_logits, alpha, temperature=1.0):
    """Skew KL (DistiLLM eq. 3): sum_v p [log p - log(alpha p + (1 - alpha) q)]; gradient through q."""
    lp, lq = log_probs(t_logits, temperature), log_probs(s_logits, temperature)
    return (lp.exp() * (lp - log_mixture(lp, lq, _token_alpha(alpha, lp)))).sum(-1)


def srkl(t_logits, s_logits, alpha, temperature=1.0):
    """Skew reverse KL (DistiLLM-2 eq. 6): sum_v q [log q - log((1 - alpha) p + alpha sg[q])].

    The student inside the mixture is detached, as in the paper's release: the gradient flows only through the
    outer q and log q."""
    lp, lq = log_probs(t_logits, temperature), log_probs(s_logits, temperature)
    return (lq.exp() * (lq - log_mixture(lq.detach(), lp, _token_alpha(alpha, lq)))).sum(-1)


def forward_kl(t_logits, s_logits, temperature=1.0):
    """KL(p || q) (Hinton-style KD)."""
    lp, lq = log_probs(t_logits, temperature), log_probs(s_logits, temperature)
    return (lp.exp() * (lp - lq)).sum(-1)


def tvd(t_logits, s_logits, temperature=1.0):
    """Total variation 0.5 sum_v |p - q|."""
    return 0.5 * (log_probs(t_logits, temperature).exp() - log_probs(s_logits, temperature).exp()).abs().sum(-1)


def gjsd(t_logits, s_logits, mix=GKD_MIX, temperature=1.0):
    """Generalized JSD (GKD, Agarwal et al. 2024): mix KL(p || m) + (1 - mix) KL(q || m), m = mix p + (1 - mix) q."""
    lp, lq = log_probs(t_logits, temperature), log_probs(s_logits, temperature)
    lm_ = log_mixture(lp, lq, mix)
    return mix * (lp.exp() * (lp - lm_)).sum(-1) + (1 - mix) * (lq.exp() * (lq - lm_)).sum(-1)


def nll(s_logits, targets):
    """Negative log-likelihood of the target tokens under the student (temperature 1)."""
    return -log_probs(s_logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_divergence(name, t_logits, s_logits, targets, alpha, cfg):
    """Dispatch one divergence by name on matching [..., V] logits; returns [...]."""
    tau = cfg.temperature
    if name == "skl":
        return skl(t_logits, s_logits, alpha, tau)
    if name == "srkl":
        return srkl(t_logits, s_logits, alpha, tau)
    if name == "fkl":
        return forward_kl(t_logits, s_logits, tau)
    if name == "tvd":
        return tvd(t_logits, s_logits, tau)
    if name == "gjsd":
        return gjsd(t_logits, s_logits, cfg.gkd_mix, tau)
    if name == "nll":
        return nll(s_logits, targets)
    raise ValueError(f"unknown divergence {name!r}")


def loss_terms(loss_type, beta):
    """[(side, divergence, weight)] of a loss type; side 'chosen' = teacher answers, 'rejected' = student answers."""
    terms = {"distillm_v2": [("chosen", "skl", 2.0 - beta), ("rejected", "srkl", beta)],
             "distillm_v1": [("chosen", "srkl", 1.0), ("rejected", "srkl", 1.0)],
             "kd": [("chosen", "fkl", 1.0)],
             "seqkd": [("chosen", "nll", 1.0)],
             "gkd": [("chosen", "gjsd", 1.0), ("rejected", "gjsd", 1.0)],
             "tvd": [("chosen", "tvd", 1.0), ("rejected", "tvd", 1.0)]}
    if loss_type not in terms:
        raise SystemExit(f"unknown LOSS_TYPE {loss_type!r}: use one of {', '.join(LOSS_TYPES)}.")
    return terms[loss_type]


def scheduled_beta(beta, step, max_steps, gradual):
    """beta, or the gradual schedule 1 + 0.5 min(1, 2 s / S) (DistiLLM-2 sec. 3.3)."""
    if not gradual:
        return beta
    return 1.0 + 0.5 * min(1.0, 2.0 * step / max(max_steps, 1))


def adaptive_alpha(alpha0, gap, running_mean):
    """Per-sample alpha = clip(1 - (1 - alpha0) m / (d + 1e-5), 0.01, alpha0): a sample whose teacher-student gap d
    is below the running mean m gets a smaller alpha (closer to the plain divergence)."""
    return (1.0 - (1.0 - alpha0) * running_mean / (gap + 1e-5)).clamp(0.01, alpha0)


def per_sequence_mean(token_values, seq_index, n_seq):
    """Mean of token values per sequence (sequences with no tokens get 0)."""
    sums = torch.zeros(n_seq, dtype=token_values.dtype, device=token_values.device).index_add(0, seq_index,
                                                                                                token_values)
    counts = torch.bincount(seq_index, minlength=n_seq).clamp(min=1).to(token_values.dtype)
    return sums / counts


# ----------------------------------------------------------------------------- model outputs
def response_positions(labels):
    """(row, position, target) of every position whose next token is a response token (labels != -100)."""
    mask = labels[:, 1:] != -100
    rows, pos = mask.nonzero(as_tuple=True)
    return rows, pos, labels[:, 1:][rows, pos]


def output_head(model):
    """The lm_head of a (peft / DDP wrapped) causal LM."""
    inner = model.module if hasattr(model, "module") else model
    return inner.get_output_embeddings()


def last_hidden(model, input_ids, attention_mask):
    """Final-norm hidden states [B, T, H] through the model's own forward (so DDP and peft hooks run); the logits
    of one position only are computed."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                use_cache=False)
    return out.hidden_states[-1]


def _chunk_divergence(s_hidden, t_hidden, targets, alpha, s_head, t_head, name, cfg):
    s_logits = s_head(s_hidden)
    with torch.no_grad():
        t_logits = t_head(t_hidden)
    v = cfg.vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
    return token_divergence(name, t_logits[..., :v].float(), s_logits[..., :v].float(), targets, alpha, cfg)


def chunked_token_divergence(name, s_hidden, t_hidden, targets, alpha, s_head, t_head, cfg):
    """Divergence at gathered response positions [N, H], lm_heads applied chunk by chunk under activation
    checkpointing: in forward and backward only one [chunk, V] pair of logits exists at a time."""
    out = []
    for start in range(0, s_hidden.shape[0], cfg.chunk):
        sl = slice(start, start + cfg.chunk)
        a = alpha[sl] if torch.is_tensor(alpha) else alpha
        if torch.is_grad_enabled() and s_hidden.requires_grad:
            out.append(checkpoint(_chunk_divergence, s_hidden[sl], t_hidden[sl], targets[sl], a, s_head, t_head,
                                  name, cfg, use_reentrant=False))
        else:
            out.append(_chunk_divergence(s_hidden[sl], t_hidden[sl], targets[sl], a, s_head, t_head, name, cfg))
    return torch.cat(out) if out else s_hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def geometric_mean_probs(s_hidden, t_hidden, targets, rows, n_seq, s_head, t_head, cfg):
    """Per-sequence geometric-mean probability of the answer tokens under teacher and student."""
    lp_all, lq_all = [], []
    for start in range(0, s_hidden.shape[0], max(cfg.chunk, 1)):
        sl = slice(start, start + max(cfg.chunk, 1))
        s_logits, t_logits = s_head(s_hidden[sl]), t_head(t_hidden[sl])
        v = cfg.vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
        tgt = targets[sl].unsqueeze(-1)
        lp_all.append(log_probs(t_logits[..., :v], cfg.temperature).gather(-1, tgt).squeeze(-1))
        lq_all.append(log_probs(s_logits[..., :v], cfg.temperature).gather(-1, tgt).squeeze(-1))
    lp, lq = torch.cat(lp_all), torch.cat(lq_all)
    return per_sequence_mean(lp, rows, n_seq).exp(), per_sequence_mean(lq, rows, n_seq).exp()


class AlphaState:
    """Running mean of the teacher-student gap per side, for adaptive alpha (the batch mean at the first step)."""

    def __init__(self, momentum=ADAPTIVE_MOMENTUM):
        self.momentum, self.mean = momentum, {}

    def alphas(self, side, alpha0, gap):
        batch_mean = gap.mean()
        m = self.mean.get(side, batch_mean)
        alpha = adaptive_alpha(alpha0, gap, m)
        self.mean[side] = self.momentum * m + (1 - self.momentum) * batch_mean
        return alpha


def stack_sides(batch, sides):
    """One [sum B, T] batch of the sides' rows (right-padded to one width) and the row range of each side."""
    width = max(batch[f"{s}_input_ids"].shape[1] for s in sides)
    parts, ranges, start = {"input_ids": [], "attention_mask": [], "labels": []}, {}, 0
    for s in sides:
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            t = batch[f"{s}_{key}"]
            parts[key].append(F.pad(t, (0, width - t.shape[1]), value=fill))
        n = batch[f"{s}_input_ids"].shape[0]
        ranges[s], start = (start, start + n), start + n
    return {k: torch.cat(v) for k, v in parts.items()}, ranges


def distill_loss(student, teacher, batch, cfg, step=0, max_steps=1, alpha_state=None):
    """Loss of one batch and a dict of logged parts.

    batch: {side}_input_ids / _attention_mask / _labels [B, T] for side in chosen, rejected (labels -100 on the
    prompt). The sides a loss type needs go through one student forward and one no-grad teacher forward; each
    divergence is averaged over a sequence's response tokens, then over the side's sequences, and the terms are
    weighted per loss_terms. cfg.chunk = 0 is the naive version: full [B, T, V] logits of both models, masked
    afterwards; otherwise only response positions get logits, cfg.chunk positions at a time.
    """
    beta = scheduled_beta(cfg.beta, step, max_steps, cfg.gradual_beta)
    terms = loss_terms(cfg.loss_type, beta)
    sides = [s for s in ("chosen", "rejected") if any(t[0] == s for t in terms)]
    data, ranges = stack_sides(batch, sides)
    rows, pos, targets = response_positions(data["labels"])
    s_head, t_head = output_head(student), output_head(teacher)
    if cfg.chunk:
        s_h = last_hidden(student, data["input_ids"], data["attention_mask"])[rows, pos]
        with torch.no_grad():
            t_h = last_hidden(teacher, data["input_ids"], data["attention_mask"])[rows, pos]
    else:
        s_logits = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"], use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                               use_cache=False).logits
        v = cfg.vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
        s_logits, t_logits = s_logits[:, :-1, :v].float(), t_logits[:, :-1, :v].float()
    total, parts = 0.0, dict(beta=beta)
    for side, name, weight in terms:
        lo, hi = ranges[side]
        sel = (rows >= lo) & (rows < hi)
        side_rows, n_seq = rows[sel] - lo, hi - lo
        alpha = cfg.alpha1 if side == "chosen" else cfg.alpha2
        if cfg.chunk:
            if cfg.adaptive_alpha and name in ("skl", "srkl"):
                gp, gq = geometric_mean_probs(s_h[sel].detach(), t_h[sel], targets[sel], side_rows, n_seq, s_head,
                                              t_head, cfg)
                alpha = (alpha_state or AlphaState()).alphas(side, alpha, (gp - gq).abs())
                parts[f"{side}_alpha"] = alpha.mean().item()
                alpha = alpha[side_rows]
            tok = chunked_token_divergence(name, s_h[sel], t_h[sel], targets[sel], alpha, s_head, t_head, cfg)
        else:
            s_side, t_side = s_logits[lo:hi], t_logits[lo:hi]
            side_pos = pos[sel]
            if cfg.adaptive_alpha and name in ("skl", "srkl"):
                with torch.no_grad():
                    tgt = targets[sel].unsqueeze(-1)
                    lp = log_probs(t_side[side_rows, side_pos], cfg.temperature).gather(-1, tgt).squeeze(-1)
                    lq = log_probs(s_side[side_rows, side_pos], cfg.temperature).gather(-1, tgt).squeeze(-1)
                    gap = (per_sequence_mean(lp, side_rows, n_seq).exp()
                           - per_sequence_mean(lq, side_rows, n_seq).exp()).abs()
                alpha = (alpha_state or AlphaState()).alphas(side, alpha, gap)
                parts[f"{side}_alpha"] = alpha.mean().item()
                alpha = alpha[:, None].expand(-1, s_side.shape[1])
            full_targets = data["labels"][lo:hi, 1:].clamp(min=0)
            tok = token_divergence(name, t_side, s_side, full_targets, alpha, cfg)[side_rows, side_pos]
        seq = per_sequence_mean(tok, side_rows, n_seq)
        parts[f"{side}_{name}"] = seq.mean().item()
        total = total + weight * seq.mean()
    return total, parts


# ----------------------------------------------------------------------------- data
def render_prompt(tokenizer, messages, prefix=""):
    """The prompt exactly as 04_infer.py renders it: chat template with the generation prompt, then the prefix."""
    return lm.render(tokenizer, messages, prefix)


def clean_response(text, end_of_turn=END_OF_TURN):
    """Answer content without surrounding whitespace or a trailing end-of-turn / eos string (added once later)."""
    text = text.strip()
    while text.endswith(end_of_turn):
        text = text[:-len(end_of_turn)].rstrip()
    return text


def encode_example(tokenizer, messages, prefix, response, max_length=MAX_LENGTH, max_response=MAX_RESPONSE):
    """input_ids and labels of prompt + response: prompt tokens masked with -100, response = content tokens +
    one end-of-turn token; a too-long prompt loses its beginning (the question and the answer prefix stay)."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompt_ids = tokenizer(render_prompt(tokenizer, messages, prefix), add_special_tokens=False).input_ids
    resp_ids = tokenizer(clean_response(response), add_special_tokens=False).input_ids
    resp_ids = resp_ids[:max_response] if len(resp_ids) >= max_response else resp_ids + [eot]
    keep = max(max_length - len(resp_ids), 1)
    prompt_ids = prompt_ids[-keep:]
    return dict(input_ids=prompt_ids + resp_ids, labels=[-100] * len(prompt_ids) + resp_ids)


def encode_pair(tokenizer, pair, max_length=MAX_LENGTH, max_response=MAX_RESPONSE):
    """Tokenised chosen (teacher) and rejected (student) sequences of one pair record from 00."""
    out = {}
    for side in ("chosen", "rejected"):
        enc = encode_example(tokenizer, pair["prompt"], pair.get("prefix", ""), pair[side], max_length, max_response)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = enc["input_ids"], enc["labels"]
    return out


def collate(examples, pad_id):
    """Right-pad every side of a list of encoded pairs to one length; attention masks from the lengths."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [e[f"{side}_input_ids"] for e in examples]
        width = max(len(s) for s in seqs)
        batch[f"{side}_input_ids"] = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([e[f"{side}_labels"] + [-100] * (width - len(e[f"{side}_labels"]))
                                                for e in examples])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return batch


def read_pairs(path):
    """Pair records of 00 (a torn last line is ignored); fails with what to run when there are none."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make pairs` (00_generate_pairs.py) first.")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            pairs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not pairs:
        raise SystemExit(f"{path} has no pairs: run `make pairs` again (see its meta.json for dropped questions).")
    return pairs


# ----------------------------------------------------------------------------- training
def make_trainer_class():
    """DistiLLMTrainer, defined lazily so that importing this module does not import the Trainer stack."""
    from transformers import Trainer

    class DistiLLMTrainer(Trainer):
        """transformers.Trainer whose loss is distill_loss against a frozen teacher (no-grad, eval mode)."""

        def __init__(self, *args, teacher, loss_config, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.loss_config = loss_config
            self.alpha_state = AlphaState()
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps
            self.history = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, parts = distill_loss(model, self.teacher, inputs, self.loss_config, self.state.global_step,
                                       self.state.max_steps, self.alpha_state)
            self.history.append(dict(step=self.state.global_step, loss=loss.item(), **parts))
            return (loss, None) if return_outputs else loss

    return DistiLLMTrainer


def lora_student(model_id, dtype, gradient_checkpointing):
    """The student with fresh LoRA adapters on LORA_TARGETS (base weights frozen)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(common.resolve_model(model_id), dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return self.encoded[i]


def train(pairs_path, out_dir, run_dir, cfg, max_steps, student_id, teacher_id):
    """Train LoRA adapters with the DistiLLMTrainer and save them with meta.json; returns the meta dict."""
    from transformers import TrainingArguments

    t0 = time.time()
    tokenizer = lm.load_tokenizer(student_id)
    tokenizer.padding_side = "right"
    vocab = lm.shared_vocab_size(tokenizer, lm.load_tokenizer(teacher_id))
    cfg = replace(cfg, vocab_size=vocab)
    pairs = read_pairs(pairs_path)
    encoded = [encode_pair(tokenizer, p) for p in pairs]
    device = lm.pick_device()
    student = lora_student(student_id, getattr(torch, STUDENT_TRAIN_DTYPE) if device == "cpu" else None,
                           GRADIENT_CHECKPOINTING[device])
    teacher = lm.load_model(teacher_id, device, getattr(torch, TEACHER_DTYPE))
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=max_steps, per_device_train_batch_size=BATCH_PAIRS,
        gradient_accumulation_steps=GRAD_ACCUM, learning_rate=LEARNING_RATE,
        warmup_steps=int(WARMUP_RATIO * max_steps),  # whole steps (a ratio gave a 1-step run LR 0)
        lr_scheduler_type="cosine", weight_decay=WEIGHT_DECAY, logging_steps=LOG_STEPS, save_steps=SAVE_STEPS,
        save_total_limit=1, report_to=[], remove_unused_columns=False, seed=common.SEED, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, bf16=device == "cuda", use_cpu=device == "cpu")
    trainer = make_trainer_class()(model=student, args=args, train_dataset=PairDataset(encoded),
                                   data_collator=lambda ex: collate(ex, tokenizer.pad_token_id), teacher=teacher,
                                   loss_config=cfg)
    resume = fresh_or_resumable(run_dir, dict(loss_config=asdict(cfg), settings=settings_dict(), max_steps=max_steps,
                                              pairs_sha256=common.sha256_file(pairs_path), student=student_id))
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.time() - t_train
    meta = dict(loss_config=asdict(cfg), student=student_id, teacher=teacher_id, pairs=str(pairs_path),
                pairs_sha256=common.sha256_file(pairs_path), n_pairs=len(pairs), max_steps=max_steps,
                resumed=resume, train_loss=result.training_loss, history=trainer.history,
                seconds=dict(total=round(time.time() - t0, 1), train=round(train_seconds, 1),
                             per_step=round(train_seconds / max(max_steps, 1), 1)),
                peak_rss_gib=round(lm.peak_rss_gib(), 2), settings=settings_dict(), versions=common.versions("accelerate", "trl"))
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, tokenizer, out_dir, meta)
    return meta


def fresh_or_resumable(run_dir, config):
    """True when run_dir holds Trainer checkpoints of this exact config; checkpoints of another config are
    removed (resuming them would silently finish someone else's run)."""
    import shutil

    run_dir = Path(run_dir)
    stamp = run_dir / "config.json"
    if run_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text(encoding="utf-8")) != config):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(config, sort_keys=True), encoding="utf-8")
    return any(run_dir.glob("checkpoint-*"))


def settings_dict():
    return common.settings_of(sys.modules[__name__])


def save_adapter(model, tokenizer, out_dir, meta):
    """adapter_config.json + adapter_model.safetensors + tokenizer + meta.json, DONE last (atomic by directory)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    common.write_meta(tmp / "meta.json", **meta)
    (tmp / "DONE").touch()
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def merge_adapter(adapter_dir, base_id, out_dir):
    """Merge the LoRA adapter into the bf16 base and save a full model dir that 04_infer.py --model loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(common.resolve_model(base_id), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    lm.load_tokenizer(base_id).save_pretrained(tmp)
    meta = json.loads((adapter_dir / "meta.json").read_text(encoding="utf-8"))
    meta = dict(merged_from=str(adapter_dir), base=base_id, adapter_sha256=common.sha256_file(
        adapter_dir / "adapter_model.safetensors"), training={k: meta[k] for k in meta if k != "history"})
    common.write_meta(tmp / "meta.json", **meta)
    (tmp / "DONE").touch()
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- measurement
def proc_status_gib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in GiB; None off Linux."""
    status = Path("/proc/self/status")  # the kernel's, not a package path (verify: allow)
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return None


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so loading the models (which briefly holds the
    checkpoint and the tensors) does not count as training memory; False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's (verify: allow)
        return True
    except OSError:
        return False


def measure(cfg, steps, batch, length, student_id, teacher_id):
    """Seconds per optimizer step and peak RSS of `steps` LoRA steps on random token batches [batch, length]
    (the second half of each sequence is the answer); batch sequences = batch/2 chosen + batch/2 rejected."""
    tokenizer = lm.load_tokenizer(student_id)
    vocab = lm.shared_vocab_size(tokenizer, lm.load_tokenizer(teacher_id))
    cfg = replace(cfg, vocab_size=vocab)
    student = lora_student(student_id, getattr(torch, STUDENT_TRAIN_DTYPE), MEASURE_GRADIENT_CHECKPOINTING).train()
    teacher = lm.load_model(teacher_id, "cpu", getattr(torch, TEACHER_DTYPE))
    optim = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(common.SEED)
    half = max(batch // 2, 1)
    with torch.no_grad():  # page the memory-mapped weights in, so they count as loaded, not as step memory
        for model in (student, teacher):
            model(input_ids=torch.ones(1, 8, dtype=torch.long))
    loaded_rss = proc_status_gib("VmRSS")
    hwm_reset = reset_peak_rss()
    step_peaks = []
    times, losses = [], []
    for step in range(steps):
        data = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(0, 150000, (half, length), generator=gen)
            labels = ids.clone()
            labels[:, :length // 2] = -100
            data.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                         f"{side}_labels": labels})
        t = time.time()
        loss, _ = distill_loss(student, teacher, data, cfg, step, steps)
        loss.backward()
        optim.step()
        optim.zero_grad()
        times.append(time.time() - t)
        losses.append(loss.item())
        step_peaks.append(proc_status_gib("VmHWM"))
        print(f"01 measure: chunk={cfg.chunk} step {step} {times[-1]:.1f} s loss {loss.item():.4f} "
              f"peak RSS {lm.peak_rss_gib():.2f} GiB, during steps {step_peaks[-1]} GiB", flush=True)
    timed = times[1:] or times
    return dict(chunk=cfg.chunk, loss_type=cfg.loss_type, batch=batch, length=length, steps=steps,
                seconds_per_step=round(sum(timed) / len(timed), 1), step_seconds=[round(x, 1) for x in times],
                peak_rss_gib=round(lm.peak_rss_gib(), 2), losses=losses, loaded_rss_gib=round(loaded_rss, 2)
                if loaded_rss else None, step_peak_rss_gib=round(step_peaks[-1], 2) if hwm_reset and step_peaks[-1]
                else None, step_overhead_gib=round(step_peaks[-1] - loaded_rss, 2) if hwm_reset and loaded_rss
                else None, weights_paged_in=True, gradient_checkpointing=MEASURE_GRADIENT_CHECKPOINTING,
                student_dtype=STUDENT_TRAIN_DTYPE, versions=common.versions("accelerate", "trl"))


# ----------------------------------------------------------------------------- main
def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=Path, default=common.PAIRS / "pairs.jsonl")
    p.add_argument("--out", type=Path, default=common.DISTILLED, help="adapter directory")
    p.add_argument("--loss-type", default=LOSS_TYPE, choices=LOSS_TYPES)
    p.add_argument("--alpha1", type=float, default=ALPHA1)
    p.add_argument("--alpha2", type=float, default=ALPHA2)
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--gradual-beta", action=argparse.BooleanOptionalAction, default=GRADUAL_BETA)
    p.add_argument("--adaptive-alpha", action=argparse.BooleanOptionalAction, default=ADAPTIVE_ALPHA)
    p.add_argument("--chunk", type=int, default=LOSS_CHUNK, help="0 = naive full-logit loss")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--merge", type=Path, default=None, help="also write a merged full model directory here")
    p.add_argument("--measure", type=Path, default=None, help="time MEASURE_STEPS steps, write JSON here, no training")
    p.add_argument("--measure-steps", type=int, default=MEASURE_STEPS)
    return p.parse_args()


def main():
    args = parse_args()
    cfg = LossConfig(loss_type=args.loss_type, alpha1=args.alpha1, alpha2=args.alpha2, beta=args.beta,
                     temperature=args.temperature, gradual_beta=args.gradual_beta, adaptive_alpha=args.adaptive_alpha,
                     chunk=args.chunk)
    torch.manual_seed(common.SEED)
    print(f"01: {json.dumps(asdict(cfg))} settings {json.dumps(settings_dict())}")
    if args.measure:
        result = measure(cfg, args.measure_steps, MEASURE_BATCH, MEASURE_LENGTH, common.STUDENT_MODEL,
                         common.TEACHER_MODEL)
        args.measure.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(args.measure, result)
        print(f"01: measured chunk={cfg.chunk}: {result['seconds_per_step']} s/step, {result['peak_rss_gib']} GiB")
        return
    run_dir = common.OUTPUTS / "01_train" / args.out.name
    meta = train(args.pairs, args.out, run_dir, cfg, args.max_steps, common.STUDENT_MODEL, common.TEACHER_MODEL)
    if args.merge:
        merge_adapter(args.out, common.STUDENT_MODEL, args.merge)
    print(f"01: trained {args.max_steps} steps on {meta['n_pairs']} pairs in {meta['seconds']['train']:.1f} s "
          f"(loss {meta['train_loss']:.4f}) -> {args.out}" + (f", merged -> {args.merge}" if args.merge else ""))


if __name__ == "__main__":
    main()
