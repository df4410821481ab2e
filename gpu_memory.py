"""GPU memory of the pipeline's stages, computed from a model's config.json numbers and a stage's settings.

Pure arithmetic, no torch import. Counts tensor bytes as torch.cuda.max_memory_allocated does (weights, KV caches,
activations, optimizer state); allocator fragmentation and the CUDA context come on top (HEADROOM_GIB,
CONTEXT_GIB). Used by lm.load_teacher (which precision of the teacher fits beside the student), by 00 and 01 (what
a stage needs besides the weights) and by gpu_plan.py (reports/gpu-plan.md). tests/test_gpu.py checks each formula
against the peak tensor memory of tiny models measured on the CPU.

The per-token activation counts are the tensors alive at each stage's peak in transformers' Qwen2 (SDPA attention:
no [T, T] score matrix) with peft LoRA (dropout, adapters in float32) and a bfloat16 base, counted once on a tiny
model; the tests check them on other shapes.
"""
from dataclasses import dataclass

GIB = 2**30
HEADROOM_GIB = 1.0  # per GPU beyond the counted tensors: allocator fragmentation, cuBLAS workspaces
CONTEXT_GIB = 0.5  # per GPU: the CUDA context and kernels, outside torch's allocator (and outside mem_get_info's free)
LEVEL_BITS = {"float": 16, "bf16": 16, "fp16": 16, "fp32": 32, "bnb-int8": 8, "torchao-int8wo": 8, "bnb-nf4": 4,
              "bnb-nf4-dq": 4}  # bits per weight of the linear layers at each lm.LEVELS level on a GPU
QUANT_OVERHEAD = {"bnb-nf4": 4 / 64, "bnb-nf4-dq": 1 / 64 + 4 / (64 * 256)}  # bytes per weight: bitsandbytes' absmax
# (one float32 per 64-weight block; double quantization stores it in 8 bits with a float32 per 256 blocks)
LORA_STATE_BYTES = 16  # per LoRA parameter: float32 weight, gradient and Adam's two moments
LOGITS_BYTES = dict(greedy=8, sampled=40)  # per sequence and vocabulary entry at the last position: float32 logits
# and log-softmax; sampling adds temperature and top-p's masked, sorted (int64 indices), softmaxed, cumulated copies
LOSS_CHUNK_TENSORS = dict(model=(9, 1), topk=(5, 0))  # float32 and 16-bit [chunk, V] tensors alive at the loss's
# backward peak: both models' logits, their float32 copies, log-softmaxes and mixtures; the student's alone against
# the stored top-k

QWEN25 = {  # config.json of Qwen/Qwen2.5-{7B,14B,32B}-Instruct on the Hugging Face hub
    # (huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json and the 14B, 32B pages): 7.6B, 14.8B, 32.8B
    "7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
}


@dataclass
class Dims:
    """The sizes of a decoder that decide its memory: hidden H, layers L, MLP width I, vocabulary V, the widths of the
    query and of the key/value projections, tied embeddings."""

    H: int
    L: int
    I: int  # noqa: E741 (the config's intermediate size)
    V: int
    q: int
    kv: int
    tied: bool


