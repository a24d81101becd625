"""bf16 SFT in one process at --zero_stage 0: DeepSpeed's BF16_Optimizer against `LocalEngine`'s flat fp32
master weights (rlhf_ops/distributed/master_weights.py), side by side on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_engine.py [--steps 20] [--repeats 2] [--out benchmarks/results]

Runs `python -m rlhf_ops.cli.train_sft --bf16 --zero_stage 0 --packing_samples` on the tiny default model
and the built-in SFT data, once with `RLHF_OPS_LOCAL_ENGINE=0` (DeepSpeed's engine, ZeRO-1 BF16_Optimizer)
and once with `=1` (LocalEngine), alternating when repeating so machine noise hits both alike. Each run
reports the median seconds per optimizer step (steps 2..N from its metrics JSONL: `seconds` is
cumulative), its peak RSS (VmHWM, read by the runpy wrapper of benchmarks/scaling.py) and its last
training loss. With 2 micro-batches per step the two engines' losses differ in the low bits: DeepSpeed
rounds the accumulated fp32 gradient to bf16 for its all-reduce, even in a world of one.

bf16 on a CPU is ~10x slower than fp32: this measures the engines' overhead and memory on this machine,
not what a GPU would gain (benchmarks/gpu.py measures that where a GPU is lent). A benchmark, not a
test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import git_head, machine, wait_for_load  # noqa: E402  (benchmarks/ is on sys.path)
from scaling import WRAPPER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENGINES = {"deepspeed": "0", "local": "1"}


def run_once(work: Path, model: Path, data: Path, engine: str, a: argparse.Namespace, rep: int) -> dict:
    out = work / f"{engine}_{rep}"
    out.mkdir(parents=True)
    argv = [sys.executable, str(work / "rss_wrap.py"), "rlhf_ops.cli.train_sft", "--pretrain", str(model),
            "--dataset", str(data / "sft"), "--input_key", "input", "--output_key", "output",
            "--input_template", "User: {}\nAssistant: ", "--max_len", "128", "--bf16", "--zero_stage", "0",
            "--packing_samples", "--train_batch_size", str(a.train_batch_size),
            "--micro_train_batch_size", str(a.micro_train_batch_size), "--max_samples", str(a.steps * a.train_batch_size),
            "--learning_rate", "1e-3", "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
            "--logging_steps", "1", "--eval_steps", "-1"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu", RLHF_OPS_LOCAL_ENGINE=ENGINES[engine], SCALING_RSS_DIR=str(out))
    p = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{engine} run failed:\n{(p.stdout + p.stderr)[-4000:]}")
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["split"] == "train"]
    per_step = [b["seconds"] - a_["seconds"] for a_, b in zip(train, train[1:])]
    rss = json.loads((out / "rank0.json").read_text())
    local = "engine: LocalEngine" in p.stdout + p.stderr
    return {"engine": engine, "repeat": rep, "s_per_step": statistics.median(per_step), "steps": len(train),
            "peak_rss_mb": rss["VmHWM_kb"] / 1024, "last_loss": train[-1]["loss"], "engine_logged": "LocalEngine" if local else "DeepSpeed",
            "command": shlex.join(["python", "-m", *argv[2:]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train_batch_size", type=int, default=32)
    ap.add_argument("--micro_train_batch_size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.models.tiny import make_tiny

    load = wait_for_load(1.0, 120)
    with tempfile.TemporaryDirectory(prefix="bf16_engine_") as tmp:
        work = Path(tmp)
        (work / "rss_wrap.py").write_text(WRAPPER)
        model, data = make_tiny(work / "model", seed=0), work / "data"
        write_dataset(data, preset="tiny", seed=42)
        runs = []
        for rep in range(a.repeats):
            order = list(ENGINES) if rep % 2 == 0 else list(reversed(ENGINES))
            for engine in order:
                runs.append(run_once(work, model, data, engine, a, rep))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "command"}), flush=True)
    best = {e: min((r for r in runs if r["engine"] == e), key=lambda r: r["s_per_step"]) for e in ENGINES}
    peak = {e: max(r["peak_rss_mb"] for r in runs if r["engine"] == e) for e in ENGINES}
    result = {"machine": machine(), "git_head": git_head(), "load_before": load, "args": vars(a), "runs": runs,
              "local_over_deepspeed_time": best["local"]["s_per_step"] / best["deepspeed"]["s_per_step"],
              "local_minus_deepspeed_peak_mb": peak["local"] - peak["deepspeed"]}
    lines = ["| engine | s/step (best of %d, median of steps 2..%d) | peak RSS MB (max) | last loss |" % (a.repeats, a.steps),
             "|---|---|---|---|"]
    for e in ENGINES:
        lines.append(f"| {e} | {best[e]['s_per_step']:.4f} | {peak[e]:.1f} | {best[e]['last_loss']:.4f} |")
    lines += ["", f"LocalEngine / DeepSpeed time per step: {result['local_over_deepspeed_time']:.3f}; "
              f"peak RSS difference: {result['local_minus_deepspeed_peak_mb']:+.1f} MB",
              f"machine: {result['machine']}; load before: {load}; commit {result['git_head']}",
              f"command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} .venv/bin/python benchmarks/bf16_engine.py "
              f"--steps {a.steps} --repeats {a.repeats}`", f"each run: `{runs[0]['command']}`"]
    print("\n".join(lines))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_engine.json").write_text(json.dumps(result, indent=1))
    (out / "bf16_engine.md").write_text("# bf16 SFT at ZeRO-0, one process: DeepSpeed vs LocalEngine\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
