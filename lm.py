"""Loading and batched scoring of the one LLM, shared by the scripts that run it (00, 01, 03, 04, 05).

Does not decide what to ask: prompts live in common.py, orchestration in the numbered scripts.
"""
import json
import logging
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import common


def pick_device(device=common.DEVICE):
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("DEVICE is 'cuda' but torch sees no GPU: set FSKU_DEVICE=cpu or install the CUDA build.")
    return device


def pick_dtype(device, dtype=None, model_id=None):
    """A dtype name given wins; then the level a model folder was saved at by 05_quantize.py; then CUDA -> bf16
    (fp16 on GPUs without bf16), CPU -> common.CPU_DTYPE."""
    if dtype:
        return getattr(torch, dtype)
    saved = saved_quantization(common.resolve_model(model_id)).get("dtype") if model_id else None
    if saved:
        return getattr(torch, saved)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, common.CPU_DTYPE)


def load_tokenizer(model_id):
    tokenizer = AutoTokenizer.from_pretrained(common.resolve_model(model_id))
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


def saved_quantization(path):
    """The "quantization" entry of a model folder's meta.json (written by 05_quantize.py), or {}."""
    meta = Path(path) / "meta.json"
    return (json.loads(meta.read_text(encoding="utf-8")).get("quantization") or {}) if meta.exists() else {}


def quantize_after_load(model, method, device):
    """Quantization applied to a loaded model, for methods with no serialised form (05_quantize.py levels)."""
    if method == "torch-int8-dynamic":  # eager dynamic int8: CPU kernels only
        if device != "cpu":
            raise SystemExit("torch-int8-dynamic runs on the CPU only: choose another level for a GPU "
                             "(05_quantize.py).")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)
    raise SystemExit(f"unknown quantization method {method!r} in the model's meta.json: rebuild it with "
                     "05_quantize.py.")


def load_model(model_id, device, dtype, quantization_config=None):
    """Load a causal LM for inference; says what to do when the model is missing.

    quantization_config (a transformers config, e.g. BitsAndBytesConfig) quantizes while loading. A folder saved
    quantized (its config.json names the method) loads quantized on its own; one whose meta.json names a method
    with no serialised form (torch-int8-dynamic) is quantized after loading.
    """
    path = common.resolve_model(model_id)
    if not Path(path).exists() and "/" not in model_id:
        raise SystemExit(f"model {model_id!r} not found: run `make models`, or set FSKU_STUDENT to a directory.")
    config = Path(path) / "config.json"
    prequantized = config.exists() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    kwargs = dict(dtype=dtype)
    if quantization_config is not None or prequantized:
        # quantized weights are placed while loading; .to() cannot move them afterwards
        kwargs.update(device_map=device, quantization_config=quantization_config)
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")  # the logger of the per-matmul warning
        if not any(isinstance(f, _FirstOnly) for f in bnb_log.filters):
            bnb_log.addFilter(_FirstOnly())
    model = AutoModelForCausalLM.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None})
    after = saved_quantization(path).get("after_load")
    if after:
        model = quantize_after_load(model, after, device)
    elif "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def model_fingerprint(model_id):
    """A string that changes when the weights change: meta.json of a converted model, else the id."""
    meta = Path(common.resolve_model(model_id)) / "meta.json"
    return meta.read_text(encoding="utf-8") if meta.exists() else model_id


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


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts, token_ids, batch_size=8, stats=None):
    """Log-probabilities (full-vocabulary softmax) of token_ids as the next token after each prompt."""
    results = [None] * len(prompts)
    for idx, enc in _batches(prompts, tokenizer, batch_size):
        t0 = time.time()
        enc = enc.to(model.device)
        position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)[:, token_ids]
        for row, i in enumerate(idx):
            results[i] = logprobs[row].tolist()
        if stats is not None:
            stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + int(enc.attention_mask.sum())
            stats["prefill_seconds"] = stats.get("prefill_seconds", 0.0) + time.time() - t0
    return results


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


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size=8, stats=None, sources=None, no_copy=0):
    """Greedy continuations of the prompts (text only, special tokens dropped). With sources (one text per prompt)
    and no_copy > 0, no continuation repeats no_copy consecutive tokens of its source (NoCopy)."""
    results = [None] * len(prompts)
    for idx, enc in _batches(prompts, tokenizer, batch_size):
        t0 = time.time()
        enc = enc.to(model.device)
        processors = None
        if sources and no_copy > 0:
            ids = [tokenizer(sources[i], add_special_tokens=False).input_ids if sources[i] else [] for i in idx]
            processors = LogitsProcessorList([NoCopy(ids, no_copy, enc.input_ids.shape[1])])
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors)
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


def versions(*packages):
    """Versions of torch, transformers and the given installed packages (None for one not installed)."""
    from importlib import metadata

    import transformers

    out = dict(torch=torch.__version__, transformers=transformers.__version__)
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_records(path):
    """JSONL records by their "id" (a later line wins); a torn last line from a kill is ignored. {} for no file."""
    done = {}
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["id"]] = record
    return done


def drop_torn_tail(path):
    """Cut a partial last line (a kill during an append) so the next append starts on a fresh line."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def read_answered(path, questions):
    """The checkpointed records (read_records) of these common.Questions by id, each only when its "question_sha"
    is the question's digest: a question whose text changed under the same id is answered again."""
    done = read_records(path)
    return {q.id: done[q.id] for q in questions if q.id in done and done[q.id].get("question_sha") == q.digest}


def write_json(path, obj):
    """Write JSON atomically (tmp + replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
