"""Loading and batched scoring of the one LLM, shared by the scripts that run it (00, 01, 03, 04, 05).

Does not decide what to ask: prompts live in common.py, orchestration in the numbered scripts.
"""
import hashlib
import importlib
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)

import common
import gpu_memory


# ----------------------------------------------------------------------------- settings
DTYPE_BENCH_SHAPE = (64, 896, 4864)  # (tokens, hidden, intermediate): a student MLP matmul, the bulk of prefill
DTYPE_BENCH_REPEATS = 10
DTYPE_BENCH_THREADS = 1  # threads of the matmuls that decide the CPU dtype: with one, another job on a 2-core CPU
# leaves the bf16/fp32 ratio at 2.1-2.3 (2.5 alone); on both threads, one timed after the other, a test run beside
# it once gave 1.06 (70 vs 66 GFLOP/s; alone 3x) and fp32 was chosen on a CPU with avx512_bf16
LEVELS = {  # quantization level -> weights dtype ("float": the device's fast float dtype, see float_dtype) and how
    # it is quantized: config = a transformers quantization config applied while loading; after_load = quantized
    # after every load (no serialised form); devices = where it runs at all
    "float": dict(dtype="float"),
    "bf16": dict(dtype="bfloat16"),
    "fp32": dict(dtype="float32"),
    "fp16": dict(dtype="float16"),
    "bnb-int8": dict(dtype="float", config="bnb", settings=dict(load_in_8bit=True)),
    "bnb-nf4": dict(dtype="float", config="bnb", settings=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "bnb-nf4-dq": dict(dtype="float", config="bnb", settings=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_use_double_quant=True)),
    "torchao-int8wo": dict(dtype="float", config="torchao", settings=dict(method="Int8WeightOnlyConfig")),
    "torch-int8-dynamic": dict(dtype="float32", after_load="torch-int8-dynamic", devices=("cpu",)),
}
TEACHER_DEVICE = os.environ.get("FSKU_TEACHER_DEVICE", "same")  # where 00 and 01 put the teacher: same (the
# student's device), cuda:N, or auto (device_map="auto" over every GPU, the student's working memory kept free)
OPTION_LOGITS = "float32"  # "float32": the scored tokens' logits (the options' digits) recomputed in float32 from the
# last hidden state. A bf16 model's own logits are rounded to steps of 0.06-0.125, so 8% of the teacher's and 21% of a
# distilled student's dev questions tied at the top option and argmax took the lowest number (and a batch's padding
# flipped near-ties). "model": the model's own output logits
TEACHER_LEVELS = ("bf16", "bnb-int8", "bnb-nf4")  # on a GPU the teacher loads at the first of these whose weights
# (gpu_memory.weight_bytes) fit the free memory: a 14B teacher is bf16 on an 80 GB card and nf4 beside a 7B on 48 GB
# -----------------------------------------------------------------------------


