"""Distil the teacher into the student with DistiLLM-2 (Ko et al., ICML 2025) and LoRA.

Reads outputs/00_pairs/pairs.jsonl (`make pairs`: prompts with a teacher answer = chosen and a student answer =
rejected) and the student; the teacher either runs beside the student in training (TEACHER_SOURCE "model") or has
stored its top-k log-probabilities at every answer position once (`--store-topk`, `make topk`: outputs/01_topk/,
shard-NNNNN.safetensors + meta.json + DONE), so that training loads no teacher (TEACHER_SOURCE "topk": a 7B student
trains on one 24 GB card, reports/gpu-plan.md). The stored distribution is the teacher's on the student's prompt
(TOPK_TARGET "plain", the design kept: reports/distill.md) or on the pair's privileged prompt ("context": the question
with its source passage, 00's teacher_prompt; the student trains on the prompt without it, same answer positions;
--target context -> outputs/01_topk-context). Multiple-choice pairs carry it from 00's answering prefill
(recorded_topk: the option digits and one bucket for the rest, MC_TARGET), so storing loads no teacher either; a
multiple-choice answer is its digit alone, and the two sides of such a pair share one forward (SHARE_CONTEXT).
Writes the LoRA adapter (adapter_config.json, adapter_model.safetensors), meta.json (settings, data hash, losses,
timings, memory, per-rank digests) and DONE into models/student-distilled/ (or --out), resumable Trainer checkpoints
into outputs/01_train/<name>/, and with --merge a full model directory (adapter merged into the base, tokenizer,
meta.json) that `04_infer.py --model DIR` loads as is. Run by `make topk` and `make distill`; `make sweep`
(sweep_distill.py) calls it per grid point; `--measure` times naive vs chunked loss steps (reports/distill.md).

Loss API (pure functions on logits; p = teacher, q = student, both at temperature tau, sliced to the shared
vocabulary; every divergence returns one value per token position):
    skl(t_logits, s_logits, alpha, tau)     SKL_a(p||q)  = sum_v p [log p - log(a p + (1-a) q)]
    srkl(t_logits, s_logits, alpha, tau)    SRKL_a(q||p) = sum_v q [log q - log((1-a) p + a sg[q])]
    forward_kl, tvd, gjsd (mixture GKD_MIX), nll (of the answer tokens)
    teacher_topk, topk_buckets              the stored top-k and its remainder bucket (exact when k covers V)
    distill_loss(student, teacher, batch, cfg)   the per-batch loss of a loss type, chunked over response tokens
Multi-GPU (plain data parallel, what tests/test_ddp.py runs):
    accelerate launch --multi_gpu --num_processes N 01_train_distillm.py --merge models/student-distilled-merged
each rank trains on its share of the pairs (its own teacher on its own GPU, or the stored top-k); rank 0 saves and
merges after a barrier.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
import gpu_memory
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
MC_END_OF_TURN = False  # a multiple-choice answer is the digit alone: its one position is what 04_infer.py reads
# (the end-of-turn after it would be a second, trivial position)
SHARE_CONTEXT = True  # one student forward for a pair whose two answers share their context (an MC pair: teacher
# and student digits follow the same prompt, so the digit position reads the same tokens; exact, tests)
MC_TARGET = "options"  # what of the teacher's answer-position distribution a recorded MC pair is trained on:
# "options" = the option digits 1-5 and one bucket for all other tokens (the distribution 04 reads; the 1.5B teacher
# puts much of its mass on a byte of "①", which the top-k would spend its ids on), "topk" = its top TOPK tokens
TOPK_TARGET = "plain"  # the teacher distribution stored for training: "plain" = on the prompt the student sees (dev
# MC over the base student: permute-4 +0.056 +- 0.020, batch +0.034 +- 0.022), "context" = the teacher prompted with
# the question's source passage (00's teacher_prompt, privileged context: -0.108, -0.038; reports/distill.md)

LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LEARNING_RATE = 2e-4
EPOCHS = dict(cpu=1.0, cuda=2.0)  # passes over the pairs per device: steps = ceil(epochs x pairs / (batch x
# accumulation x world size)); cpu: one pass, what the 3-hour budget of pairs + 4 trainings allows (reports/distill.md)
BATCH_PAIRS = dict(cpu=2, cuda=4)  # pairs per device step (each pair is a teacher answer and a student answer
# sequence); cuda 4: 8 sequences of MAX_LENGTH fit beside a 7B on 24 GB with checkpointing (reports/gpu-plan.md)
GRAD_ACCUM = dict(cpu=2, cuda=4)  # effective batch: 4 pairs on the CPU, 16 pairs per GPU
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.0
GRADIENT_CHECKPOINTING = dict(cpu=False, cuda=True)  # per device: the CPU has the memory for short sequences
MEASURE_GRADIENT_CHECKPOINTING = True  # --measure: as in reports/distill.md's naive-vs-chunked comparison
STUDENT_TRAIN_DTYPE = dict(cpu="bfloat16", cuda="bfloat16")  # base weights; CPU bf16 matmul is 2.4x fp32 here
# (README); adapters and loss stay fp32
TEACHER_DTYPE = dict(cpu="bfloat16", cuda="bfloat16")  # on a GPU the precision follows lm.TEACHER_LEVELS
TEACHER_SOURCE = dict(cpu="topk", cuda="topk")  # "model": the teacher runs beside the student in every step;
# "topk": its top-k stored once (--store-topk), no teacher in training (the 24 GB route, reports/gpu-plan.md; on
# the CPU the multiple-choice pairs carry it from 00's answering prefill, so no teacher is loaded at all)
TOPK = 64  # stored teacher log-probabilities per answer position, plus one bucket for the remaining mass: the
# loss is exact when k covers the vocabulary and at most 2% low at 64 on peaked teachers (tests/test_distill.py)
TOPK_BATCH = dict(cpu=4, cuda=16)  # pairs per teacher forward when storing top-k
TOPK_SHARD = 256  # pairs per stored shard (the resume unit of --store-topk)
SAVE_STEPS = 10  # Trainer checkpoint interval (resume after a kill)
LOG_STEPS = 1
MEASURE_STEPS = 2  # --measure: steps per variant (the first is warm-up; s/step is the mean of the rest)
MEASURE_BATCH, MEASURE_LENGTH = 4, 256  # --measure: sequences x tokens per step; the second half is the answer
# -----------------------------------------------------------------------------

LOSS_TYPES = ("distillm_v2", "distillm_v1", "kd", "seqkd", "gkd", "tvd")
TOPK_FIELDS = ("ids", "logprobs", "rest", "target")  # stored per answer position (teacher_topk)
TOPK_DIR = common.OUTPUTS / "01_topk"  # the stored top-k at TEMPERATURE (another temperature: topk_dir)


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
    share_context: bool = SHARE_CONTEXT


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


def teacher_hidden(teacher, input_ids, attention_mask):
    """Final-norm hidden states [B, T, H] of the frozen teacher from its decoder alone: no logits, and not the
    hidden states of every layer that output_hidden_states would keep. Inputs go to the teacher's (first) device."""
    device = teacher.device
    return teacher.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 use_cache=False).last_hidden_state


