"""benchmarks/gpu.py, the GPU figures' script, run with --smoke: the same code on this CPU with the tiny
model, so a session lent a GPU runs a script that already worked end to end. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, out: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_run_measures_every_part_and_labels_its_figures(tmp_path):
    p = _run("--smoke", out=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["smoke"] is True and r["device"].startswith("none")
    sft = r["sft"]
    assert sft["steps"] == 4 and sft["tokens_per_step"] == 4 * 64  # 4 rows of exactly 64 tokens per step
    assert sft["mfu"] is None and sft["achieved_tflops"] > 0       # no peak is claimed for a CPU
    assert sft["flops_per_token"] == 6 * r["params"] + 6 * 4 * 128 * 64
    assert sft["engine"] == "LocalEngine (one process, ZeRO-0, fp32)"  # as train_sft logged it
    tp = sft["trainer_profile"]                                   # the last 2 steps, under --profile_steps
    assert (tp["steps"], tp["first_step"]) == (2, 3) and tp["top_ops"] and tp["host_syncs_per_step"] == 0
    assert "| op | calls/step |" in (tmp_path / "sft_trainer_ops.md").read_text()
    rl = r["rl"]
    assert set(rl["phase_s_median"]) == {"generate", "score", "logprobs", "train"}
    assert all(v >= 0 for v in rl["phase_s_median"].values())
    assert sum(rl["phase_s_median"].values()) <= rl["step_s_median"] * 1.05  # phases are parts of the step
    assert 0 < rl["response_length"] <= 16
    sync = r["sync"]
    assert sync["bytes"] == 4 * r["params"]                       # fp32: every parameter once
    assert "nccl_self_broadcast_s" not in sync                    # NCCL is only tried on a GPU
    prof = r["profile"]                                           # the same packed batch without the trainer
    assert prof["step_s_median"] > 0 and "matmul_8192_tflops" not in prof  # no GPU matmul on a CPU
    assert 0 < len(prof["top_ops"]) <= 25 and sum(o["share"] for o in prof["top_ops"]) <= 1.0 + 1e-9
    assert prof["top_ops"] == sorted(prof["top_ops"], key=lambda o: o["ms_per_step"], reverse=True)
    md = (tmp_path / "gpu.md").read_text()
    assert "These are not GPU figures" in md and "train_sft" in md and "train_ppo" in md
    assert "Model step without the trainer" in md


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    p = _run("--smoke", "--parts", "rl,sync", "--logs", "--extra_rl=--no_such_flag", out=tmp_path)
    assert p.returncode != 0 and "failed parts: rl" in p.stderr
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert "no_such_flag" in r["rl"]["error"] and "sft" not in r and "profile" not in r
    assert r["sync"]["bytes"] == 4 * r["params"]                 # measured although rl failed
    assert "no_such_flag" in (tmp_path / "rl.log").read_text()    # --logs keeps the trainer's log
    assert "**rl: failed**" in (tmp_path / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_refuses_to_produce_gpu_figures(tmp_path):
    p = _run(out=tmp_path)
    assert p.returncode != 0 and "no CUDA device here" in p.stderr
    assert not (tmp_path / "gpu.json").exists()
