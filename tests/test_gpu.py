"""The GPU path on the CPU: gpu_memory's formulas against the peak tensor memory measured on tiny models, teacher
placement and precision (lm.load_teacher), per-device settings for any cuda:N, and the memory plan (gpu_plan.py)."""
import importlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gpu_memory
import lm
from conftest import build_tiny_model

d = importlib.import_module("01_train_distillm")


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (what torch.cuda.max_memory_allocated counts on a GPU,
    here on any device): every op's outputs are counted once per storage until it is freed. Storages of the given
    models' weights are not new."""

    def __init__(self, *models):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for m in models for t in [*m.parameters(), *m.buffers()]}
        self.live, self.total, self.peak = {}, 0, 0

    def _free(self, key):
        self.total -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.known:
                    self.live[key] = storage.nbytes()
                    self.total += storage.nbytes()
                    self.peak = max(self.peak, self.total)
                    weakref.finalize(storage, self._free, key)
        return out


def weight_bytes_of(model):
    """Bytes of a model's parameters (its buffers are the rotary frequencies, a few hundred bytes)."""
    return sum(t.numel() * t.element_size() for t in model.parameters())


def test_the_tracker_counts_live_tensors():
    with PeakTensorBytes() as peak:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = b + 1  # 8 MB live again
        del b, c
        torch.ones(3000, 1000)  # 12 MB, alone
    assert peak.peak == 12_000_000 and peak.total == 0


