"""01_train_distillm.py under `accelerate launch` with two processes on the CPU (gloo): plain data parallel, each rank
with its own teacher, rank 0 saving and merging after a barrier."""
import json
import os
import subprocess
import sys
from pathlib import Path

import common
from conftest import build_tiny_model

PAIRS = [dict(prompt=common.mc_messages(f"다음 중 전자금융거래법 제{i}조로 옳은 것은?", ["금융", "보안", "정보", "답"]),
              prefix=common.MC_ANSWER_PREFIX, chosen=str(i % 4 + 1), rejected="1") for i in range(4)]
PAIRS += [dict(prompt=common.desc_messages(f"개인정보 보호법 제{i}조를 설명하세요."), prefix="",
               chosen="개인정보 보호법은 금융보안 전문가 답하세요.", rejected="핵심 용어") for i in range(4)]


def test_two_processes_train_in_step_and_rank_0_merges_once(tmp_path):
    student, teacher = build_tiny_model(tmp_path / "student"), build_tiny_model(tmp_path / "teacher", seed=1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    env = dict(os.environ, FSKU_STUDENT=str(student), FSKU_TEACHER=str(teacher), FSKU_DEVICE="cpu",
               OMP_NUM_THREADS="1", **common.OFFLINE_ENV)
    accelerate = Path(sys.executable).with_name("accelerate")
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    # --multi_gpu is accelerate's multi-process launcher; on a machine without GPUs its ranks run on the CPU (gloo)
    done = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(common.ROOT / "01_train_distillm.py"), "--pairs", str(pairs), "--out", str(out),
                           "--run-dir", str(tmp_path / "run"), "--merge", str(merged), "--max-steps", "2",
                           "--teacher-source", "model"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["world_size"] == 2 and meta["max_steps"] == 2 and meta["teacher_source"] == "model"
    ranks = sorted(meta["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["micro_batches"] > 0 and r["pairs"] > 0 and r["teacher_device"] == "cpu" for r in ranks)
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]  # data parallel kept the replicas in sync
    assert sum(r["pairs"] for r in ranks) == 2 * 2 * 2 * 2  # steps x accumulation x pairs per batch x ranks
    assert sorted(p.parent.name for p in tmp_path.rglob("model.safetensors") if p.parent.name != "student"
                  and p.parent.name != "teacher") == ["merged"]  # one merged model, no leftovers of a second rank
    assert (merged / "DONE").exists() and not list(tmp_path.glob("*.tmp"))
    assert done.stdout.count("01: trained 2 steps") == 1  # the summary line of rank 0 only
