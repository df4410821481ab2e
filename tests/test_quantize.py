"""05_quantize.py: every level against full precision on a tiny model, the selection rule, the whole sweep."""
import importlib
import json
import shutil
import sys

import pytest
import torch

import common
import competition
import lm
from conftest import build_tiny_model

quantize = importlib.import_module("05_quantize")
infer = importlib.import_module("04_infer")

# Largest |logit - fp32 logit| allowed, as a share of the largest |fp32 logit|, on the tiny random model. 4-bit
# weights of a 32-wide random model are coarse (NF4 measured 0.14 here); 8-bit and half precision stay near 1%.
BOUNDS = {"fp32": 1e-6, "bf16": 0.03, "fp16": 0.01, "bnb-int8": 0.03, "bnb-nf4": 0.25, "bnb-nf4-dq": 0.25,
          "torchao-int8wo": 0.03, "torch-int8-dynamic": 0.05}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def level_model_dir(tmp_path_factory):
    """The tiny model widened to 64: bitsandbytes' packed 4-bit CPU kernel (used on AVX512-BF16 machines) needs
    in_features of at least one 64-wide block and out_features divisible by 32; the shared tiny model is 32 wide."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-levels"), hidden_size=64, intermediate_size=128)


def logits_of(model_dir, dtype=None):
    model = lm.load_model(str(model_dir), "cpu", dtype or lm.pick_dtype("cpu", None, str(model_dir)))
    with torch.no_grad():
        return model(IDS).logits.float()


def test_every_level_has_a_bound():
    assert set(BOUNDS) == set(quantize.LEVELS)
    assert quantize.REFERENCE in quantize.LEVELS and set(quantize.MEASURE) <= set(quantize.LEVELS)


@pytest.mark.parametrize("level", sorted(quantize.LEVELS))
def test_level_saves_reloads_and_stays_near_full_precision(level, level_model_dir, tmp_path):
    reason = quantize.level_runnable(level, "cpu")
    if reason:
        pytest.skip(f"{level} cannot run on this CPU: {reason}")
    ref = logits_of(level_model_dir, torch.float32)
    out = tmp_path / level
    quantize.build_level(level_model_dir, level, out)
    assert (out / "DONE").exists() and (out / "tokenizer.json").exists()
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["quantization"]["level"] == level
    # The folder loads at its level with no settings from the caller: the dtype and method travel with it.
    assert lm.pick_dtype("cpu", None, str(out)) == getattr(torch, quantize.LEVELS[level]["dtype"])
    got = logits_of(out)
    error = (got - ref).abs().max().item() / ref.abs().max().item()
    assert error <= BOUNDS[level], f"{level}: relative logit error {error:.4f} > {BOUNDS[level]}"
    if level != "fp32":
        assert error > 0  # the level really changed the weights


def test_levels_a_device_cannot_run_say_why():
    assert "cpu" in quantize.level_runnable("torch-int8-dynamic", "cuda")
    assert quantize.level_runnable("bf16", "cpu") is None


def test_after_load_method_refuses_a_gpu():
    with pytest.raises(SystemExit, match="CPU only"):
        lm.quantize_after_load(torch.nn.Linear(2, 2), "torch-int8-dynamic", "cuda")
    with pytest.raises(SystemExit, match="05_quantize"):
        lm.quantize_after_load(torch.nn.Linear(2, 2), "int3-magic", "cpu")


# ----------------------------------------------------------------------------- selection on synthetic tables
def row(level, score, hours, disk=1.0, runnable=True):
    return dict(level=level, score=score, projected_s=hours * 3600, disk_gib=disk, runnable=runnable)


def test_select_takes_the_best_score_inside_the_margin():
    rows = [row("fp32", 0.60, 4.0), row("bf16", 0.55, 2.0), row("nf4", 0.50, 1.0)]
    chosen, warning, _ = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8, tolerance=0.0)
    assert chosen["level"] == "bf16" and warning is None  # fp32 scores best but 4.0 h > 0.8 x 4.5 h


def test_select_breaks_ties_by_time_then_disk():
    rows = [row("fp32", 0.550, 3.0), row("bf16", 0.548, 2.0, disk=1.2), row("int8", 0.548, 2.0, disk=0.7)]
    chosen, _, tied = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8, tolerance=0.005)
    assert chosen["level"] == "int8"
    chosen, _, tied = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8, tolerance=0.0)
    assert chosen["level"] == "fp32"


def test_paired_standard_error_by_hand():
    labels = {i: dict(kind="mc", Answer="1") for i in "abcd"} | {"x": dict(kind="desc", Answer="설명")}
    a = dict(answers={"a": "1", "b": "1", "c": "2", "d": "1", "x": "가"})
    b = dict(answers={"a": "1", "b": "2", "c": "2", "d": "2", "x": "나"})
    # differences in correctness: 0, 1, 0, 1 -> mean 0.5, sample variance 1/3, SE of the mean sqrt(1/12); half of it
    assert quantize.paired_se(a, b, labels) == pytest.approx(0.5 * (1 / 12) ** 0.5)
    assert quantize.paired_se(a, a, labels) == 0.0  # identical answers: no noise between them


def test_select_treats_a_win_inside_the_noise_as_a_tie():
    rows = [row("bf16", 0.385, 0.07), row("nf4", 0.407, 0.08)]
    chosen, _, tied = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8, tolerance=0.005, noise=lambda a, b: 0.025)
    assert chosen["level"] == "bf16"  # 0.022 ahead but the paired SE is 0.025: tied, and bf16 is faster
    assert [r["level"] for r in tied] == ["bf16", "nf4"]
    chosen, _, tied = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8, tolerance=0.005, noise=lambda a, b: 0.01)
    assert chosen["level"] == "nf4"


def test_select_with_nothing_under_budget_takes_the_fastest_and_warns():
    rows = [row("fp32", 0.6, 9.0), row("nf4", 0.4, 6.0), row("gone", 0.9, 0.1, runnable=False)]
    chosen, warning, _ = quantize.select(rows, limit_s=4.5 * 3600, margin=0.8)
    assert chosen["level"] == "nf4" and "fastest" in warning and "nf4" in warning


def test_select_refuses_when_nothing_ran():
    with pytest.raises(SystemExit, match="no quantization level"):
        quantize.select([row("a", None, 1.0), row("b", 0.5, 1.0, runnable=False)])


def test_projection_and_agreement():
    result = dict(load_s=10.0, mc_s=2.0, desc_s=20.0, rerank_s=1.0, rag=True)
    assert quantize.projected_seconds(result, n_mc=500, n_desc=15) == 10 + 500 * 3 + 15 * 21
    # Answers without passages: the reranker is measured for agreement but not run by `make submission`.
    assert quantize.projected_seconds(dict(result, rag=False), n_mc=500, n_desc=15) == 10 + 500 * 2 + 15 * 20
    ref = dict(answers={"a": "1", "b": "2", "d": "설명"}, rerank_orders={"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]})
    got = dict(answers={"a": "1", "b": "3", "d": "다른 설명"}, rerank_orders={"a": [1, 3, 2, 9], "b": [6, 5, 8, 7]})
    a = quantize.agreement(got, ref)
    assert a["mc_agree"] == 0.5  # the descriptive answer is not counted
    assert a["rerank_top1"] == 0.5
    assert a["rerank_keep"] == pytest.approx((3 / 3 + 2 / 3) / 2)


def test_spread_takes_evenly_and_all_for_zero():
    assert quantize.spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert quantize.spread(list(range(3)), 0) == [0, 1, 2] and quantize.spread(list(range(3)), 7) == [0, 1, 2]


def test_svg_draws_the_limit_and_every_level():
    svg = quantize.svg_plot([row("bf16", 0.5, 1.0), row("nf4", 0.45, 0.5)], 4.5 * 3600, 0.8, "bf16")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "4.5 h limit" in svg and svg.count("<circle") == 2 and 'fill="green"' in svg
    assert "1  bf16  0.500  1.00 h" in svg and "2  nf4  0.450  0.50 h" in svg  # the legend names every point


# ----------------------------------------------------------------------------- the sweep, end to end (tiny)
QUESTIONS = [("M1", "전자서명이란?\n1 서명\n2 보호\n3 안전\n4 보고", "1"),
             ("M2", "개인정보처리자의 의무는?\n1 보고\n2 보호\n3 서명\n4 안전", "2"),
             ("D1", "전자금융거래의 안전성을 설명하세요.", "안전성을 확보하여야 한다")]


@pytest.fixture
def sweep(tiny_model_dir, tmp_path, monkeypatch):
    """05 wired to a tiny base student, a 3-question evaluation set, no index, and in-process child steps."""
    base = tmp_path / "student-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "DONE").touch()
    monkeypatch.setattr(common, "STUDENT_BASE", base)
    monkeypatch.setattr(common, "DISTILLED_MERGED", tmp_path / "no-distilled")
    monkeypatch.setattr(common, "INDEX", tmp_path / "no-index")
    monkeypatch.setattr(common, "MODELS", tmp_path)
    monkeypatch.setattr(common, "FINAL", tmp_path / "student-final")
    monkeypatch.setattr(common, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(quantize, "OUT", tmp_path / "05")
    monkeypatch.setattr(infer, "DESC_MAX_NEW_TOKENS", 4)
    questions = [competition.parse_question(i, t) for i, t, _ in QUESTIONS]
    labels = {i: dict(kind="desc" if i.startswith("D") else "mc", Answer=a, domain="테스트", Keyword="안전성")
              for i, _, a in QUESTIONS}
    monkeypatch.setattr(quantize, "eval_set", lambda: (questions, labels))
    # A level that cannot run here, to check it is reported rather than skipped.
    monkeypatch.setitem(quantize.LEVELS, "gpu-only", dict(dtype="float16", devices=("cuda",)))
    monkeypatch.setattr(quantize, "MEASURE", ["bf16", "fp32", "gpu-only"])
    steps = []

    def in_process(args):
        steps.append(args[0])
        values = dict(zip(args[::2], args[1::2]))
        if "--build" in values:
            quantize.build_level(values["--source"], values["--build"], quantize.Path(values["--dir"]))
        else:
            quantize.measure_level(quantize.Path(values["--dir"]), values["--measure"], quantize.Path(values["--work"]))
        return 0

    monkeypatch.setattr(quantize, "run_step", in_process)
    monkeypatch.setattr(sys, "argv", ["05_quantize.py"])
    return tmp_path, steps


def test_sweep_measures_selects_saves_and_reports(sweep):
    tmp_path, steps = sweep
    quantize.main()
    final = tmp_path / "student-final"
    assert (final / "DONE").exists()
    meta = json.loads((final / "selection.json").read_text(encoding="utf-8"))
    assert meta["chosen"]["level"] in ("bf16", "fp32") and meta["chosen"]["source_name"] == "base"
    fingerprint = lm.model_fingerprint(str(final))
    text = (tmp_path / "reports" / "quantize.md").read_text(encoding="utf-8")
    assert "| gpu-only | not run: runs on cuda only, not cpu |" in text
    assert "**(chosen)**" in text and "quantize.svg" in text and "Tied with the best score here: " in text
    assert (tmp_path / "reports" / "quantize.svg").exists()
    result = json.loads((tmp_path / "05" / "base-bf16" / "result.json").read_text(encoding="utf-8"))
    assert result["n_mc"] == 2 and result["n_desc"] == 1 and result["disk_gib"] > 0
    assert not (tmp_path / "05" / "base-bf16" / "model").exists()  # only the chosen level keeps its weights
    # 04's meta beside the answers: a rerun served from the checkpoint keeps the speed and memory measured here
    assert (tmp_path / "05" / "base-bf16" / "answers" / "meta.json").exists()
    # The chosen folder is what 04 answers with: it loads at its own level.
    assert lm.pick_dtype("cpu", None, str(final)) == getattr(torch, quantize.LEVELS[meta["chosen"]["level"]]["dtype"])
    assert steps.count("--measure") == 2

    # A rerun measures nothing: every level's result is current.
    steps.clear()
    quantize.main()
    assert steps == ["--build"]  # only the chosen level is rebuilt into models/student-final
    assert lm.model_fingerprint(str(final)) == fingerprint  # same weights: 03 and 04 reuse their checkpoints


def test_report_only_never_measures(sweep, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["05_quantize.py", "--report-only"])
    with pytest.raises(SystemExit, match="make quantize"):
        quantize.main()


def test_the_distilled_student_is_quantized_only_after_a_clear_win(monkeypatch):
    scores = {"base": 0.382, "distilled": 0.385}  # measured here: a 1-step smoke adapter, 0.003 ahead on 108 questions
    monkeypatch.setattr(quantize, "sources", lambda: {"base": "b", "distilled": "d"})
    monkeypatch.setattr(quantize, "measure", lambda name, path, level, device, missing_ok=True: dict(
        source=name, level=level, score=scores[name], runnable=True, load_s=0.0, mc_s=1.0, desc_s=1.0))
    monkeypatch.setattr(quantize, "MEASURE", ["bf16"])
    name, path, rows, source_rows = quantize.collect("cpu", noise=lambda a, b: 0.0)
    assert (name, path) == ("base", "b") and [r["source"] for r in source_rows] == ["base", "distilled"]
    scores["distilled"] = 0.45
    assert quantize.collect("cpu", noise=lambda a, b: 0.0)[0] == "distilled"
    assert quantize.collect("cpu", noise=lambda a, b: 0.1)[0] == "base"  # 0.068 ahead inside a 0.1 noise margin


def test_a_repeated_library_warning_is_shown_once():
    import logging

    seen = []
    log = logging.getLogger("test.first-only")
    log.propagate = False
    handler = logging.Handler()
    handler.emit = seen.append
    log.addHandler(handler)
    log.addFilter(lm._FirstOnly())
    for _ in range(3):
        log.warning("MatMul8bitLt: inputs will be cast from %s to float16", "torch.bfloat16")
    log.warning("another message")
    assert [r.getMessage() for r in seen] == ["MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16",
                                              "another message"]


def test_level_key_follows_settings_and_versions_not_source_text(tiny_model_dir, monkeypatch):
    key = quantize.level_key(tiny_model_dir, "bf16", indexed=False)
    assert key == quantize.level_key(tiny_model_dir, "bf16", indexed=False)
    assert key != quantize.level_key(tiny_model_dir, "bnb-nf4", indexed=False)
    monkeypatch.setattr(infer, "DESC_MAX_NEW_TOKENS", 7)
    changed = quantize.level_key(tiny_model_dir, "bf16", indexed=False)
    monkeypatch.undo()
    monkeypatch.setattr(common, "MC_INSTRUCTION", "다른 지시문")
    assert len({key, changed, quantize.level_key(tiny_model_dir, "bf16", indexed=False)}) == 3
    monkeypatch.undo()
    monkeypatch.setattr(lm, "versions", lambda *packages: dict(bitsandbytes="0.0"))
    assert quantize.level_key(tiny_model_dir, "bf16", indexed=False) != key


def test_level_key_ignores_retrieval_settings_while_no_passages_are_used(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(infer, "RAG_PASSAGES", 0)
    key = quantize.level_key(tiny_model_dir, "bf16", indexed=False)
    monkeypatch.setattr(infer, "RAG_METHOD", "bm25")
    monkeypatch.setattr(infer, "RAG_NO_COPY_TOKENS", 3)
    assert quantize.level_key(tiny_model_dir, "bf16", indexed=False) == key
    monkeypatch.setattr(infer, "RAG_PASSAGES", 3)
    with_passages = quantize.level_key(tiny_model_dir, "bf16", indexed=False)
    monkeypatch.setattr(infer, "RAG_METHOD", "fused")
    assert len({key, with_passages, quantize.level_key(tiny_model_dir, "bf16", indexed=False)}) == 3
