"""Every RL estimator on the built-in task, from the same SFT model, with the same budget.

    .venv/bin/python benchmarks/rl_estimators.py --run_dir runs/tiny [--estimators gae,group_norm] [--steps 16]

Needs a run directory with `data/` and `sft/` (what `make run` writes). For each estimator it
runs `rlhf_ops.cli.train_ppo` with the tiny preset's RL params (params/presets/tiny/rl.yaml)
plus the estimator's own settings, and reads the run's metrics: greedy held-out accuracy and
reward before (step 0) and after training, the mean KL to the reference over the last steps,
and the wall time. Writes benchmarks/results/rl_estimators.{json,md}. It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What each estimator changes relative to the preset (GRPO with a k3 KL loss).
SETTINGS: dict[str, list[str]] = {
    "gae": ["--advantage_estimator", "gae", "--no-use_kl_loss", "--kl_estimator", "k1", "--critic_learning_rate", "1e-4"],
    "reinforce": ["--advantage_estimator", "reinforce", "--no-use_kl_loss", "--kl_estimator", "k1"],
    "reinforce_baseline": ["--advantage_estimator", "reinforce_baseline", "--no-use_kl_loss", "--kl_estimator", "k1"],
    "rloo": ["--advantage_estimator", "rloo", "--no-use_kl_loss", "--kl_estimator", "k1"],
    "group_norm": ["--advantage_estimator", "group_norm"],
    "dr_grpo": ["--advantage_estimator", "dr_grpo"],
}


def run(estimator: str, run_dir: Path, out: Path, steps: int, extra: list[str]) -> dict:
    from rlhf_ops.stages import command_lines
    from rlhf_ops.utils.tracking import read_metrics

    (argv,) = command_lines("rl", "tiny", run_dir)
    rows_per_step = 16
    argv += SETTINGS[estimator] + ["--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
                                   "--max_samples", str(steps * rows_per_step), "--rollout_batch_size", str(rows_per_step),
                                   "--eval_steps", str(steps)] + extra
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    m = out / "ckpt" / "metrics.jsonl"
    evals, train = read_metrics(m, "eval"), read_metrics(m, "train")
    last = train[-max(1, len(train) // 4):]
    return {"estimator": estimator, "acc_before": evals[0].get("accuracy"), "acc_after": evals[-1].get("accuracy"),
            "reward_before": evals[0]["reward"], "reward_after": evals[-1]["reward"],
            "kl_last_quarter": sum(r["kl"] for r in last) / len(last), "steps": len(train), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", default=str(ROOT / "runs" / "tiny"))
    ap.add_argument("--estimators", default=",".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--extra", default="", help="more train_ppo flags for every run, e.g. '--actor_learning_rate 1e-4'")
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    work = Path(args.out) / "rl_runs"
    rows = []
    for est in args.estimators.split(","):
        rows.append(run(est, run_dir, work / est, args.steps, args.extra.split()))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()[0]
    md = ["| estimator | acc before | acc after | reward before | reward after | KL (last 1/4) | steps | wall s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['estimator']} | {r['acc_before']:.3f} | {r['acc_after']:.3f} | {r['reward_before']:.3f} | "
                  f"{r['reward_after']:.3f} | {r['kl_last_quarter']:.4f} | {r['steps']} | {r['wall_s']:.0f} |")
    text = "\n".join(md) + f"\n\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {load:.2f}; " \
                           f"command: python benchmarks/rl_estimators.py {' '.join(sys.argv[1:])}\n"
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "rl_estimators.json").write_text(json.dumps({"rows": rows, "loadavg_1m": load}, indent=2) + "\n")
    (Path(args.out) / "rl_estimators.md").write_text(text)


if __name__ == "__main__":
    main()