def pick_device(device=common.DEVICE):
    """'auto' -> cuda when available, else cpu; 'cuda:N' is checked against the GPUs torch sees."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"DEVICE is {device!r} but torch sees no GPU: set FSKU_DEVICE=cpu or install the CUDA "
                             "build of torch.")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SystemExit(f"DEVICE is {device!r} but torch sees {torch.cuda.device_count()} GPU(s).")
    return device


def device_kind(device):
    """'cpu' or 'cuda' (for the per-device settings): 'cuda:1' -> 'cuda'."""
    return device.split(":")[0]


def _matmul_gflops(dtypes, threads=None, shape=DTYPE_BENCH_SHAPE, repeats=DTYPE_BENCH_REPEATS):
    """{dtype: GFLOP/s} of a model-shaped matrix product on this CPU, best of repeats after one warm-up. The dtypes
    take turns within every round, so a load that comes and goes reaches them alike; on `threads` threads when
    given (torch's setting is restored after)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    operands = {dtype: (a.to(dtype), b.to(dtype)) for dtype in dtypes}
    best = dict.fromkeys(dtypes, float("inf"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for _ in range(repeats + 1):
            for dtype, (x, y) in operands.items():
                t0 = time.perf_counter()
                x @ y
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {dtype: 2 * m * k * n / seconds / 1e9 for dtype, seconds in best.items()}


def cpu_float_dtype(cache=None):
    """"bfloat16" where this CPU multiplies bf16 faster than fp32 (avx512_bf16, AMX), else "float32".

    Decided on the machine that runs, by a sub-second matmul benchmark, never from a committed report: on an AVX2-only
    CPU bf16 is ~10x slower than fp32, on an avx512_bf16 one ~2x faster. The decision compares the two on
    DTYPE_BENCH_THREADS threads, where another job on the cores barely moves the ratio; the speed on every thread
    (gflops, what projections rescale by) is recorded beside it. The result is cached per machine (CPU model, flags,
    torch version) in outputs/machine.json, with the load average it was taken at: a measurement taken while other
    jobs shared the cores is taken again once they are gone. FSKU_CPU_DTYPE overrides it.
    """
    if os.environ.get("FSKU_CPU_DTYPE"):
        return os.environ["FSKU_CPU_DTYPE"]
    cache = Path(cache or common.MACHINE)
    machine = common.machine()
    key = hashlib.sha256(json.dumps([machine["cpu"], machine["flags"], torch.__version__]).encode()).hexdigest()[:16]
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    load, cores = os.getloadavg()[0], machine["cores"] or 1
    busy_then = known.get("load_average", 0.0) >= cores
    if known.get("key") != key or (busy_then and load < cores):
        dtypes = (torch.float32, torch.bfloat16)
        alone, every = _matmul_gflops(dtypes, DTYPE_BENCH_THREADS), _matmul_gflops(dtypes)
        by_name = lambda gflops: {str(d).removeprefix("torch."): round(v, 1) for d, v in gflops.items()}  # noqa: E731
        known = dict(key=key, cpu=machine["cpu"], flags=machine["flags"], torch=torch.__version__,
                     gflops=by_name(every), gflops_threads=by_name(alone),
                     bench_threads=DTYPE_BENCH_THREADS,
                     cpu_dtype="bfloat16" if alone[torch.bfloat16] > 1.2 * alone[torch.float32] else "float32",
                     shape=list(DTYPE_BENCH_SHAPE), load_average=round(load, 2))
        cache.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(cache, known)
        print(f"lm: CPU float dtype {known['cpu_dtype']} (matmul on {DTYPE_BENCH_THREADS} thread(s) fp32 "
              f"{alone[torch.float32]:.0f}, bf16 {alone[torch.bfloat16]:.0f} GFLOP/s; on all {every[torch.float32]:.0f}"
              f" and {every[torch.bfloat16]:.0f}; load {load:.1f}) -> {cache}")
    return known["cpu_dtype"]


def cpu_gflops():
    """Matmul GFLOP/s of this CPU in its float dtype (cpu_float_dtype's cached benchmark)."""
    dtype = cpu_float_dtype()
    known = json.loads(Path(common.MACHINE).read_text(encoding="utf-8")) if Path(common.MACHINE).exists() else {}
    return (known.get("gflops") or {}).get(dtype)


def float_dtype(device):
    """The device's fast float dtype: bf16 on a GPU that has it (else fp16), the measured one on a CPU."""
    if device_kind(device) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cpu_float_dtype())


def pick_dtype(device, dtype=None, level="float"):
    """A dtype name given wins; then the level's dtype ("float": float_dtype of the device)."""
    if dtype:
        return getattr(torch, dtype)
    wanted = LEVELS[level]["dtype"]
    return float_dtype(device) if wanted == "float" else getattr(torch, wanted)


def level_runnable(level, device):
    """None when the level can run on this device, else the reason it cannot."""
    spec = LEVELS[level]
    kind = device_kind(device)
    if kind not in spec.get("devices", (kind,)):
        return f"runs on {'/'.join(spec['devices'])} only, not {device}"
    if spec["dtype"] == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    package = {"bnb": "bitsandbytes", "torchao": "torchao"}.get(spec.get("config"))
    if package:
        try:
            importlib.import_module(package)
        except ImportError as e:
            return f"{package} cannot be imported ({e})"
    return None


def quantization_config(level, compute_dtype=None):
    """The transformers quantization config of a level; None for plain dtypes and after-load methods."""
    spec = LEVELS[level]
    if spec.get("config") == "bnb":
        from transformers import BitsAndBytesConfig

        extra = dict(bnb_4bit_compute_dtype=compute_dtype) if spec["settings"].get("load_in_4bit") and compute_dtype \
            else {}
        return BitsAndBytesConfig(**spec["settings"], **extra)
    if spec.get("config") == "torchao":
        from torchao import quantization
        from transformers import TorchAoConfig

        return TorchAoConfig(getattr(quantization, spec["settings"]["method"])())
    return None


def load_tokenizer(model_id):
    tokenizer = AutoTokenizer.from_pretrained(local_model(model_id))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _FirstOnly(logging.Filter):
    """Lets each distinct message through once: bitsandbytes int8 on CPU logs the same warning on every matmul."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quantize_after_load(model, method, device):
    """Quantization applied to a loaded model, for methods with no serialised form (LEVELS' after_load)."""
    if method == "torch-int8-dynamic":  # eager dynamic int8: CPU kernels only
        if device_kind(device) != "cpu":
            raise SystemExit("torch-int8-dynamic runs on the CPU only: choose another level for a GPU.")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)
    raise SystemExit(f"unknown after-load quantization {method!r}: see lm.LEVELS.")


def local_model(model_id):
    """The local folder of a model id (relative to the checkout) or the hub id itself; a model folder the pipeline
    makes that is missing says which make target makes it. Inference runs offline (common.OFFLINE_ENV): a hub id
    must already be in the local cache."""
    path = common.resolve_model(model_id)
    if Path(path).is_absolute() and Path(path).exists():  # never relative to the current folder
        return path
    target = common.model_target(model_id)
    if target or "/" not in str(model_id) or str(model_id).startswith(("models/", "outputs/", ".")):
        raise SystemExit(f"model {model_id!r} not found: run `make {target or 'models'}`"
                         + ("" if target else ", or set FSKU_STUDENT / FSKU_TEACHER to a model folder") + ".")
    return path


def load_model(model_id, device, dtype, level=None, quantization=None, max_memory=None):
    """Load a causal LM for inference straight onto the device (device_map: never a full copy in host RAM first);
    says what to do when the model is missing.

    level (LEVELS) quantizes while loading (or after, for an after-load method); quantization (a transformers config,
    e.g. BitsAndBytesConfig) does so directly. A folder saved quantized (its config.json names the method) loads
    quantized on its own. device "auto" spreads the layers over the GPUs (device_map="auto"), each GPU filled up to
    max_memory ({gpu index: "N GiB"}, gpu_max_memory).
    """
    path = local_model(model_id)
    if level is not None and quantization is None:
        quantization = quantization_config(level, dtype)
    if quantization is not None:
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")  # the logger of the per-matmul warning
        if not any(isinstance(f, _FirstOnly) for f in bnb_log.filters):
            bnb_log.addFilter(_FirstOnly())
    kwargs = dict(dtype=dtype, device_map=device, quantization_config=quantization, max_memory=max_memory)
    model = AutoModelForCausalLM.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None})
    after = LEVELS[level].get("after_load") if level else None
    if after:
        model = quantize_after_load(model, after, device)
    return model.eval()