def head_logits(head, hidden, vocab):
    """Float32 logits [N, vocab] of hidden states [N, H] through an lm_head that may sit on another device (a
    teacher placed by lm.load_teacher), returned on the hidden states' device."""
    return head(hidden.to(head.weight.device))[..., :vocab].float().to(hidden.device)


def chunked(fn, chunk, sliced, fixed):
    """fn(*slices, *fixed) over row slices of `chunk` rows of the sliced tensors (a float among them passes whole),
    concatenated. Each slice runs under activation checkpointing when the first tensor needs a gradient, so forward
    and backward hold one chunk of [chunk, V] logits at a time; chunk 0: one slice."""
    n = sliced[0].shape[0]
    step = chunk or max(n, 1)
    out = []
    for start in range(0, n, step):
        args = [x[start:start + step] if torch.is_tensor(x) else x for x in sliced] + list(fixed)
        if torch.is_grad_enabled() and sliced[0].requires_grad:
            out.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            out.append(fn(*args))
    return torch.cat(out) if out else sliced[0].new_zeros(0, dtype=torch.float32)


def _chunk_divergence(s_hidden, t_hidden, targets, alpha, s_head, t_head, name, cfg):
    s_logits = head_logits(s_head, s_hidden, cfg.vocab_size)
    with torch.no_grad():
        t_logits = head_logits(t_head, t_hidden, cfg.vocab_size)
    return token_divergence(name, t_logits, s_logits, targets, alpha, cfg)


def chunked_token_divergence(name, s_hidden, t_hidden, targets, alpha, s_head, t_head, cfg):
    """Divergence at gathered response positions [N, H], lm_heads applied cfg.chunk positions at a time (chunked)."""
    return chunked(_chunk_divergence, cfg.chunk, [s_hidden, t_hidden, targets, alpha], [s_head, t_head, name, cfg])


# ----------------------------------------------------------------------------- the teacher's stored top-k
def teacher_topk(t_logits, targets, k, temperature=1.0):
    """What --store-topk keeps of the teacher at each answer position, from its logits [N, V] (sliced to the shared
    vocabulary) at temperature: {ids [N, k] int32, logprobs [N, k], rest [N] (log of the mass outside the top k;
    -inf when k covers V), target [N] (log-probability of the next token, for adaptive alpha)}."""
    lp = log_probs(t_logits, temperature)
    top, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
    return dict(ids=ids.to(torch.int32), logprobs=top, rest=rest, target=lp.gather(-1, targets[:, None]).squeeze(-1))


