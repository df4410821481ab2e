"""Levels (lm.LEVELS) against full precision on a tiny model; 05_quantize.py's calibrations, projection, selection
rule and the whole three-stage measurement."""
import argparse
import dataclasses
import importlib
import json
import math
import shutil

import pytest
import torch

import answering
import common
import competition
import lm
import retrieval
from conftest import build_tiny_model

quantize = importlib.import_module("05_quantize")

# Largest |logit - fp32 logit| allowed, as a share of the largest |fp32 logit|, on the tiny random model. 4-bit
# weights of a 64-wide random model are coarse (NF4 measured 0.14 here); 8-bit and half precision stay near 1%.
BOUNDS = {"float": 0.03, "fp32": 1e-6, "bf16": 0.03, "fp16": 0.01, "bnb-int8": 0.03, "bnb-nf4": 0.25,
          "bnb-nf4-dq": 0.25, "torchao-int8wo": 0.03, "torch-int8-dynamic": 0.05}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def level_model_dir(tmp_path_factory):
    """The tiny model widened to 64: bitsandbytes' packed 4-bit CPU kernel (used on AVX512-BF16 machines) needs
    in_features of at least one 64-wide block and out_features divisible by 32; the shared tiny model is 32 wide."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-levels"), hidden_size=64, intermediate_size=128)


def logits_of(model_dir, level=None, dtype=None):
    model = lm.load_model(str(model_dir), "cpu", dtype or lm.pick_dtype("cpu", level=level), level=level)
    with torch.no_grad():
        return model(IDS).logits.float()


def test_point_names_parse_back():
    for fields in [("teacher", "float", 0, False), ("student-distilled", "bnb-nf4", 3, True), ("a-b", "fp16", 1, False),
                   ("teacher", "bnb-nf4-dq", 2, False)]:
        assert quantize.parse_point_name(quantize.point_name(*fields)) == fields
    assert quantize.parse_point_name("index-teacher") is None and quantize.parse_point_name("teacher-q9-p1") is None
    assert quantize.index_folder("teacher").parent == quantize.OUT


def test_every_level_has_a_bound_and_every_measured_level_exists():
    assert set(BOUNDS) == set(lm.LEVELS)
    assert all(set(levels) <= set(lm.LEVELS) for levels in quantize.LEVELS.values())


@pytest.mark.parametrize("level", sorted(lm.LEVELS))
def test_level_loads_quantized_and_stays_near_full_precision(level, level_model_dir):
    reason = lm.level_runnable(level, "cpu")
    if reason:
        pytest.skip(f"{level} cannot run on this CPU: {reason}")
    ref = logits_of(level_model_dir, dtype=torch.float32)
    got = logits_of(level_model_dir, level)
    error = (got - ref).abs().max().item() / ref.abs().max().item()
    assert error <= BOUNDS[level], f"{level}: relative logit error {error:.4f} > {BOUNDS[level]}"
    if level not in ("fp32", "float") or lm.pick_dtype("cpu") != torch.float32:
        assert level == "fp32" or error > 0  # the level really changed the weights


def test_levels_a_device_cannot_run_say_why():
    assert "cpu" in lm.level_runnable("torch-int8-dynamic", "cuda")
    assert lm.level_runnable("fp32", "cpu") is None


def test_after_load_method_refuses_a_gpu():
    with pytest.raises(SystemExit, match="CPU only"):
        lm.quantize_after_load(torch.nn.Linear(2, 2), "torch-int8-dynamic", "cuda")
    with pytest.raises(SystemExit, match="LEVELS"):
        lm.quantize_after_load(torch.nn.Linear(2, 2), "int3-magic", "cpu")


def fake_gflops(fp32, bf16, calls=None, all_threads=None):
    """A stand-in for lm._matmul_gflops: the given GFLOP/s on lm.DTYPE_BENCH_THREADS threads, all_threads' pair (or
    the same) on every thread; each call is logged in calls."""
    def measure(dtypes, threads=None, *args):
        if calls is not None:
            calls.append(threads)
        pair = (fp32, bf16) if threads or not all_threads else all_threads
        return dict(zip(dtypes, pair))
    return measure


def test_cpu_dtype_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("FSKU_CPU_DTYPE", raising=False)
    monkeypatch.setattr(lm.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    cache = tmp_path / "machine.json"
    calls = []
    monkeypatch.setattr(lm, "_matmul_gflops", fake_gflops(100.0, 400.0, calls))
    assert lm.cpu_float_dtype(cache) == "bfloat16" and calls == [lm.DTYPE_BENCH_THREADS, None]
    assert lm.cpu_float_dtype(cache) == "bfloat16" and len(calls) == 2  # cached: no second benchmark
    known = json.loads(cache.read_text(encoding="utf-8"))
    assert known["gflops"] == dict(float32=100.0, bfloat16=400.0)
    known["key"] = "another machine"
    cache.write_text(json.dumps(known), encoding="utf-8")
    monkeypatch.setattr(lm, "_matmul_gflops", fake_gflops(60.0, 7.0))
    assert lm.cpu_float_dtype(cache) == "float32"  # an AVX2 machine: bf16 is slower, fp32 is chosen
    known = json.loads(cache.read_text(encoding="utf-8"))
    cache.write_text(json.dumps(dict(known, load_average=3.0)), encoding="utf-8")  # taken while the cores were busy
    calls.clear()
    monkeypatch.setattr(lm, "_matmul_gflops", fake_gflops(60.0, 60.0, calls))
    lm.cpu_float_dtype(cache)
    assert len(calls) == 2 and json.loads(cache.read_text(encoding="utf-8"))["load_average"] == 0.5  # taken again
    monkeypatch.setenv("FSKU_CPU_DTYPE", "bfloat16")
    assert lm.cpu_float_dtype(cache) == "bfloat16"


def test_cpu_dtype_is_decided_on_the_bench_threads(tmp_path, monkeypatch):
    """A job beside the benchmark can make bf16 look no faster on every thread (70 vs 66 GFLOP/s, measured so) while
    one thread still shows its real ratio: the one-thread figures decide, the all-thread ones are kept as speed."""
    monkeypatch.delenv("FSKU_CPU_DTYPE", raising=False)
    monkeypatch.setattr(lm.os, "getloadavg", lambda: (1.8, 1.8, 1.8))
    monkeypatch.setattr(lm, "_matmul_gflops", fake_gflops(70.0, 160.0, all_threads=(66.0, 70.0)))
    cache = tmp_path / "machine.json"
    assert lm.cpu_float_dtype(cache) == "bfloat16"
    known = json.loads(cache.read_text(encoding="utf-8"))
    assert known["gflops"] == dict(float32=66.0, bfloat16=70.0) and known["gflops_threads"]["bfloat16"] == 160.0


def test_matmul_benchmark_times_both_dtypes_and_restores_the_threads():
    threads = torch.get_num_threads()
    gflops = lm._matmul_gflops((torch.float32, torch.bfloat16), threads=1, shape=(8, 32, 64), repeats=2)
    assert set(gflops) == {torch.float32, torch.bfloat16} and all(v > 0 for v in gflops.values())
    assert torch.get_num_threads() == threads


# ----------------------------------------------------------------------------- calibrations scored offline
def full_shift_record(qid, content, position):
    """A record scored under all cyclic shifts of 4 options: the model's score of option i shown at position j is
    content[i] + position[j], returned in the original option order (as answering.answer_mc stores it)."""
    n = len(content)

    def observed(shift):  # position j shows option (j + shift) % n
        at = [content[(j + shift) % n] + position[j] for j in range(n)]
        return answering.unshift(at, shift)

    return dict(id=qid, kind="mc", logprobs=observed(0), shifts={str(s): observed(s) for s in range(1, n)})


def test_permutation_mean_cancels_a_position_bias():
    position = [0.0, 0.0, 0.0, 3.0]  # a strong preference for the last position
    record = full_shift_record("a", [0.0, 1.0, 0.0, 0.0], position)  # the content favours option 2
    assert answering.calibrated_answers([record], "none") == {"a": "4"}
    assert answering.calibrated_answers([record], "permute") == {"a": "2"}


def test_pride_estimates_the_position_prior_and_removes_it_from_unpermuted_questions():
    position = [1.5, 0.0, 0.0, 0.0]
    estimate = [full_shift_record(f"e{i}", [0.5 * (i % 4 == k) for k in range(4)], position) for i in range(8)]
    plain = dict(full_shift_record("p", [0.0, 0.0, 1.0, 0.0], position), shifts={})
    prior = answering.pride_prior(estimate)[4]
    assert max(range(4), key=prior.__getitem__) == 0 and prior[0] - prior[1] == pytest.approx(1.5, abs=1e-6)
    assert answering.calibrated_answers(estimate + [plain], "none")["p"] == "1"
    assert answering.calibrated_answers(estimate + [plain], "pride")["p"] == "3"


def test_shifts_follow_the_calibration():
    questions = [competition.parse_question(f"q{i}", f"문제 {i}?\n" + "\n".join(f"{k} 보기{k}" for k in range(1, 5)))
                 for i in range(40)] + [competition.parse_question("d", "개념을 설명하세요.")]
    permute = answering.shifts_for(questions, answering.Config(calibration="permute", permutations=3))
    assert set(permute) == {q.id for q in questions[:40]} and all(s == [1, 2] for s in permute.values())
    pride = answering.shifts_for(questions, answering.Config(calibration="pride", permutations=4, pride_share=0.1))
    full = [i for i, s in pride.items() if s]
    assert len(full) == answering.BATCH_MIN // 5 and all(pride[i] == [1, 2, 3] for i in full)
    assert all(s == [] for s in answering.shifts_for(questions, answering.Config()).values())


def test_calibration_variants_score_every_calibration_the_records_allow():
    questions = [competition.parse_question(f"q{i}", f"문제 {i}?\n1 가\n2 나\n3 다\n4 라") for i in range(12)]
    records = [full_shift_record(q.id, [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]) for q in questions]
    variants = quantize.calibration_variants(records, questions)
    assert {"none", "batch", "permute-2", "permute-4", "pride-0.1"} <= set(variants)
    assert "permute-5" not in variants  # four options: a fifth shift does not exist
    _, two = variants["permute-2"]
    assert all(set(r["shifts"]) == {"1"} for r in two)
    identity_only = [dict(r, shifts={}) for r in records]
    assert set(quantize.calibration_variants(identity_only, questions)) == {"none", "content_free", "batch", "auto"}


def test_projected_time_by_hand(monkeypatch):
    monkeypatch.setattr(answering, "DESC_PASSAGES", True)
    meta = dict(seconds=dict(load=10.0), timing=dict(mc_s_per_prompt=0.5, desc_s_per_question=4.0))
    plain = dict(calibration="none", permutations=1, pride_share=0.0)
    assert quantize.projected_seconds(meta, plain) == pytest.approx(10 + 500 * 0.5 + 15 * 4)
    permute = dict(calibration="permute", permutations=5, pride_share=0.0)
    five = quantize.TEST_FIVE / quantize.TEST_MC
    assert quantize.test_prompts_per_question(permute) == pytest.approx((1 - five) * 4 + five * 5)
    assert quantize.projected_seconds(meta, plain, rerank_s=1.0) == pytest.approx(10 + 500 * 1.5 + 15 * 5)
    monkeypatch.setattr(answering, "DESC_PASSAGES", False)  # descriptive questions are not reranked
    assert quantize.projected_seconds(meta, plain, rerank_s=1.0) == pytest.approx(10 + 500 * 1.5 + 15 * 4)
    built = dict(meta, index_s=100.0)  # a passage point: `make submission` builds the index first
    assert quantize.projected_seconds(built, plain) == pytest.approx(100 + 10 + 500 * 0.5 + 15 * 4)
    old_row = dict(plain, candidate="teacher", level="float", passages=3)  # a point measured before `rerank`
    assert quantize.as_config(old_row).rerank is True
    # a shifted prompt reuses the identity prompt's cache: timed on its own; a timing without it counts whole prompts
    shifts = dict(meta, timing=dict(meta["timing"], mc_s_per_shift=0.1))
    two = dict(calibration="permute", permutations=2, pride_share=0.0)
    assert quantize.projected_seconds(shifts, two) == pytest.approx(10 + 500 * (0.5 + 0.1) + 15 * 4)
    assert quantize.projected_seconds(meta, two) == pytest.approx(10 + 500 * 1.0 + 15 * 4)
    assert quantize.test_prompts_per_question(dict(two, cascade=0.5)) == 1.0  # composed: the whole question's time


def record_of(qid, probs):
    return dict(id=qid, kind="mc", logprobs=[math.log(p) for p in probs])


def test_cascade_rows_compose_the_passage_prompts_permute_mean():
    # Three questions, all unsure without passages (top below 0.5). With passages, m0 is sure of the wrong option 2 in
    # the identity order and of option 1 in its second order (shift 1): their mean is surer of option 1 than the plain
    # prompt. m1's two orders disagree: the identity order alone and their mean are both less sure than the plain
    # prompt, which answers. m2 is surer with passages in both orders.
    def rec(qid, probs, shift=None, seconds=1.0):
        r = dict(record_of(qid, probs), seconds=seconds, context=[])
        return dict(r, shifts={"1": [math.log(p) for p in shift]}) if shift else r
    plain = {"m0": rec("m0", [0.3, 0.25, 0.25, 0.2], [0.3, 0.25, 0.25, 0.2]),
             "m1": rec("m1", [0.45, 0.2, 0.2, 0.15], [0.45, 0.2, 0.2, 0.15]),
             "m2": rec("m2", [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]),
             "d0": dict(id="d0", kind="desc", raw="전자서명이다.", seconds=2.0, context=[])}
    passages = {"m0": rec("m0", [0.05, 0.9, 0.03, 0.02], [0.97, 0.01, 0.01, 0.01], 3.0),
                "m1": rec("m1", [0.3, 0.4, 0.15, 0.15], [0.4, 0.3, 0.15, 0.15], 3.0),
                "m2": rec("m2", [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.7, 0.1], 3.0),
                "d0": plain["d0"]}
    questions = [competition.parse_question(i, "옳은 것은?\n1 가\n2 나\n3 다\n4 라") for i in ("m0", "m1", "m2")] + \
        [competition.parse_question("d0", "전자서명을 설명하세요.")]
    labels = {"m0": dict(kind="mc", Answer="1"), "m1": dict(kind="mc", Answer="1"), "m2": dict(kind="mc", Answer="3"),
              "d0": dict(kind="desc", Answer="전자서명이다.", Keyword="전자서명")}
    config = dict(candidate="teacher", level="float", calibration="permute", permutations=4, pride_share=0.0,
                  passages=0, rerank=False, passage_share=1.0, cascade=0.0)
    meta = dict(model="m", key="k0", dtype="float32", device="cpu", content_free={}, config=config,
                seconds=dict(load=10.0), timing=dict(mc_s_per_prompt=1.0, mc_s_per_shift=0.5, desc_s_per_question=2.0))
    points = {"teacher-float-p0": (plain, meta),
              "teacher-float-p1": (passages, dict(meta, key="k1", config=dict(config, passages=1, permutations=2),
                                                  timing=dict(mc_s_per_prompt=3.0, mc_s_per_shift=0.6)))}
    rows = {(r["point"], r["calibration"]): r for r in quantize.cascade_rows(points, questions, labels, {})}
    assert set(rows) == {(f"teacher-float-p1-cascade{t}", c) for t in quantize.CASCADE for c in ("none", "permute-2")}
    identity, mean = rows[("teacher-float-p1-cascade0.5", "none")], rows[("teacher-float-p1-cascade0.5", "permute-2")]
    assert [identity["answers"][i] for i in ("m0", "m1", "m2")] == ["2", "1", "3"]
    assert [mean["answers"][i] for i in ("m0", "m1", "m2")] == ["1", "1", "3"]
    assert mean["config"]["calibration"] == "permute" and mean["config"]["permutations"] == 2
    assert answering.Config(**mean["config"]).check().cascade == 0.5
    # the same answers as 04 gives: run_cascade's merge, submitted under the chosen calibration
    again = [answering.only_shifts(passages[i], range(1, 2)) for i in ("m0", "m1", "m2")]
    merged = answering.cascade_merge([answering.only_shifts(plain[q.id], ()) for q in questions], again)
    assert answering.calibrated_answers(merged, "permute") == {i: mean["answers"][i] for i in ("m0", "m1", "m2")}
    # every MC question asked: 1 s without passages + 3 s + one shift of 0.6 s with them, both loads
    assert mean["projected_s"] == pytest.approx(20 + 500 * (1.0 + 3.6) + 15 * 2.0)
    assert identity["projected_s"] == pytest.approx(20 + 500 * (1.0 + 3.0) + 15 * 2.0)


# ----------------------------------------------------------------------------- the choice
LABELS = {f"m{i}": dict(kind="mc", Answer="1") for i in range(100)}


def row(name, correct, seconds):
    """A result row whose first `correct` of 100 MC answers are right."""
    return dict(point=name, calibration="none", score=0.5 * correct / 100, projected_s=seconds,
                each={f"m{i}": float(i < correct) for i in range(100)}, config={})


def test_select_takes_the_best_inside_the_budget():
    rows = [row("fast", 40, 100), row("best", 60, 500), row("too slow", 90, 5000)]
    chosen, tied, warning = quantize.select(rows, LABELS, budget_s=1000)
    assert chosen["point"] == "best" and warning is None and tied == [rows[1]]


def test_a_win_inside_the_noise_is_a_tie_and_the_faster_point_wins():
    rows = [row("fast", 59, 100), row("slow", 60, 500)]
    chosen, tied, _ = quantize.select(rows, LABELS, budget_s=1000)
    assert chosen["point"] == "fast" and len(tied) == 2
    diff, se = quantize.scoring.score_difference(rows[1]["each"], rows[0]["each"], LABELS)
    # one question of 100 differs: MC difference 0.01 (half of it in the score), its SE sqrt(0.01 * 0.99 / 99)
    assert diff == pytest.approx(0.005) and se == pytest.approx(0.5 * math.sqrt(0.01 * 0.99 / 99))
    clear = [row("fast", 50, 100), row("slow", 60, 500)]
    assert quantize.select(clear, LABELS, budget_s=1000)[0]["point"] == "slow"  # ten questions apart: a real win


def test_select_with_nothing_inside_the_budget_takes_the_fastest_and_warns():
    chosen, _, warning = quantize.select([row("a", 50, 3000), row("b", 60, 9000)], LABELS, budget_s=1000)
    assert chosen["point"] == "a" and "fastest" in warning
    with pytest.raises(SystemExit, match="nothing was measured"):
        quantize.select([], LABELS, 1000)


def test_alternatives_step_down_in_time():
    rows = [dict(row("chosen", 60, 900), config=dict(c=0)), dict(row("mid", 55, 500), config=dict(c=1)),
            dict(row("worse-mid", 50, 600), config=dict(c=2)), dict(row("fast", 40, 100), config=dict(c=3))]
    out = quantize.alternatives(rows, LABELS, rows[0])
    assert [a["config"]["c"] for a in out] == [0, 1, 3]


def test_a_slower_machine_falls_back_to_an_alternative_that_fits(tmp_path, monkeypatch):
    slow = dict(candidate="teacher", level="float", calibration="permute", permutations=4, pride_share=0.0,
                passages=0)
    fast = dict(slow, calibration="none", permutations=1)
    other = dict(fast, candidate="student")
    unranked = dict(fast, rerank=False)  # same model and passages, but `make` would skip the reranking
    data = dict(config=slow, figures=dict(budget_s=1000), device="cpu", alternatives=[
        dict(config=slow, projected_s=900), dict(config=other, projected_s=100), dict(config=unranked, projected_s=50),
        dict(config=fast, projected_s=300)],
                machine=dict(cpu_dtype="bfloat16", gflops=dict(bfloat16=400.0)))
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(lm, "pick_device", lambda *a: "cpu")
    monkeypatch.setattr(lm, "cpu_gflops", lambda: 400.0)
    assert answering.chosen(path, fit=True) == answering.Config(**slow)  # as fast as the choosing machine
    monkeypatch.setattr(lm, "cpu_gflops", lambda: 400.0 / 3)  # three times slower: 2700 s over, 900 s fits
    assert answering.chosen(path, fit=True) == answering.Config(**fast)  # never another model or reranking
    monkeypatch.setattr(lm, "cpu_gflops", lambda: 40.0)  # nothing fits: the fastest of the same model and passages
    assert answering.chosen(path, fit=True) == answering.Config(**fast)
    assert answering.chosen(path) == answering.Config(**slow)  # without fit: exactly the committed choice
    # passages chosen: the same model without them fits too (the index `make` built is then unused), never more
    read = dict(fast, passages=1, rerank=False)
    data.update(config=read, alternatives=[dict(config=read, projected_s=900), dict(config=fast, projected_s=300),
                                           dict(config=dict(read, passages=3, rerank=True), projected_s=100)])
    data["figures"]["projected_s"] = 900
    path.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(lm, "cpu_gflops", lambda: 400.0 / 3.2)  # 2880 s with passages, 960 s without: 40 s to spare
    assert answering.chosen(path, fit=True) == answering.Config(**fast)  # passages for 2%: under MIN_PASSAGE_SHARE
    monkeypatch.setattr(lm, "cpu_gflops", lambda: 400.0 / 2)  # 1800 s with, 600 s without: a third of them fits
    assert answering.chosen(path, fit=True) == answering.Config(**dict(fast, passages=1, rerank=False),
                                                                passage_share=0.33)
    data["config"] = dict(read, rerank=True)  # reranked passages: 03 reranks every question, no share
    path.write_text(json.dumps(data), encoding="utf-8")
    assert answering.chosen(path, fit=True) == answering.Config(**fast)
    # a chosen cascade is kept: it fits itself to the seconds it measures (run_cascade under budget_seconds)
    data.update(config=dict(read, cascade=0.5))
    path.write_text(json.dumps(data), encoding="utf-8")
    assert answering.chosen(path, fit=True) == answering.Config(**dict(read, cascade=0.5))
    assert answering.budget_seconds(path) == 1000 and answering.budget_seconds(tmp_path / "none.json") is None


# ----------------------------------------------------------------------------- the whole measurement
QUESTIONS = [("M1", "전자서명의 정의로 옳은 것은?\n1 신원 정보\n2 보안 사고\n3 금융 거래\n4 처리자", "1"),
             ("M2", "개인정보처리자의 의무는?\n1 보고\n2 보호\n3 서명\n4 안전", "2"),
             ("M3", "전자금융거래의 원칙은?\n1 안전\n2 신속\n3 비용\n4 편의\n5 속도", "1"),
             ("D1", "전자금융거래의 안전성을 설명하세요.", "안전성을 확보하여야 한다")]


@pytest.fixture
def select_run(tiny_model_dir, tiny_index, tmp_path, monkeypatch):
    """05 wired to two tiny candidates, a 4-question dev set, the tiny index and in-process child steps."""
    other = tmp_path / "other-model"
    build_tiny_model(other, seed=1)
    monkeypatch.setattr(common, "candidates", lambda: dict(student=str(tiny_model_dir), teacher=str(other),
                                                           distilled=str(tmp_path / "absent")))
    monkeypatch.setattr(common, "SELECTION", tmp_path / "selection.json")
    monkeypatch.setattr(common, "REPORTS", tmp_path / "reports")
    (tmp_path / "reports").mkdir()
    monkeypatch.setattr(quantize, "OUT", tmp_path / "05")
    monkeypatch.setattr(answering, "DESC_MAX_NEW_TOKENS", 4)
    questions = [competition.parse_question(i, t) for i, t, _ in QUESTIONS]
    labels = {i: dict(kind="desc" if i.startswith("D") else "mc", Answer=a, domain="테스트", Keyword="안전성",
                      Question=t) for i, t, a in QUESTIONS}
    monkeypatch.setattr(quantize, "dev_set", lambda: (questions, labels))
    monkeypatch.setitem(quantize.LEVELS, "cpu", ["float", "fp32", "fp16"])
    monkeypatch.setattr(quantize, "PASSAGES", [2])
    monkeypatch.setattr(quantize, "build_index", lambda candidate, folder: tiny_index)
    monkeypatch.setattr(retrieval, "SEARCH_METHOD", "bm25")  # the tiny index was embedded by one of the two
    monkeypatch.setattr(quantize, "PROBE_QUESTIONS", 2)
    monkeypatch.setattr(quantize, "RERANK_PROBE", 1)
    runs = []

    def in_process(config, folder, limit=0, index_dir=None):
        runs.append((dataclasses.asdict(config), limit))
        quantize.child_point(json.dumps(dataclasses.asdict(config)), folder, limit, index_dir)
        return True

    monkeypatch.setattr(quantize, "run_point", in_process)
    monkeypatch.setattr("sys.argv", ["05_quantize.py"])
    return tmp_path, runs


def test_select_measures_every_stage_and_writes_the_choice(select_run, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)  # everything ties: stage 2 for both
    monkeypatch.setitem(quantize.BUDGET_HOURS, "cpu", 10.0)
    quantize.main()
    stage1 = [c for c, limit in runs if c["level"] == "float" and c["passages"] == 0 and limit == 0]
    assert sorted(c["candidate"] for c in stage1) == ["student", "teacher"]  # the distilled one is absent
    assert all(c["calibration"] == "permute" and c["permutations"] == 5 for c in stage1)  # every shift: 5 options
    assert all(any(limit == 2 and c == full for c, limit in runs) for full in stage1)  # every point is probed
    assert any(limit == 2 and c["level"] == "fp32" for c, limit in runs)  # a probe before each stage-2 level
    assert any(c["passages"] == 2 for c, _ in runs)  # stage 3
    selection = json.loads(common.SELECTION.read_text(encoding="utf-8"))
    assert answering.Config(**selection["config"]).check()
    assert selection["figures"]["points"] > 10 and selection["alternatives"][0]["config"] == selection["config"]
    assert selection["machine"]["cores"] and selection["date"]
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert "**(chosen)**" in report and "pride-0.1" in report and "permute-4" in report and "Echo baseline" in report
    gaps = [line for line in report.splitlines() if line.startswith(("| student |", "| teacher |"))]
    assert len(gaps) == 2 and any("| +0.000 ± 0.000 | +0.000 ± 0.000 |" in line for line in gaps)  # best: no gap
    assert "| distilled | not measured: no finished point in 05 |" in report  # absent, and said so
    assert all(c["calibration"] == "permute" and c["permutations"] == quantize.PASSAGE_PERMUTATIONS["cpu"]
               for c, _ in runs if c["passages"])  # stage 3 scores the cascades' option orders
    cascades = [line for line in report.splitlines() if line.startswith("| ") and "-p2-cascade" in line]  # p0 + p2
    assert sum("| none |" in line for line in cascades) == len(quantize.CASCADE)
    assert sum("| permute-2 |" in line for line in cascades) == len(quantize.CASCADE)
    again = len(runs)
    quantize.main()  # everything measured: a rerun answers nothing new (checkpoints), and chooses the same
    assert json.loads(common.SELECTION.read_text(encoding="utf-8"))["config"] == selection["config"]
    assert len(runs) > again  # the child steps run, but from their checkpoints
    meta = json.loads((tmp_path / "05" / quantize.point_name(stage1[0]["candidate"], "float", 0) / "meta.json")
                      .read_text(encoding="utf-8"))
    assert meta["answered_now"] == 0


def test_a_level_over_budget_stops_after_its_probe(select_run, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)
    monkeypatch.setitem(quantize.BUDGET_HOURS, "cpu", 1e-6)  # nothing fits: every probed level stops
    quantize.main()
    assert not any(c["level"] == "fp32" and limit == 0 for c, limit in runs)
    assert any(c["passages"] == 2 for c, _ in runs) and not any(c["passages"] == 2 and limit == 0 for c, limit in runs)
    assert not any(c["passages"] == 2 and c["rerank"] for c, _ in runs)  # first stage over: reranked not probed
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert "over the" in report and "Warning" in report


def test_a_passage_point_over_budget_runs_in_full_when_its_cascade_fits(select_run, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)
    projections = []

    def projected(meta, fields, rerank_s=0.0):  # every point over the budget, a cascade well inside it
        projections.append(dict(fields))
        return 1.0 if fields.get("cascade") else 1e9
    monkeypatch.setattr(quantize, "projected_seconds", projected)
    monkeypatch.setattr("sys.argv", ["05_quantize.py", "--stages", "1,3"])
    quantize.main()
    assert any(c["passages"] == 2 and not c["rerank"] and limit == 0 for c, limit in runs)  # p2 in full
    reranked = [limit for c, limit in runs if c["passages"] and c["rerank"]]
    assert reranked == [quantize.PROBE_QUESTIONS]  # a reranked point has no cascade: probed, over the budget
    assert any(f.get("cascade") == min(quantize.CASCADE) and f["passages"] == 2 for f in projections)
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert "| teacher-float-p2-cascade0.5 |" in report  # composed from the full p2 run
    assert "- teacher-float-p2-rerank: projected" in report


def test_stages_can_skip_the_levels_and_still_try_passages(select_run, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)
    monkeypatch.setitem(quantize.BUDGET_HOURS, "cpu", 10.0)
    monkeypatch.setattr("sys.argv", ["05_quantize.py", "--stages", "1,3"])
    quantize.main()
    assert not any(c["level"] != "float" for c, _ in runs)  # no stage-2 level, not even a probe
    assert any(c["passages"] == 2 and not c["rerank"] and limit == 0 for c, limit in runs)  # first-stage passages
    assert any(c["passages"] == 2 and c["rerank"] and limit == 0 for c, limit in runs)  # then 03's reranking
    first = next(p for p in (tmp_path / "05").iterdir() if p.name.endswith("-p2"))
    reranked = first.with_name(first.name + "-rerank")
    assert not (first / "probe" / "rerank.json").exists()  # first-stage passages: no reranking timed or counted
    timed = json.loads((reranked / "probe" / "rerank.json").read_text(encoding="utf-8"))
    assert timed["questions"] == 1 and timed["s_per_question"] > 0  # the probe reranked RERANK_PROBE questions
    reading = [i for i, _, _ in QUESTIONS if i.startswith("M") or answering.DESC_PASSAGES]
    assert json.loads((reranked / "rerank.json").read_text(encoding="utf-8"))["questions"] == len(reading)
    keys = [json.loads((p / "meta.json").read_text(encoding="utf-8"))["key"] for p in (first, reranked)]
    assert keys[0] != keys[1]  # the reranked chunks are part of the answers' checkpoint key
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert f"| {reranked.name} |" in report
    assert "stage 2 (levels): not run (`05_quantize.py --stages 1,3`)" in report


def test_levels_restrict_stage_two_and_the_report_lists_the_others(select_run, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)
    monkeypatch.setitem(quantize.BUDGET_HOURS, "cpu", 10.0)
    monkeypatch.setattr("sys.argv", ["05_quantize.py", "--stages", "1,2", "--levels", "fp32"])
    quantize.main()
    assert {c["level"] for c, _ in runs} == {"float", "fp32"}  # fp16 neither probed nor run
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert "-fp16-p0: not run (`05_quantize.py --levels fp32`)" in report
    with pytest.raises(argparse.ArgumentTypeError, match="separated by commas"):
        quantize.level_list("fp32,int3")
    assert quantize.level_list("bnb-nf4, fp32,bnb-nf4") == ("bnb-nf4", "fp32")


def test_rescore_chooses_again_from_finished_points_without_running_a_model(select_run, tiny_index, monkeypatch):
    tmp_path, runs = select_run
    monkeypatch.setattr(quantize, "beats", lambda a, b, labels, **kw: False)
    monkeypatch.setitem(quantize.BUDGET_HOURS, "cpu", 10.0)
    monkeypatch.setattr(quantize, "build_index", lambda candidate, folder: shutil.copytree(
        tiny_index, folder, dirs_exist_ok=True))  # where 05 keeps its indexes: the rescore counts their build time
    monkeypatch.setattr("sys.argv", ["05_quantize.py", "--stages", "1,3"])
    quantize.main()
    measured = json.loads(common.SELECTION.read_text(encoding="utf-8"))
    (tmp_path / "05" / "teacher-float-p2-other").mkdir()  # not a point's name: ignored
    done = len(runs)
    monkeypatch.setattr("sys.argv", ["05_quantize.py", "--rescore", "--command", "make reselect"])
    quantize.main()
    assert len(runs) == done  # no child step, not even from a checkpoint
    again = json.loads(common.SELECTION.read_text(encoding="utf-8"))
    assert again["config"] == measured["config"] and again["figures"] == measured["figures"]
    assert again["command"] == "make reselect"
    report = (tmp_path / "reports" / "select.md").read_text(encoding="utf-8")
    assert "chose among the finished points" in report and "-p2-rerank |" in report
    shutil.rmtree(tmp_path / "05")
    with pytest.raises(SystemExit, match="no finished point"):
        quantize.main()


def test_a_point_answered_under_other_option_logits_is_left_out(tiny_model_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "teacher-float-p0"
    folder.mkdir()
    (folder / "predictions-x.jsonl").write_text(json.dumps(dict(id="M1", kind="mc", logprobs=[-1.0, -2.0])) + "\n",
                                                encoding="utf-8")
    meta = dict(model=str(tiny_model_dir), dtype="bfloat16", config=dict(level="float"), rag=None,
                predictions="predictions-x.jsonl")
    meta["key"] = answering.config_key(meta["model"], "bfloat16")
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (folder / "DONE").touch()
    records, _ = quantize.load_point(folder)
    assert list(records) == ["M1"]
    monkeypatch.setattr(lm, "OPTION_LOGITS", "model")  # the rounded logits of earlier code: another key
    assert quantize.load_point(folder) is None
    assert "run its point again" in capsys.readouterr().out


def test_distill_lines_check_issue_17s_target_at_matching_points():
    labels = {f"M{i}": dict(kind="mc", Answer="1") for i in range(40)}
    labels.update({f"D{i}": dict(kind="desc") for i in range(4)})

    def point(name, calibration, n_right, desc=0.8):
        answers = {f"M{i}": "1" if i < n_right else "2" for i in range(40)}
        each = {**{i: float(a == "1") for i, a in answers.items()}, **{f"D{i}": desc for i in range(4)}}
        return dict(point=name, calibration=calibration, config=dict(candidate=name.split("-")[0]), answers=answers,
                    each=each, mc_acc=n_right / 40)
    rows = [point("student-float-p0", "batch", 10), point("distilled-float-p0", "batch", 30),
            point("student-float-p0", "permute-4", 10), point("distilled-float-p0", "permute-4", 11),
            point("distilled-float-p1", "batch", 40), point("teacher-float-p1-cascade0.5", "none", 30)]
    lines = quantize.distill_lines(rows, labels)
    table = [line for line in lines if line.startswith("| distilled")]
    assert len(table) == 2  # p1 has no base point, the cascade row is no point at all
    assert "+0.500" in table[0] and table[0].endswith("| met |")
    assert "+0.025" in table[1] and table[1].endswith("| not met |")  # below the 0.03 gain
    rows[1]["each"] = {**rows[1]["each"], **{f"D{i}": 0.8 - 0.05 * (i + 1) for i in range(4)}}  # desc falls
    assert quantize.distill_lines(rows, labels)[4].endswith("| not met |")
    assert quantize.distill_lines(rows[4:], labels) == []


@pytest.mark.parametrize("text", ["", "4", "1;3", "x"])
def test_bad_stage_lists_say_how_to_write_them(text):
    with pytest.raises(argparse.ArgumentTypeError, match="e.g. 1,3"):
        quantize.stage_list(text)
    assert quantize.stage_list("3,1") == (1, 3)