def device_name(device):
    """A device as load_model and the per-device settings take it: "cpu" for any CPU device (the Trainer's rank
    device reads "cpu:0"), "cuda:N" for a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"


def model_config(model_id):
    """The config.json of a model as a dict (the sizes gpu_memory needs)."""
    path = Path(local_model(model_id)) / "config.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(local_model(model_id)).to_dict()


def gpu_free_gib(device):
    """Free memory of one GPU in GiB, as the driver reports it (the CUDA context already taken)."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free / 2**30


def gpu_max_memory(student_device, reserve_gib):
    """max_memory for device_map="auto" over every GPU: each GPU's free memory less gpu_memory.HEADROOM_GIB, and on the
    student's GPU also less reserve_gib (the stage's working memory there)."""
    student = device_name(student_device)
    memory = {}
    for index in range(torch.cuda.device_count()):
        free = gpu_free_gib(f"cuda:{index}") - gpu_memory.HEADROOM_GIB
        free -= reserve_gib if f"cuda:{index}" == student else 0.0
        memory[index] = f"{max(free, 0.0):.2f}GiB"
    return memory


def fitting_level(config, free_gib, levels=TEACHER_LEVELS):
    """The first of levels whose weights (gpu_memory.weight_bytes) fit in free_gib; stops with what to do when none
    does."""
    for level in levels:
        if gpu_memory.weights_gib(config, level) <= free_gib:
            return level
    need = gpu_memory.weights_gib(config, levels[-1])
    raise SystemExit(f"the teacher needs {need:.1f} GiB even at {levels[-1]}, but {free_gib:.1f} GiB are free for it "
                     "beside the student: set FSKU_TEACHER_DEVICE=cuda:N (another GPU) or auto (spread over the GPUs), "
                     "or choose a smaller teacher (reports/gpu-plan.md, `make gpu-plan`).")