def topk_buckets(t_ids, t_logprobs, t_rest, s_logprobs):
    """Teacher and student log-probabilities [N, k + 1] over the teacher's top-k tokens and one bucket holding the
    rest of the vocabulary (each side's remaining mass); [N, k] when k covers the vocabulary. Every divergence of
    token_divergence is an f-divergence, so on the buckets it is at most its full-vocabulary value (data processing
    inequality) and equal to it when k covers the vocabulary."""
    ids = t_ids.long()
    s_top = s_logprobs.gather(-1, ids)
    if ids.shape[-1] >= s_logprobs.shape[-1]:
        return t_logprobs, s_top
    s_rest = torch.logsumexp(s_logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return torch.cat([t_logprobs, t_rest[:, None]], -1), torch.cat([s_top, s_rest[:, None]], -1)


def _topk_chunk_divergence(s_hidden, t_ids, t_logprobs, t_rest, targets, alpha, s_head, name, cfg):
    s_logits = head_logits(s_head, s_hidden, cfg.vocab_size)
    if name == "nll":
        return nll(s_logits, targets)
    lp, lq = topk_buckets(t_ids, t_logprobs, t_rest, log_probs(s_logits, cfg.temperature))
    return token_divergence(name, lp, lq, targets, alpha, replace(cfg, temperature=1.0))  # buckets are at tau already


def topk_token_divergence(name, s_hidden, stored, targets, alpha, s_head, cfg):
    """Divergence at gathered response positions against the stored top-k (rows aligned with s_hidden), cfg.chunk
    positions at a time."""
    return chunked(_topk_chunk_divergence, cfg.chunk, [s_hidden, stored["ids"], stored["logprobs"], stored["rest"],
                                                        targets, alpha], [s_head, name, cfg])


def stored_topk(batch, sides):
    """The stored top-k of the stacked sides, rows in response_positions order (chosen rows first); None when the
    batch carries none."""
    if f"{sides[0]}_topk_ids" not in batch:
        return None
    return {f: torch.cat([batch[f"{s}_topk_{f}"] for s in sides]) for f in TOPK_FIELDS}


# ----------------------------------------------------------------------------- adaptive alpha
@torch.no_grad()
def target_logprobs(hidden, targets, head, cfg):
    """Log-probability at temperature of each target token [N] under an lm_head, cfg.chunk positions at a time."""
    step = cfg.chunk or max(hidden.shape[0], 1)
    out = [log_probs(head_logits(head, hidden[s:s + step], cfg.vocab_size), cfg.temperature)
           .gather(-1, targets[s:s + step, None]).squeeze(-1) for s in range(0, hidden.shape[0], step)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def probability_gap(t_logprobs, s_logprobs, rows, n_seq):
    """Per sequence: |geometric-mean probability of its answer tokens under the teacher - under the student|."""
    return (per_sequence_mean(t_logprobs, rows, n_seq).exp() - per_sequence_mean(s_logprobs, rows, n_seq).exp()).abs()


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


def shared_context(data, ranges):
    """True when the two sides of every pair read the same context at the rejected side's response positions: the
    rejected row's tokens up to and including its last response position equal the chosen row's (a multiple-choice
    pair: both digits follow the same prompt). Causal attention then gives both rows the same hidden states there,
    so one forward over the chosen rows serves both sides."""
    if set(ranges) != {"chosen", "rejected"} or ranges["chosen"][0] != 0:
        return False
    (c0, c1), (r0, r1) = ranges["chosen"], ranges["rejected"]
    if c1 - c0 != r1 - r0 or r0 != c1:
        return False
    respond = data["labels"][:, 1:] != -100
    for i in range(c1 - c0):
        positions = respond[r0 + i].nonzero().flatten()
        if not len(positions):
            continue
        end = int(positions.max()) + 1
        mask = data["attention_mask"]
        if not (torch.equal(data["input_ids"][r0 + i, :end], data["input_ids"][c0 + i, :end])
                and bool(mask[r0 + i, :end].all()) and bool(mask[c0 + i, :end].all())):
            return False
    return True


def distill_loss(student, teacher, batch, cfg, step=0, max_steps=1, alpha_state=None):
    """Loss of one batch and a dict of logged parts.

    batch: {side}_input_ids / _attention_mask / _labels [B, T] for side in chosen, rejected (labels -100 on the
    prompt). The sides a loss type needs go through one student forward and one no-grad teacher forward; each
    divergence is averaged over a sequence's response tokens, then over the side's sequences, and the terms are
    weighted per loss_terms. cfg.chunk = 0 is the naive version: full [B, T, V] logits of both models, masked
    afterwards; otherwise only response positions get logits, cfg.chunk positions at a time. When the batch carries
    the teacher's stored top-k ({side}_topk_<field>, --store-topk) no teacher runs (teacher may be None) and the
    divergences compare the top-k and the remaining-mass bucket (topk_buckets). With cfg.share_context, a batch whose
    sides share their context at every response position (shared_context) runs one forward per model over the
    chosen rows and reads the rejected side's positions from them.
    """
    beta = scheduled_beta(cfg.beta, step, max_steps, cfg.gradual_beta)
    terms = loss_terms(cfg.loss_type, beta)
    sides = [s for s in ("chosen", "rejected") if any(t[0] == s for t in terms)]
    data, ranges = stack_sides(batch, sides)
    rows, pos, targets = response_positions(data["labels"])
    stored = stored_topk(batch, sides)
    s_head = output_head(student)
    t_head = None if stored is not None else output_head(teacher)
    cfg = replace(cfg, vocab_size=cfg.vocab_size or min(h.weight.shape[0] for h in (s_head, t_head) if h is not None))
    if stored is not None or cfg.chunk:
        ids, mask, read = data["input_ids"], data["attention_mask"], rows
        if cfg.share_context and len(sides) == 2 and shared_context(data, ranges):
            n = ranges["chosen"][1]
            width = int(mask[:n].sum(1).max())
            ids, mask, read = ids[:n, :width], mask[:n, :width], torch.where(rows >= n, rows - n, rows)
        s_h = last_hidden(student, ids, mask)[read, pos]
        if stored is None:
            with torch.no_grad():
                t_all = teacher_hidden(teacher, ids, mask)
                t_h = t_all[read.to(t_all.device), pos.to(t_all.device)].to(s_h.device)
    else:
        s_logits = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"], use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=data["input_ids"].to(teacher.device), use_cache=False,
                               attention_mask=data["attention_mask"].to(teacher.device)).logits.to(s_logits.device)
        s_logits, t_logits = s_logits[:, :-1, :cfg.vocab_size].float(), t_logits[:, :-1, :cfg.vocab_size].float()
    total, parts = 0.0, dict(beta=beta)
    for side, name, weight in terms:
        lo, hi = ranges[side]
        sel = (rows >= lo) & (rows < hi)
        side_rows, n_seq = rows[sel] - lo, hi - lo
        alpha = cfg.alpha1 if side == "chosen" else cfg.alpha2
        if stored is None and not cfg.chunk:
            s_side, t_side, side_pos = s_logits[lo:hi], t_logits[lo:hi], pos[sel]
            if cfg.adaptive_alpha and name in ("skl", "srkl"):
                with torch.no_grad():
                    tgt = targets[sel].unsqueeze(-1)
                    lp = log_probs(t_side[side_rows, side_pos], cfg.temperature).gather(-1, tgt).squeeze(-1)
                    lq = log_probs(s_side[side_rows, side_pos], cfg.temperature).gather(-1, tgt).squeeze(-1)
                alpha = (alpha_state or AlphaState()).alphas(side, alpha, probability_gap(lp, lq, side_rows, n_seq))
                parts[f"{side}_alpha"] = alpha.mean().item()
                alpha = alpha[:, None].expand(-1, s_side.shape[1])
            full_targets = data["labels"][lo:hi, 1:].clamp(min=0)
            tok = token_divergence(name, t_side, s_side, full_targets, alpha, cfg)[side_rows, side_pos]
        else:
            if cfg.adaptive_alpha and name in ("skl", "srkl"):
                lp = stored["target"][sel] if stored is not None else target_logprobs(t_h[sel], targets[sel], t_head,
                                                                                      cfg)
                lq = target_logprobs(s_h[sel].detach(), targets[sel], s_head, cfg)
                alpha = (alpha_state or AlphaState()).alphas(side, alpha, probability_gap(lp, lq, side_rows, n_seq))
                parts[f"{side}_alpha"] = alpha.mean().item()
                alpha = alpha[side_rows]
            if stored is not None:
                tok = topk_token_divergence(name, s_h[sel], {f: v[sel] for f, v in stored.items()}, targets[sel],
                                            alpha, s_head, cfg)
            else:
                tok = chunked_token_divergence(name, s_h[sel], t_h[sel], targets[sel], alpha, s_head, t_head, cfg)
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


def encode_example(tokenizer, messages, prefix, response, max_length=MAX_LENGTH, max_response=MAX_RESPONSE,
                   end_of_turn=True):
    """input_ids and labels of prompt + response: prompt tokens masked with -100, response = content tokens +
    one end-of-turn token (none with end_of_turn False); a too-long prompt loses its beginning (the question and
    the answer prefix stay)."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompt_ids = tokenizer(render_prompt(tokenizer, messages, prefix), add_special_tokens=False).input_ids
    resp_ids = tokenizer(clean_response(response), add_special_tokens=False).input_ids
    resp_ids = resp_ids[:max_response] if len(resp_ids) >= max_response or not end_of_turn else resp_ids + [eot]
    keep = max(max_length - len(resp_ids), 1)
    prompt_ids = prompt_ids[-keep:]
    return dict(input_ids=prompt_ids + resp_ids, labels=[-100] * len(prompt_ids) + resp_ids)


def encode_pair(tokenizer, pair, max_length=MAX_LENGTH, max_response=MAX_RESPONSE, prompt_key="prompt"):
    """Tokenised chosen (teacher) and rejected (student) sequences of one pair record from 00, prompted with the
    messages under prompt_key (the student's "prompt"; "teacher_prompt", the privileged one, where the teacher's
    distribution is stored: same answer tokens, so the same answer positions in the same order). A
    multiple-choice answer has no end-of-turn token unless MC_END_OF_TURN."""
    out = {}
    messages = pair.get(prompt_key) or pair["prompt"]
    end_of_turn = MC_END_OF_TURN or pair.get("kind") != "mc"
    for side in ("chosen", "rejected"):
        enc = encode_example(tokenizer, messages, pair.get("prefix", ""), pair[side], max_length, max_response,
                             end_of_turn)
        out[f"{side}_input_ids"], out[f"{side}_labels"] = enc["input_ids"], enc["labels"]
    return out


def collate(examples, pad_id):
    """Right-pad every side of a list of encoded pairs to one length; attention masks from the lengths. The stored
    top-k of the pairs (with_topk), when present, is concatenated per side in the examples' order, which is the order
    of response_positions."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [e[f"{side}_input_ids"] for e in examples]
        width = max(len(s) for s in seqs)
        batch[f"{side}_input_ids"] = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([e[f"{side}_labels"] + [-100] * (width - len(e[f"{side}_labels"]))
                                                for e in examples])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        if f"{side}_topk_ids" in examples[0]:
            batch.update({f"{side}_topk_{f}": torch.cat([e[f"{side}_topk_{f}"] for e in examples])
                          for f in TOPK_FIELDS})
    return batch


def read_pairs(path):
    """Pair records of 00 (a torn last line is ignored); fails with what to run when there are none."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make pairs` (00_generate_pairs.py) first.")
    pairs = lm.read_jsonl(path)
    if not pairs:
        raise SystemExit(f"{path} has no pairs: run `make pairs` again (see its meta.json for dropped questions).")
    return pairs


def training_tokenizer(model_id):
    """The student's tokenizer padding on the right (training batches; 00 and 04 pad on the left)."""
    tokenizer = lm.load_tokenizer(model_id)
    tokenizer.padding_side = "right"
    return tokenizer


# ----------------------------------------------------------------------------- --store-topk
TOPK_TARGETS = ("context", "plain")
TARGET_PROMPT = dict(context="teacher_prompt", plain="prompt")  # the pair field the teacher is prompted with


def topk_dir(temperature, target=TOPK_TARGET):
    """Folder of the top-k stored at a temperature for a target: TOPK_DIR at TEMPERATURE and TOPK_TARGET, a sibling
    for the others (the sweep, the other pair design)."""
    suffix = ("" if temperature == TEMPERATURE else f"-t{temperature}") + ("" if target == TOPK_TARGET else
                                                                          f"-{target}")
    return TOPK_DIR.with_name(TOPK_DIR.name + suffix)


def topk_inputs(pairs_path, teacher_id, vocab, temperature, k=TOPK, target=TOPK_TARGET):
    """What a stored top-k depends on (its meta.json "inputs"): training refuses a store of other inputs and
    --store-topk writes it again."""
    fingerprint = hashlib.sha256(lm.model_fingerprint(teacher_id).encode("utf-8")).hexdigest()[:16]
    return dict(pairs_sha256=common.sha256_file(pairs_path), teacher=teacher_id, teacher_fingerprint=fingerprint,
                vocab=vocab, k=k, temperature=temperature, max_length=MAX_LENGTH, max_response=MAX_RESPONSE,
                end_of_turn=END_OF_TURN, mc_end_of_turn=MC_END_OF_TURN, mc_target=MC_TARGET, target=target)


def recorded_topk(tokenizer, pairs, target, k, temperature, mc_target=None):
    """{"<pair index>/<side>/<field>": tensor} of the teacher's distribution as 00 recorded it in the pairs (its
    answering prefill: pair["teacher_topk"][target], at temperature 1), when every pair carries it and has one
    answer position per side (a multiple-choice digit); None otherwise (the teacher must run). mc_target (MC_TARGET
    unless given) "topk": the top k ids (a recorded top-K cut to k moves the cut mass into the rest bucket);
    "options": the recorded option digits and the rest of the vocabulary as one bucket. The answer digit's own
    log-probability (for adaptive alpha) is the recorded option digit's."""
    mc_target = mc_target or MC_TARGET
    if temperature != 1.0:
        return None
    out, digits = {}, {}
    for i, pair in enumerate(pairs):
        top = (pair.get("teacher_topk") or {}).get(target)
        if not top or (mc_target == "topk" and len(top["ids"]) < k):
            return None
        encoded = encode_pair(tokenizer, pair)
        for side in ("chosen", "rejected"):
            response = [x for x in encoded[f"{side}_labels"][1:] if x != -100]
            if len(response) != 1:
                return None
            n = len(top.get("options") or [])
            digits.setdefault(n, lm.option_token_ids(tokenizer, n) if n else [])
            if response[0] not in digits[n]:
                return None
            options = torch.tensor(top["options"], dtype=torch.float32)
            if mc_target == "options":
                ids, logprobs = torch.tensor(digits[n]), options
                rest = torch.log((1.0 - options.exp().sum()).clamp(min=1e-12))
            else:
                ids, logprobs = torch.tensor(top["ids"][:k]), torch.tensor(top["logprobs"], dtype=torch.float32)
                rest = torch.logsumexp(torch.cat([logprobs[k:], torch.tensor([top["rest"]])]), 0)
                logprobs = logprobs[:k]
            target_lp = options[digits[n].index(response[0])]
            values = dict(ids=ids.to(torch.int32)[None], logprobs=logprobs[None], rest=rest.reshape(1),
                          target=target_lp.reshape(1))
            out.update({f"{i}/{side}/{f}": values[f].clone() for f in TOPK_FIELDS})  # own storage (safetensors)
    return out


@torch.no_grad()
def pairs_topk(teacher, tokenizer, pairs, first, vocab, temperature, k, batch_pairs, chunk=LOSS_CHUNK,
               prompt_key="prompt"):
    """{"<pair index>/<side>/<field>": tensor} of the teacher's top-k (teacher_topk) at every response position of
    the chosen and rejected sequences of pairs (indices from first), encoded as training encodes them but prompted
    with the messages under prompt_key (the answer positions are the same, in the same order)."""
    head, out = output_head(teacher), {}
    for start in range(0, len(pairs), batch_pairs):
        batch = collate([encode_pair(tokenizer, p, prompt_key=prompt_key) for p in pairs[start:start + batch_pairs]],
                        tokenizer.pad_token_id)
        n = batch["chosen_input_ids"].shape[0]
        for side in ("chosen", "rejected"):
            rows, pos, targets = response_positions(batch[f"{side}_labels"])
            hidden = teacher_hidden(teacher, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            hidden = hidden[rows.to(hidden.device), pos.to(hidden.device)]
            step = chunk or max(len(rows), 1)
            parts = [teacher_topk(head_logits(head, hidden[s:s + step], vocab), targets[s:s + step].to(hidden.device),
                                  k, temperature) for s in range(0, len(rows), step)]
            counts = torch.bincount(rows, minlength=n).tolist()
            for f in TOPK_FIELDS:
                merged = torch.cat([p[f] for p in parts]).cpu() if parts else torch.zeros(0)
                for i, piece in enumerate(torch.split(merged, counts)):
                    out[f"{first + start + i}/{side}/{f}"] = piece.contiguous()
    return out


def store_reserve_gib(teacher_id, kind, k=TOPK):
    """GiB storing the top-k needs on the GPU besides the teacher's weights (gpu_memory); 0 on the CPU."""
    if kind == "cpu":
        return 0.0
    config = lm.model_config(teacher_id)
    peak = gpu_memory.topk_store_bytes(config, "bf16", TOPK_BATCH[kind], MAX_LENGTH, LOSS_CHUNK, k)
    return (peak - gpu_memory.weight_bytes(config)) / gpu_memory.GIB


def store_topk(pairs_path, out_dir, teacher_id, student_id, temperature=TEMPERATURE, k=TOPK, target=TOPK_TARGET):
    """Store the teacher's top-k at every answer position of every pair in out_dir: shard-NNNNN.safetensors (TOPK_SHARD
    pairs each), meta.json, DONE; for target "context" the teacher reads each pair's teacher_prompt (the question
    with its source passage). When the pairs carry it from 00 (recorded_topk) no teacher is loaded. A store of the
    same inputs is kept (and resumed shard by shard); one of other inputs is replaced. Returns meta."""
    t0 = time.time()
    tokenizer = training_tokenizer(student_id)
    vocab = lm.shared_vocab_size(tokenizer, lm.load_tokenizer(teacher_id))
    pairs, inputs, out_dir = read_pairs(pairs_path), topk_inputs(pairs_path, teacher_id, vocab, temperature, k,
                                                                 target), Path(out_dir)
    if (out_dir / "DONE").exists() and json.loads((out_dir / "meta.json").read_text(encoding="utf-8")).get(
            "inputs") == inputs:
        (out_dir / "DONE").touch()  # newer than the script, so make does not ask again
        print(f"01: the top-k in {out_dir} is current")
        return json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    fresh_or_resumable(out_dir, inputs, pattern="shard-*")
    (out_dir / "DONE").unlink(missing_ok=True)
    recorded = recorded_topk(tokenizer, pairs, target, k, temperature)
    teacher = kind = None
    if recorded is None:
        device = lm.pick_device()
        kind = lm.device_kind(device)
        teacher = lm.load_teacher(teacher_id, device, store_reserve_gib(teacher_id, kind, k),
                                  getattr(torch, TEACHER_DTYPE[kind]))
    for shard, first in enumerate(tqdm(range(0, len(pairs), TOPK_SHARD), desc="01 top-k", unit="shard")):
        path = out_dir / f"shard-{shard:05d}.safetensors"
        if not path.exists():
            if recorded is not None:
                tensors = {key: v for key, v in recorded.items()
                           if first <= int(key.split("/")[0]) < first + TOPK_SHARD}
            else:
                tensors = pairs_topk(teacher, tokenizer, pairs[first:first + TOPK_SHARD], first, vocab, temperature,
                                     k, TOPK_BATCH[kind], prompt_key=TARGET_PROMPT[target])
            save_file(tensors, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
    meta = dict(inputs=inputs, n_pairs=len(pairs), shards=len(list(out_dir.glob("shard-*.safetensors"))),
                source="00's answering prefill (pairs.jsonl)" if recorded is not None else "teacher forward",
                seconds=round(time.time() - t0, 1), peak_rss_gib=round(lm.peak_rss_gib(), 2),
                peak_gpu_gib=lm.peak_gpu_gib())
    common.write_meta(out_dir / "meta.json", settings=settings_dict(), **meta)
    (out_dir / "DONE").touch()
    print(f"01: stored the teacher's top-{k} ({target}) of {len(pairs)} pairs from the {meta['source']} in "
          f"{meta['seconds']} s -> {out_dir}")
    return meta


def skip_topk(out_dir, kind):
    """The stamp of `make topk` on a device whose training loads the teacher (TEACHER_SOURCE "model"): no store."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    reason = f"TEACHER_SOURCE[{kind}] is 'model': training loads the teacher; pass --teacher-source topk to store"
    common.write_meta(Path(out_dir) / "meta.json", settings=settings_dict(), skipped=reason)
    (Path(out_dir) / "DONE").touch()
    print(f"01: no top-k stored ({reason})")


def load_topk(out_dir, inputs):
    """{pair index: {side: {field: tensor}}} of a finished store written from these inputs; stops with the command
    that writes it otherwise."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8")) if (out_dir / "DONE").exists() else {}
    if meta.get("inputs") != inputs:
        option = "" if inputs["temperature"] == TEMPERATURE else f" --temperature {inputs['temperature']}"
        option += "" if inputs.get("target", TOPK_TARGET) == TOPK_TARGET else f" --target {inputs['target']}"
        raise SystemExit(f"{out_dir} holds no top-k of these pairs, teacher and settings: run `make topk` "
                         f"(01_train_distillm.py --store-topk{option}).")
    stored = {}
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        for key, tensor in load_file(path).items():
            index, side, field = key.split("/")
            stored.setdefault(int(index), {}).setdefault(side, {})[field] = tensor
    return stored


def with_topk(encoded, stored):
    """The encoded pairs with their stored top-k as {side}_topk_<field}; stops when a pair's answer positions and
    its stored rows differ (the encoding changed since the store was written)."""
    for i, example in enumerate(encoded):
        for side in ("chosen", "rejected"):
            n = sum(label != -100 for label in example[f"{side}_labels"][1:])
            got = stored.get(i, {}).get(side)
            if got is None or got["ids"].shape[0] != n:
                raise SystemExit(f"01: pair {i} has {n} {side} answer positions but the stored top-k has "
                                 f"{None if got is None else got['ids'].shape[0]}: run `make topk` again.")
            example.update({f"{side}_topk_{f}": got[f] for f in TOPK_FIELDS})
    return encoded


# ----------------------------------------------------------------------------- training
def make_trainer_class():
    """DistiLLMTrainer, defined lazily so that importing this module does not import the Trainer stack."""
    from transformers import Trainer

    class DistiLLMTrainer(Trainer):
        """transformers.Trainer whose loss is distill_loss against a frozen teacher (set after the Trainer has put
        the student on this rank's device), or against the stored top-k in the batches (teacher None)."""

        def __init__(self, *args, loss_config, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = None
            self.loss_config = loss_config
            self.alpha_state = AlphaState()
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps
            self.history = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, parts = distill_loss(model, self.teacher, inputs, self.loss_config, self.state.global_step,
                                       self.state.max_steps, self.alpha_state)
            self.history.append(dict(step=self.state.global_step, loss=loss.item(),
                                     pairs=int(inputs["chosen_input_ids"].shape[0]), **parts))
            return (loss, None) if return_outputs else loss

    return DistiLLMTrainer


def lora_student(model_id, dtype, gradient_checkpointing, device="cpu"):
    """The student with fresh LoRA adapters on LORA_TARGETS (base weights frozen), loaded straight onto the device
    (the rank's: no copy in host RAM first)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm.local_model(model_id), dtype=dtype,
                                                 device_map=lm.device_name(device))
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


def world_size():
    """Processes of this training run: WORLD_SIZE, set by `accelerate launch` and torchrun (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_steps(epochs, n_pairs, batch_pairs, accumulation, world):
    """Optimizer steps for `epochs` passes over n_pairs: ceil(epochs x pairs / (batch x accumulation x world))."""
    return max(1, math.ceil(epochs * n_pairs / (batch_pairs * accumulation * world)))


def training_arguments(run_dir, steps, kind):
    """TrainingArguments of this device kind; creating them sets up the process group under accelerate launch (gloo
    on CPUs, NCCL on GPUs) and the rank's device (args.device)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=BATCH_PAIRS[kind],
        gradient_accumulation_steps=GRAD_ACCUM[kind], learning_rate=LEARNING_RATE,
        warmup_steps=int(WARMUP_RATIO * steps),  # whole steps (a ratio gave a 1-step run LR 0)
        lr_scheduler_type="cosine", weight_decay=WEIGHT_DECAY, logging_steps=LOG_STEPS, save_steps=SAVE_STEPS,
        save_total_limit=1, report_to=[], remove_unused_columns=False, seed=common.SEED, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, bf16=kind == "cuda", use_cpu=kind == "cpu")


def step_reserve_gib(student_id, teacher_id, kind):
    """GiB one training step needs on the student's GPU besides the weights already loaded (gpu_memory), kept free
    when the teacher is placed; 0 on the CPU."""
    if kind == "cpu":
        return 0.0
    student, teacher = lm.model_config(student_id), lm.model_config(teacher_id)
    sequences = 2 * BATCH_PAIRS[kind]
    peak = gpu_memory.train_step_bytes(student, sequences, MAX_LENGTH, sequences * MAX_RESPONSE, LOSS_CHUNK, LORA_R,
                                       teacher=teacher)
    return (peak - gpu_memory.weight_bytes(student) - gpu_memory.weight_bytes(teacher)) / gpu_memory.GIB


def adapter_digest(model):
    """sha256 of the trainable (LoRA) weights: equal on every rank when data parallel kept them in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def rank_summary(trainer):
    """Per rank, gathered on every rank: its device and its teacher's, the micro-batches and pairs it trained on and
    its adapter digest; stops when the ranks' adapters differ."""
    from accelerate.utils import gather_object

    teacher = trainer.teacher
    mine = dict(rank=trainer.args.process_index, device=str(trainer.args.device),
                teacher_device=str(teacher.device) if teacher is not None else None,
                micro_batches=len(trainer.history), pairs=sum(h["pairs"] for h in trainer.history),
                adapter_sha256=adapter_digest(trainer.model))
    ranks = gather_object([mine])
    if len({r["adapter_sha256"] for r in ranks}) > 1:
        raise SystemExit(f"01: the ranks ended with different adapters ({ranks}): data parallel lost sync.")
    return ranks


def train(pairs_path, out_dir, run_dir, cfg, max_steps, student_id, teacher_id, source="model", target=TOPK_TARGET,
          epochs=None):
    """Train LoRA adapters with the DistiLLMTrainer on this process's share of the pairs; save them with meta.json on
    the main process after a barrier. source "model": the teacher is loaded after the Trainer has set this rank's
    device and put the student there; "topk": the stored top-k of the target (topk_dir(cfg.temperature, target)), no
    teacher. max_steps None: train_steps over epochs (None: EPOCHS of the device). Returns (meta, whether this is the
    main process)."""
    from accelerate import PartialState

    t0 = time.time()
    tokenizer = training_tokenizer(student_id)
    vocab = lm.shared_vocab_size(tokenizer, lm.load_tokenizer(teacher_id))
    cfg = replace(cfg, vocab_size=vocab)
    pairs = read_pairs(pairs_path)
    encoded = [encode_pair(tokenizer, p) for p in pairs]
    if source == "topk":
        inputs = topk_inputs(pairs_path, teacher_id, vocab, cfg.temperature, target=target)
        encoded = with_topk(encoded, load_topk(topk_dir(cfg.temperature, target), inputs))
    kind = lm.device_kind(lm.pick_device())
    world = world_size()
    if world > 1 and source == "model" and lm.TEACHER_DEVICE != "same":
        raise SystemExit(f"01: FSKU_TEACHER_DEVICE={lm.TEACHER_DEVICE} under {world} processes would put every rank's "
                         "teacher on the same GPUs: unset it (each rank's teacher on its own GPU) or use the stored "
                         "top-k (TEACHER_SOURCE topk).")
    steps = max_steps or train_steps(epochs or EPOCHS[kind], len(pairs), BATCH_PAIRS[kind], GRAD_ACCUM[kind], world)
    args = training_arguments(run_dir, steps, kind)
    state = PartialState()
    student = lora_student(student_id, getattr(torch, STUDENT_TRAIN_DTYPE[kind]), GRADIENT_CHECKPOINTING[kind],
                           args.device)
    trainer = make_trainer_class()(model=student, args=args, train_dataset=PairDataset(encoded),
                                   data_collator=lambda ex: collate(ex, tokenizer.pad_token_id), loss_config=cfg)
    if source == "model":  # after the Trainer: args.device is this rank's device and the student is on it
        trainer.teacher = lm.load_teacher(teacher_id, args.device, step_reserve_gib(student_id, teacher_id, kind),
                                          getattr(torch, TEACHER_DTYPE[kind]))
    config = dict(loss_config=asdict(cfg), settings=settings_dict(), max_steps=steps, world_size=world,
                  source=source, target=target if source == "topk" else None,
                  pairs_sha256=common.sha256_file(pairs_path), student=student_id)
    if state.is_main_process:
        fresh_or_resumable(run_dir, config)
    state.wait_for_everyone()
    resume = any(Path(run_dir).glob("checkpoint-*"))
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.time() - t_train
    ranks = rank_summary(trainer)
    meta = dict(loss_config=asdict(cfg), student=student_id, teacher=teacher_id, teacher_source=source,
                topk_target=target if source == "topk" else None,
                pairs=str(pairs_path), pairs_sha256=common.sha256_file(pairs_path), n_pairs=len(pairs),
                max_steps=steps, world_size=world, ranks=ranks, resumed=resume, train_loss=result.training_loss,
                history=trainer.history, seconds=dict(total=round(time.time() - t0, 1), train=round(train_seconds, 1),
                                                      per_step=round(train_seconds / max(steps, 1), 1)),
                peak_rss_gib=round(lm.peak_rss_gib(), 2), peak_gpu_gib=lm.peak_gpu_gib())
    state.wait_for_everyone()
    if state.is_main_process:
        save_adapter(trainer.model, tokenizer, out_dir, meta)
    return meta, state.is_main_process


def fresh_or_resumable(run_dir, config, pattern="checkpoint-*"):
    """True when run_dir holds checkpoints (files matching pattern) of this exact config; a folder of another config
    is removed (resuming it would silently finish someone else's run)."""
    import shutil

    run_dir = Path(run_dir)
    stamp = run_dir / "config.json"
    if run_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text(encoding="utf-8")) != config):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(config, sort_keys=True), encoding="utf-8")
    return any(run_dir.glob(pattern))