def dims(config):
    """Dims of a config.json dict."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Dims(H=config["hidden_size"], L=config["num_hidden_layers"], I=config["intermediate_size"],
                V=config["vocab_size"], q=heads * head_dim,
                kv=config.get("num_key_value_heads", heads) * head_dim, tied=bool(config.get("tie_word_embeddings")))


def linear_shapes(d):
    """(in, out) of the seven projections of one layer: q, k, v, o, gate, up, down."""
    return [(d.H, d.q), (d.H, d.kv), (d.H, d.kv), (d.q, d.H), (d.H, d.I), (d.H, d.I), (d.I, d.H)]


def weight_bytes(config, level="bf16"):
    """Bytes of a model's weights at a level: the linear layers at the level's bits (plus bitsandbytes' scales);
    embeddings, lm_head, norms and biases stay in the 16-bit float (32-bit for fp32)."""
    d = dims(config)
    shapes = linear_shapes(d)
    linear = d.L * sum(i * o for i, o in shapes)
    rows = d.L * sum(o for _, o in shapes)
    other = d.V * d.H * (1 if d.tied else 2) + d.L * (2 * d.H + d.q + 2 * d.kv) + d.H
    bits = LEVEL_BITS[level]
    scales = 4 * rows if bits == 8 else 0  # int8: one float32 scale per output row
    return linear * (bits / 8 + QUANT_OVERHEAD.get(level, 0.0)) + scales + other * (4 if bits == 32 else 2)


def weights_gib(config, level="bf16"):
    return weight_bytes(config, level) / GIB


def lora_params(config, r):
    """Parameters of rank-r LoRA adapters on the seven projections of every layer (01's LORA_TARGETS)."""
    d = dims(config)
    return d.L * r * sum(i + o for i, o in linear_shapes(d))


def kv_cache_bytes(config, tokens, dtype_bytes=2):
    """Key and value cache of `tokens` tokens (all sequences together) over every layer."""
    d = dims(config)
    return 2 * d.L * d.kv * tokens * dtype_bytes


def prefill_bytes(config, tokens, dtype_bytes=2):
    """Transient activations of a no-grad forward over `tokens` tokens: one layer's MLP (gate, up, their product) and
    the residual stream, norm and embedding outputs."""
    d = dims(config)
    return tokens * dtype_bytes * (3 * d.I + 4 * d.H)


def answering_bytes(config, level, sequences, prompt_tokens, new_tokens=0, sampled=False):
    """Peak of answering `sequences` prompts of prompt_tokens at once (prefill, then new_tokens of decoding):
    weights, the KV cache of the whole batch at its longest, one prefill's transient and the last position's logits
    work (LOGITS_BYTES: greedy, or sampled with temperature and top-p as 00 samples)."""
    d = dims(config)
    return (weight_bytes(config, level) + kv_cache_bytes(config, sequences * (prompt_tokens + new_tokens))
            + prefill_bytes(config, sequences * prompt_tokens)
            + sequences * d.V * LOGITS_BYTES["sampled" if sampled else "greedy"])


def train_layer_bytes(config, tokens, r, dtype_bytes=2):
    """What the backward pass of one checkpointed layer holds: its recomputed activations and their gradients.
    Per token: float32 norm statistics and LoRA inputs (15 H + 3 I + 7 r) and bfloat16 projections, attention and
    MLP tensors (6 H + 2 kv + 4 I)."""
    d = dims(config)
    return tokens * (4 * (15 * d.H + 3 * d.I + 7 * r) + dtype_bytes * (6 * d.H + 2 * d.kv + 4 * d.I))


def loss_chunk_bytes(config, chunk, topk=None, dtype_bytes=2):
    """The loss of one chunk of response positions in backward (LOSS_CHUNK_TENSORS), with the teacher loaded or, when
    topk is given, against the stored top-k (and its [chunk, k + 1] buckets)."""
    wide, narrow = LOSS_CHUNK_TENSORS["model" if topk is None else "topk"]
    buckets = 0 if topk is None else chunk * (topk + 1) * 4 * 8
    return chunk * dims(config).V * (wide * 4 + narrow * dtype_bytes) + buckets


def train_step_bytes(config, sequences, width, positions, chunk, r, teacher=None, teacher_level="bf16", topk=None):
    """Peak of one LoRA training step of a bfloat16 student with gradient checkpointing (01 on a GPU) on `sequences`
    sequences padded to `width` tokens with `positions` response positions: weights, LoRA state, the checkpointed
    layer inputs, the gathered response hidden states, then the largest of the teacher's forward, one layer's
    backward and one loss chunk. teacher: the teacher's config when it is loaded (at teacher_level); topk: the stored
    k otherwise."""
    d, tokens = dims(config), sequences * width
    base = (weight_bytes(config) + lora_params(config, r) * LORA_STATE_BYTES + (d.L + 1) * tokens * d.H * 2
            + 2 * positions * d.H * 2)
    phases = [train_layer_bytes(config, tokens, r), loss_chunk_bytes(config, chunk, topk)]
    if teacher is not None:
        base += weight_bytes(teacher, teacher_level) + positions * dims(teacher).H * 2
        phases.append(prefill_bytes(teacher, tokens))
    return base + max(phases)


def topk_store_bytes(teacher, level, sequences, width, chunk, topk):
    """Peak of storing the teacher's top-k (01 --store-topk): weights, one no-grad forward without a cache, the
    final hidden states and the float32 logits, log-softmax and masked copy of one chunk."""
    d, tokens = dims(teacher), sequences * width
    return (weight_bytes(teacher, level) + prefill_bytes(teacher, tokens) + tokens * d.H * 2
            + chunk * d.V * 4 * 3 + chunk * topk * 8)