def teacher_placement(device, reserve_gib, config):
    """(device or "auto", level, max_memory) of the teacher on a GPU by TEACHER_DEVICE, relative to the student's
    device: on the student's GPU its free memory less reserve_gib and HEADROOM_GIB must hold the weights."""
    place = device if TEACHER_DEVICE == "same" else TEACHER_DEVICE
    if place == "auto":
        memory = gpu_max_memory(device, reserve_gib)
        return "auto", fitting_level(config, sum(float(m[:-3]) for m in memory.values())), memory
    place = device_name(pick_device(place))
    free = gpu_free_gib(place) - gpu_memory.HEADROOM_GIB - (reserve_gib if place == device else 0.0)
    return place, fitting_level(config, free), None


def load_teacher(model_id, device, reserve_gib=0.0, dtype=None):
    """The frozen teacher for 00 and 01, loaded after the student. On the CPU in dtype (default: the float level's);
    on a GPU where TEACHER_DEVICE says, at the first of TEACHER_LEVELS that fits (teacher_placement)."""
    device = device_name(device)
    if device_kind(device) == "cpu":
        return load_model(model_id, "cpu", dtype or pick_dtype("cpu")).requires_grad_(False)
    place, level, memory = teacher_placement(device, reserve_gib, model_config(model_id))
    print(f"lm: teacher {model_id} at {level} on {place}" + (f" (max_memory {memory})" if memory else ""))
    model = load_model(model_id, place, pick_dtype(device, level=level), level=level, max_memory=memory)
    return model.requires_grad_(False)


def model_fingerprint(model_id):
    """A string that changes when the weights change: meta.json of a converted model without its timings (the same
    weights converted again keep their checkpoints), else the id."""
    meta = Path(common.resolve_model(model_id)) / "meta.json"
    if not meta.exists():
        return model_id
    fields = json.loads(meta.read_text(encoding="utf-8"))
    return json.dumps({k: v for k, v in fields.items() if k != "seconds"}, sort_keys=True, ensure_ascii=False)