SHAPES = {  # tiny decoders: MLP-bound, vocabulary-bound, and a narrower MLP with more query heads
    "mlp": dict(hidden_size=256, intermediate_size=1408, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=4000),
    "vocab": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=32000),
    "narrow": dict(hidden_size=128, intermediate_size=384, num_attention_heads=8, num_key_value_heads=2,
                   vocab_size=8000),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(student, teacher) folders per shape."""
    return {name: tuple(build_tiny_model(tmp_path_factory.mktemp(f"{name}-{seed}"), seed=seed, **shape)
                        for seed in (0, 1)) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("level", ["fp32", "bf16"])
def test_weight_bytes_are_exact(tiny_dirs, level):
    path = tiny_dirs["mlp"][0]
    model = lm.load_model(str(path), "cpu", torch.float32 if level == "fp32" else torch.bfloat16)
    assert gpu_memory.weight_bytes(lm.model_config(path), level) == weight_bytes_of(model)


def test_nf4_weight_bytes_match_bitsandbytes(tiny_dirs):
    path = tiny_dirs["mlp"][0]
    model = lm.load_model(str(path), "cpu", torch.bfloat16, level="bnb-nf4")
    absmax = sum(p.quant_state.absmax.nbytes for p in model.parameters() if getattr(p, "quant_state", None))
    assert absmax > 0  # the 4-bit blocks' scales, outside the parameters
    assert gpu_memory.weight_bytes(lm.model_config(path), "bnb-nf4") == pytest.approx(
        weight_bytes_of(model) + absmax, rel=1e-3)


def test_lora_parameter_count(tiny_dirs):
    path = tiny_dirs["narrow"][0]
    student = d.lora_student(str(path), torch.bfloat16, True)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert gpu_memory.lora_params(lm.model_config(path), d.LORA_R) == trainable


def random_batch(vocab, sequences, width, response):
    """Both sides of `sequences` random sequences of width tokens, the last `response` of them answer tokens."""
    gen = torch.Generator().manual_seed(0)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, vocab - 10, (sequences, width), generator=gen)
        labels = ids.clone()
        labels[:, :width - response] = -100
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": labels})
    return batch


def add_topk(batch, teacher, vocab):
    """The batch with the teacher's stored top-k, as --store-topk writes it."""
    head = d.output_head(teacher)
    for side in ("chosen", "rejected"):
        rows, pos, targets = d.response_positions(batch[f"{side}_labels"])
        with torch.no_grad():
            hidden = d.teacher_hidden(teacher, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            stored = d.teacher_topk(d.head_logits(head, hidden[rows, pos], vocab), targets, d.TOPK)
        batch.update({f"{side}_topk_{f}": v for f, v in stored.items()})
    return batch


def measured_train_step(student_dir, teacher_dir, route, sequences, width, response, chunk):
    """Weights plus the peak tensor bytes of two LoRA steps (bf16 base, gradient checkpointing, AdamW; the second
    step runs with the optimizer state of the first), as 01 trains on a GPU."""
    student = d.lora_student(str(student_dir), torch.bfloat16, True).train()
    teacher = lm.load_model(str(teacher_dir), "cpu", torch.bfloat16)
    vocab = student.get_output_embeddings().weight.shape[0]
    batch = random_batch(vocab, sequences, width, response)
    if route == "topk":
        batch, teacher = add_topk(batch, teacher, vocab), None
    optim = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    cfg = d.LossConfig(chunk=chunk, vocab_size=vocab)
    with PeakTensorBytes(*[m for m in (student, teacher) if m is not None]) as peak:
        for _ in range(2):
            loss, _ = d.distill_loss(student, teacher, batch, cfg)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
    return peak.peak + weight_bytes_of(student) + (weight_bytes_of(teacher) if teacher is not None else 0)


@pytest.mark.parametrize("shape,route,sequences,width,response,chunk", [
    ("mlp", "model", 2, 256, 64, 128),
    ("mlp", "topk", 2, 256, 64, 128),
    ("vocab", "model", 2, 128, 100, 128),
    ("vocab", "topk", 2, 128, 100, 128),
    ("narrow", "model", 3, 96, 48, 64),
    ("narrow", "topk", 3, 96, 48, 64),
])
def test_train_step_formula_bounds_the_measured_peak(tiny_dirs, shape, route, sequences, width, response, chunk):
    student_dir, teacher_dir = tiny_dirs[shape]
    measured = measured_train_step(student_dir, teacher_dir, route, sequences, width, response, chunk)
    config = lm.model_config(student_dir)
    both = 2 * sequences  # chosen and rejected sides of distillm_v2
    planned = gpu_memory.train_step_bytes(config, both, width, both * response, chunk, d.LORA_R,
                                          teacher=config if route == "model" else None,
                                          topk=d.TOPK if route == "topk" else None)
    assert measured <= planned <= 1.25 * measured, (measured, planned)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("sampled", [False, True])
def test_answering_formula_bounds_the_measured_peak(tiny_dirs, shape, sampled):
    path = tiny_dirs[shape][0]
    model = lm.load_model(str(path), "cpu", torch.bfloat16)
    sequences, prompt, new = 8, 192, 24
    ids = torch.randint(0, 1000, (sequences, prompt), generator=torch.Generator().manual_seed(0))
    decoding = dict(do_sample=True, temperature=0.7, top_p=0.9) if sampled else dict(do_sample=False)
    with PeakTensorBytes(model) as peak, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **decoding)
    measured = peak.peak + weight_bytes_of(model)
    planned = gpu_memory.answering_bytes(lm.model_config(path), "bf16", sequences, prompt, new, sampled)
    assert measured <= planned <= 1.25 * measured, (measured, planned)