def settings_dict():
    return common.settings_of(sys.modules[__name__])


def save_adapter(model, tokenizer, out_dir, meta):
    """adapter_config.json + adapter_model.safetensors + tokenizer + meta.json, DONE last (atomic by directory)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    common.write_meta(tmp / "meta.json", settings=settings_dict(), **meta,
                      versions=common.versions("accelerate", "trl"))
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
    base = AutoModelForCausalLM.from_pretrained(lm.local_model(base_id), dtype=torch.float32)
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
    student = lora_student(student_id, getattr(torch, STUDENT_TRAIN_DTYPE["cpu"]),
                           MEASURE_GRADIENT_CHECKPOINTING).train()
    teacher = lm.load_model(teacher_id, "cpu", getattr(torch, TEACHER_DTYPE["cpu"]))
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
                student_dtype=STUDENT_TRAIN_DTYPE["cpu"], versions=common.versions("accelerate", "trl"))


# ----------------------------------------------------------------------------- main
def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=Path, default=common.PAIRS / "pairs.jsonl")
    p.add_argument("--out", type=Path, default=common.DISTILLED, help="adapter directory")
    p.add_argument("--run-dir", type=Path, default=None, help="Trainer checkpoints (default outputs/01_train/<out>)")
    p.add_argument("--loss-type", default=LOSS_TYPE, choices=LOSS_TYPES)
    p.add_argument("--alpha1", type=float, default=ALPHA1)
    p.add_argument("--alpha2", type=float, default=ALPHA2)
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--gradual-beta", action=argparse.BooleanOptionalAction, default=GRADUAL_BETA)
    p.add_argument("--adaptive-alpha", action=argparse.BooleanOptionalAction, default=ADAPTIVE_ALPHA)
    p.add_argument("--chunk", type=int, default=LOSS_CHUNK, help="0 = naive full-logit loss")
    p.add_argument("--max-steps", type=int, default=None, help="default: --epochs over the pairs (train_steps)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the pairs; default: EPOCHS of the device")
    p.add_argument("--teacher-source", choices=("model", "topk"), default=None, help="default: TEACHER_SOURCE")
    p.add_argument("--store-topk", action="store_true", help="store the teacher's top-k (at --temperature, of "
                   "--target), no training; on a device whose TEACHER_SOURCE is 'model' only the stamp")
    p.add_argument("--target", choices=TOPK_TARGETS, default=TOPK_TARGET, help="the stored teacher distribution: "
                   "'context' (prompted with the source passage) or 'plain' (the student's prompt)")
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
    kind = lm.device_kind(lm.pick_device())
    source = args.teacher_source or TEACHER_SOURCE[kind]
    if args.store_topk:
        if source == "model":
            skip_topk(topk_dir(cfg.temperature, args.target), kind)
        else:
            store_topk(args.pairs, topk_dir(cfg.temperature, args.target), common.TEACHER_MODEL,
                       common.STUDENT_MODEL, cfg.temperature, target=args.target)
        return
    run_dir = args.run_dir or common.OUTPUTS / "01_train" / args.out.name
    meta, main_process = train(args.pairs, args.out, run_dir, cfg, args.max_steps, common.STUDENT_MODEL,
                               common.TEACHER_MODEL, source, args.target, epochs=args.epochs)
    if not main_process:
        return
    if args.merge:
        merge_adapter(args.out, common.STUDENT_MODEL, args.merge)
    teacher = f"{source} {args.target}" if source == "topk" else source
    print(f"01: trained {meta['max_steps']} steps on {meta['n_pairs']} pairs ({meta['world_size']} process(es), "
          f"teacher from {teacher}) in {meta['seconds']['train']:.1f} s (loss {meta['train_loss']:.4f}) -> {args.out}"
          + (f", merged -> {args.merge}" if args.merge else ""))


if __name__ == "__main__":
    main()