def shared_vocab_size(tokenizer_a, tokenizer_b):
    """Size of the token->id map two tokenizers share; raises unless the maps are identical.

    The models' vocab sizes may still differ by padding rows of the embedding (Qwen2.5: 151,665 real tokens,
    151,936 rows): callers slice logits to this size.
    """
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a != vocab_b:
        clashes = sorted(t for t in vocab_a.keys() & vocab_b.keys() if vocab_a[t] != vocab_b[t])
        only_a, only_b = len(vocab_a.keys() - vocab_b.keys()), len(vocab_b.keys() - vocab_a.keys())
        example = ", ".join(repr(t) for t in clashes[:3])
        raise SystemExit(f"teacher and student tokenizers differ ({len(clashes)} shared tokens with other ids"
                         f"{': ' + example if example else ''}; {only_a} and {only_b} tokens only in one): "
                         "distillation compares distributions id by id and needs one tokenizer family.")
    return len(vocab_a)


def option_token_ids(tokenizer, n_options):
    """Token ids of the digits '1'..'n'; each must be a single token."""
    ids = []
    for digit in range(1, n_options + 1):
        pieces = tokenizer.encode(str(digit), add_special_tokens=False)
        if len(pieces) != 1:
            raise SystemExit(f"option digit {digit} is {len(pieces)} tokens in this tokenizer: cannot read logits.")
        ids.append(pieces[0])
    return ids