@pytest.mark.parametrize("shape", ["mlp", "vocab"])
def test_topk_store_formula_bounds_the_measured_peak(tiny_dirs, shape):
    _, teacher_dir = tiny_dirs[shape]
    teacher = lm.load_model(str(teacher_dir), "cpu", torch.bfloat16)
    tokenizer = d.training_tokenizer(str(teacher_dir))
    pairs = [dict(prompt=[{"role": "user", "content": "개인정보 보호법 " * 20}], prefix="",
                  chosen="금융보안 전문가 " * 60, rejected="핵심 용어 " * 60)] * 4
    vocab = lm.model_config(teacher_dir)["vocab_size"]  # every row: the formula's V
    with PeakTensorBytes(teacher) as peak:
        stored = d.pairs_topk(teacher, tokenizer, pairs, 0, vocab, 1.0, d.TOPK, batch_pairs=4, chunk=64)
    encoded = d.encode_pair(tokenizer, pairs[0])
    positions = sum(label != -100 for label in encoded["rejected_labels"][1:])
    assert stored["3/rejected/ids"].shape == (positions, d.TOPK) and stored["3/rejected/rest"].shape == (positions,)
    measured = peak.peak + weight_bytes_of(teacher)
    planned = gpu_memory.topk_store_bytes(lm.model_config(teacher_dir), "bf16", 4, len(encoded["chosen_input_ids"]),
                                          64, d.TOPK)
    assert measured <= planned <= 1.25 * measured, (measured, planned)


# ----------------------------------------------------------------------------- the real models' numbers
def test_qwen_constants_give_the_sizes_of_the_issue():
    """bf16 weights of Qwen2.5-7B/14B/32B are 14.2, 27.5 and 61.0 GiB (7.6B, 14.8B, 32.8B parameters); nf4 keeps the
    embeddings and lm_head in bf16 and adds bitsandbytes' scales."""
    sizes = {name: gpu_memory.weights_gib(config) for name, config in gpu_memory.QWEN25.items()}
    assert [round(sizes[n], 1) for n in ("7B", "14B", "32B")] == [14.2, 27.5, 61.0]
    nf4 = [gpu_memory.weights_gib(gpu_memory.QWEN25[n], "bnb-nf4") for n in ("7B", "14B", "32B")]
    assert [round(x, 1) for x in nf4] == [5.4, 9.8, 19.3]


# ----------------------------------------------------------------------------- placing the teacher
def test_device_names_for_the_per_device_settings():
    assert lm.device_name("cpu:0") == lm.device_name(torch.device("cpu")) == "cpu"
    assert lm.device_name(torch.device("cuda", 1)) == "cuda:1" and lm.device_kind("cuda:1") == "cuda"


def test_load_model_spreads_over_devices_with_max_memory(tiny_model_dir):
    model = lm.load_model(str(tiny_model_dir), "auto", torch.float32, max_memory={"cpu": "1GiB"})
    assert model.device.type == "cpu" and not model.training


def test_the_cpu_teacher_is_frozen_in_the_given_dtype(tiny_model_dir):
    teacher = lm.load_teacher(str(tiny_model_dir), "cpu:0", 5.0, torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture
def two_gpus(monkeypatch):
    """Two stand-in GPUs: cuda:0 with 40 GiB free (the student's), cuda:1 with 79 GiB."""
    free = {"cuda:0": 40.0, "cuda:1": 79.0}
    monkeypatch.setattr(lm, "gpu_free_gib", lambda device: free[lm.device_name(device)])
    monkeypatch.setattr(lm, "pick_device", lambda device="auto": device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    return free


def test_the_teacher_takes_the_most_precise_level_that_fits(two_gpus, monkeypatch):
    fourteen = gpu_memory.QWEN25["14B"]  # bf16 27.5, int8 ~15, nf4 9.8 GiB
    monkeypatch.setattr(lm, "TEACHER_DEVICE", "same")
    assert lm.teacher_placement("cuda:0", 5.0, fourteen) == ("cuda:0", "bf16", None)  # 40 - 1 - 5 >= 27.5
    assert lm.teacher_placement("cuda:0", 15.0, fourteen)[1] == "bnb-int8"
    assert lm.teacher_placement("cuda:0", 25.0, fourteen)[1] == "bnb-nf4"
    with pytest.raises(SystemExit, match="FSKU_TEACHER_DEVICE=cuda:N"):
        lm.teacher_placement("cuda:0", 35.0, fourteen)
    monkeypatch.setattr(lm, "TEACHER_DEVICE", "cuda:1")  # a card of its own: the student's reserve is not taken there
    assert lm.teacher_placement("cuda:0", 35.0, gpu_memory.QWEN25["32B"]) == ("cuda:1", "bf16", None)


def test_auto_spreads_the_teacher_and_keeps_the_students_working_memory_free(two_gpus, monkeypatch):
    monkeypatch.setattr(lm, "TEACHER_DEVICE", "auto")
    place, level, memory = lm.teacher_placement("cuda:0", 9.0, gpu_memory.QWEN25["32B"])
    headroom = gpu_memory.HEADROOM_GIB
    assert place == "auto" and memory == {0: f"{40 - headroom - 9:.2f}GiB", 1: f"{79 - headroom:.2f}GiB"}
    assert level == "bf16"  # 61 GiB fit in 30 + 78


def test_load_teacher_on_a_gpu_loads_where_placed(two_gpus, monkeypatch, tiny_model_dir):
    loaded = []
    monkeypatch.setattr(lm, "TEACHER_DEVICE", "cuda:1")
    monkeypatch.setattr(lm, "pick_dtype", lambda device, dtype=None, level="float": torch.bfloat16)
    monkeypatch.setattr(lm, "load_model", lambda model_id, device, dtype, level=None, max_memory=None: loaded.append(
        (device, level, max_memory)) or torch.nn.Linear(2, 2))
    teacher = lm.load_teacher(str(tiny_model_dir), torch.device("cuda", 0), 3.0)
    assert loaded == [("cuda:1", "bf16", None)] and not any(p.requires_grad for p in teacher.parameters())


def test_stage_reserves_come_from_the_formulas(tiny_model_dir):
    d00 = importlib.import_module("00_generate_pairs")
    assert d.step_reserve_gib(str(tiny_model_dir), str(tiny_model_dir), "cpu") == 0.0
    assert d.step_reserve_gib(str(tiny_model_dir), str(tiny_model_dir), "cuda") > 0
    assert d.store_reserve_gib(str(tiny_model_dir), "cuda") > 0 == d.store_reserve_gib(str(tiny_model_dir), "cpu")
    assert d00.BATCH["cuda"] >= d00.BATCH["cpu"] and d.BATCH_PAIRS["cuda"] >= d.BATCH_PAIRS["cpu"]


# ----------------------------------------------------------------------------- the plan
def test_gpu_plan_tables_every_stage_and_says_what_fits(tiny_model_dir, tmp_path, monkeypatch):
    plan = importlib.import_module("gpu_plan")
    test_pairs = importlib.import_module("test_pairs")
    chunks = test_pairs.law_chunks() + test_pairs.longest_template_chunks()
    monkeypatch.setattr(plan.pairs_step, "load_chunks", lambda tokenizer: chunks)
    monkeypatch.setattr(plan.common, "STUDENT_MODEL", str(tiny_model_dir))
    monkeypatch.setattr("sys.argv", ["gpu_plan.py", "--out", str(tmp_path / "gpu-plan.md")])
    plan.main()
    text = (tmp_path / "gpu-plan.md").read_text(encoding="utf-8")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
            if line.startswith("| 0")}
    assert len(rows) == 8 + 4 + 1 + 4 + 6  # 00 (one card, two cards), store, train from top-k, with teacher, 04
    for name in ("7B", "14B", "32B"):
        for level in ("bf16", "nf4"):
            assert ("04 answering", f"{name} {level}") in rows
    top_k = rows[("01 training from the stored top-64", "student 7B bf16 + LoRA r16")]
    assert top_k.split("|")[4].strip().startswith("fits")  # 01 fits one 24 GB card: the stored top-k route
    loaded = [line for key, line in rows.items() if key[0] == "01 training, teacher loaded"]
    assert len(loaded) == 4 and all(line.split("|")[4].strip() == "**no**" for line in loaded)
    assert "## Generation at scale: vLLM for 00, on paper" in text and "| 32B bf16 |" in text