def render(tokenizer, messages, prefix=""):
    """Chat-template the messages with the generation prompt, then append the assistant's prefix."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prefix


def _batches(prompts, tokenizer, batch_size):
    """Yield (indices, encoded batch) with prompts sorted by length so padding stays small."""
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)


def exact_head(model, option_logits=None):
    """The output layer whose float32 product gives exact option logits (OPTION_LOGITS), or None where the model's
    own logits stand: OPTION_LOGITS "model", a float32 model (its logits are already exact), or an output layer
    that is not a plain float Linear (bitsandbytes and torchao keep packed weights)."""
    head = model.get_output_embeddings()
    if (option_logits or OPTION_LOGITS) != "float32" or not isinstance(head, torch.nn.Linear):
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.dtype.is_floating_point \
            or weight.dtype == torch.float32:
        return None
    return head


def head_logits(head, hidden, token_ids):
    """float32 logits of token_ids from hidden states (rows x hidden) through the output layer."""
    logits = hidden.float() @ head.weight[token_ids].float().T
    return logits if head.bias is None else logits + head.bias[token_ids].float()


def option_logits_tag(dtype_name):
    """What a checkpoint key says of how the option logits were read at dtype_name: nothing in float32 (exact either
    way) or under OPTION_LOGITS "model" (the reading every key had before), else the OPTION_LOGITS setting."""
    return [f"option logits {OPTION_LOGITS}"] if dtype_name != "float32" and OPTION_LOGITS != "model" else []


def agrees(exact, rounded):
    """Whether the float32 logits are the model's own up to its output rounding (bf16: 2^-8 relative): a model that
    scales or caps its logits after the output layer (Gemma 2, Granite, Cohere) fails and keeps its own."""
    return bool(((exact - rounded).abs() <= 0.01 * rounded.abs() + 0.05).all())


class _OptionReader:
    """Log-probabilities (full-vocabulary softmax) of token_ids as the next token after the last position of a
    forward pass; their logits exact in float32 where exact_head allows (the softmax's normaliser comes from the
    model's own logits: the same for every option of a prompt, so it never changes which is first). A context
    manager: the hook that captures the output layer's input is removed on exit."""

    def __init__(self, model, token_ids, option_logits=None):
        self.model, self.token_ids = model, token_ids
        self.head = exact_head(model, option_logits)
        self.captured = {}
        self.hook = self.head.register_forward_hook(
            lambda module, args, out: self.captured.update(hidden=args[0])) if self.head else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def __call__(self, **inputs):
        """(log-probabilities rows x token_ids, the model's output) of one forward pass."""
        out = self.model(**inputs, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        if self.head is not None:
            exact = head_logits(self.head, self.captured.pop("hidden")[:, -1, :], self.token_ids).to(logits.device)
            if agrees(exact, logits[:, self.token_ids]):
                logits[:, self.token_ids] = exact
            else:
                print("lm: the model changes its logits after the output layer: option logits stay its own")
                self.__exit__()
                self.head = None
        return torch.log_softmax(logits, dim=-1)[:, self.token_ids], out


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts, token_ids, batch_size=8, stats=None, option_logits=None):
    """Log-probabilities (full-vocabulary softmax) of token_ids as the next token after each prompt. token_ids'
    logits are exact in float32 (OPTION_LOGITS, exact_head; option_logits overrides it)."""
    return [group[0] for group in shared_prefix_logprobs(model, tokenizer, [[p] for p in prompts], token_ids,
                                                         batch_size, stats, option_logits)]


def common_prefix(a, b):
    """The number of leading items a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def shared_prefix_logprobs(model, tokenizer, groups, token_ids, batch_size=8, stats=None, option_logits=None):
    """next_token_logprobs of groups of prompts that begin alike (one question with its options in several orders):
    [[log-probabilities per prompt] per group]. The first prompts of the groups are scored in batches of their own,
    as next_token_logprobs scores them alone (so their figures do not depend on the rest); every other prompt reuses
    the key/value cache of its group's first prompt for the tokens they share and computes only its own remainder
    (with a passage: the options, about a sixth of the prompt). stats gains shift_prompts and shift_seconds for those."""
    results = [[None] * len(group) for group in groups]
    with _OptionReader(model, token_ids, option_logits) as read:
        for idx, enc in _batches([group[0] for group in groups], tokenizer, batch_size):
            t0 = time.time()
            enc = enc.to(model.device)
            mask = enc.attention_mask
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            more = any(len(groups[i]) > 1 for i in idx)
            logprobs, out = read(**enc, position_ids=position_ids, use_cache=more)
            for row, i in enumerate(idx):
                results[i][0] = logprobs[row].tolist()
            if stats is not None:
                stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + int(mask.sum())
                stats["prefill_seconds"] = stats.get("prefill_seconds", 0.0) + time.time() - t0
            if more:
                _score_rest(read, tokenizer, groups, idx, enc, out.past_key_values, results, stats)
    return results


def _score_rest(read, tokenizer, groups, idx, enc, cache, results, stats):
    """(shared_prefix_logprobs) The other prompts of the groups idx, read after their first prompts' cache: each row
    sees its first prompt's tokens up to where they part (the rest masked, with the left padding) and then its own
    remaining tokens, left-padded among the rows, at the positions they have in the whole prompt."""
    t0 = time.time()
    mask = enc.attention_mask
    rows, shared, rest = [], [], []
    for row, i in enumerate(idx):
        first = enc.input_ids[row][mask[row].bool()].tolist()
        for j in range(1, len(groups[i])):
            ids = tokenizer(groups[i][j], add_special_tokens=False).input_ids
            keep = min(common_prefix(first, ids), len(ids) - 1)  # at least one token of its own to read
            rows.append((row, i, j))
            shared.append(keep)
            rest.append(ids[keep:])
    width = max(map(len, rest))
    device = enc.input_ids.device
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rest], device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    past_mask = mask[[row for row, _, _ in rows]].clone()
    pads = mask.shape[1] - mask.sum(-1)
    for n, (row, _, _) in enumerate(rows):
        past_mask[n, int(pads[row]) + shared[n]:] = 0
    cache.batch_select_indices(torch.tensor([row for row, _, _ in rows], device=device))
    start = torch.tensor(shared, device=device).unsqueeze(1)
    logprobs, _ = read(input_ids=input_ids, attention_mask=torch.cat([past_mask, rest_mask], dim=1),
                       position_ids=start + (rest_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                       use_cache=True)
    for n, (_, i, j) in enumerate(rows):
        results[i][j] = logprobs[n].tolist()
    if stats is not None:
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + int(rest_mask.sum())
        stats["prefill_seconds"] = stats.get("prefill_seconds", 0.0) + time.time() - t0
        stats["shift_prompts"] = stats.get("shift_prompts", 0) + len(rows)
        stats["shift_seconds"] = stats.get("shift_seconds", 0.0) + time.time() - t0


class NoCopy(LogitsProcessor):
    """Greedy decoding that never reproduces a run of n tokens of its row's source (the retrieved passages): a
    token that would complete such a run gets -inf. Only the generated tokens are checked, from prompt_length on,
    so the copy of the passages inside the prompt does not count. sources: one token-id list per row ([] for none)."""

    def __init__(self, sources, n, prompt_length):
        self.n, self.prompt_length = n, prompt_length
        self.tables = [ngram_continuations(ids, n) for ids in sources]

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length < self.n - 1:
            return scores
        for row, table in enumerate(self.tables):
            banned = table.get(tuple(input_ids[row, input_ids.shape[1] - self.n + 1:].tolist())) if table else None
            if banned:
                scores[row, sorted(banned)] = float("-inf")
        return scores


def ngram_continuations(ids, n):
    """{(n-1) consecutive tokens of ids: the set of tokens that follow them in ids}."""
    table = {}
    for i in range(len(ids) - n + 1):
        table.setdefault(tuple(ids[i:i + n - 1]), set()).add(ids[i + n - 1])
    return table


class TextDone(StoppingCriteria):
    """Stops each row of a batch once done(the text it has generated so far) is true; a stopped row is padded while
    the others go on, so its text is a prefix of what it would have generated."""

    def __init__(self, tokenizer, done, prompt_length):
        self.tokenizer, self.done, self.prompt_length = tokenizer, done, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([bool(self.done(t)) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size=8, stats=None, sources=None, no_copy=0,
             done=None, **options):
    """Greedy continuations of the prompts (text only, special tokens dropped). With sources (one text per prompt)
    and no_copy > 0, no continuation repeats no_copy consecutive tokens of its source (NoCopy). With done (a test
    on a partial text), a row stops once done says so (TextDone). options go to model.generate (e.g.
    no_repeat_ngram_size, repetition_penalty)."""
    results = [None] * len(prompts)
    for idx, enc in _batches(prompts, tokenizer, batch_size):
        t0 = time.time()
        enc = enc.to(model.device)
        processors = stopping = None
        if sources and no_copy > 0:
            ids = [tokenizer(sources[i], add_special_tokens=False).input_ids if sources[i] else [] for i in idx]
            processors = LogitsProcessorList([NoCopy(ids, no_copy, enc.input_ids.shape[1])])
        if done is not None:
            stopping = StoppingCriteriaList([TextDone(tokenizer, done, enc.input_ids.shape[1])])
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                             stopping_criteria=stopping, **options)
        new = out[:, enc.input_ids.shape[1]:]
        for row, i in enumerate(idx):
            results[i] = tokenizer.decode(new[row], skip_special_tokens=True)
        if stats is not None:
            stats["generated_tokens"] = stats.get("generated_tokens", 0) + int((new != tokenizer.pad_token_id).sum())
            stats["generate_seconds"] = stats.get("generate_seconds", 0.0) + time.time() - t0
    return results


def peak_rss_gib():
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib():
    """Peak GPU memory allocated by torch in this process, None without a GPU."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def read_jsonl(path):
    """The records of a JSONL file in order; a torn last line from a kill is ignored. [] for no file."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_records(path):
    """JSONL records by their "id" (a later line wins); a torn last line is ignored. {} for no file."""
    return {record["id"]: record for record in read_jsonl(path)}


def drop_torn_tail(path):
    """Cut a partial last line (a kill during an append) so the next append starts on a fresh line."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def read_answered(path, questions):
    """The checkpointed records (read_records) of these competition.Questions by id, each only when its "question_sha"
    is the question's digest: a question whose text changed under the same id is answered again."""
    done = read_records(path)
    return {q.id: done[q.id] for q in questions if q.id in done and done[q.id].get("question_sha") == q.digest}
