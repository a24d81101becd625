"""Every RL estimator on the built-in task, from the same SFT model, with the same budget.

    .venv/bin/python benchmarks/rl_estimators.py --run_dir runs/tiny [--estimators gae,group_norm] [--steps 62] [--jobs 2]

Needs a run directory with `data/` and `sft/` (what `make run` writes). For each estimator it
runs `rlhf_ops.cli.train_ppo` with the tiny preset's RL params (params/presets/tiny/rl.yaml)
plus the estimator's own settings, then scores the SFT model and each trained policy on the 200
held-out prompts with the eval stage's own functions (`rlhf_ops.eval.policy`): greedy accuracy,
and accuracy and reward over 8 seeded samples per prompt at temperature 1 (the policy RL trains).
It also reports the mean KL to the reference over the last quarter of steps and the wall time
(`--jobs 2` runs two estimators at once: their wall times overlap). Writes
benchmarks/results/rl_estimators.{json,md}. It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
SAMPLES, TEMPERATURE, SEED = 8, 1.0, 42


def train(estimator: str, run_dir: Path, out: Path, steps: int, extra: list[str]) -> dict:
    from rlhf_ops.stages import command_lines
    from rlhf_ops.utils.tracking import read_metrics

    (argv,) = command_lines("rl", "tiny", run_dir)
    rows_per_step = 16
    argv += SETTINGS[estimator] + ["--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
                                   "--max_samples", str(steps * rows_per_step), "--rollout_batch_size", str(rows_per_step),
                                   "--eval_steps", "0", "--no-load_checkpoint"] + extra
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    train_rows = read_metrics(out / "ckpt" / "metrics.jsonl", "train")
    last = train_rows[-max(1, len(train_rows) // 4):]
    return {"estimator": estimator, "kl_last_quarter": sum(r["kl"] for r in last) / len(last),
            "steps": len(train_rows), "wall_s": wall, "model": str(out / "model")}


def figures(path: str, prompts, tok, score) -> dict:
    """Greedy and sampled figures of one policy, as the eval stage computes them."""
    import torch

    from rlhf_ops.eval.policy import greedy_eval, load_policy, sampled_eval

    torch.set_num_threads(1)
    model = load_policy(path)
    greedy, _, _ = greedy_eval(model, tok, prompts, score, 48, 64, name=path)
    sampled = sampled_eval(model, tok, prompts, score, 48, 64, SAMPLES, TEMPERATURE, SEED, name=path)
    return {"greedy_accuracy": greedy["accuracy"], "greedy_reward": greedy["reward"], **sampled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", default=str(ROOT / "runs" / "tiny"))
    ap.add_argument("--estimators", default=",".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=62)
    ap.add_argument("--jobs", type=int, default=1, help="estimators trained at once (one CPU thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--extra", default="", help="more train_ppo flags for every run, e.g. '--actor_learning_rate 1e-4'")
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    work = Path(args.out) / "rl_runs"
    load0 = os.getloadavg()
    ests = args.estimators.split(",")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda e: train(e, run_dir, work / e, args.steps, args.extra.split()), ests))

    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.rl.rewards import ScoringOptions
    from rlhf_ops.rl.setup import build_prompts, make_scorer
    from rlhf_ops.stages import BUILTIN_REWARD
    from rlhf_ops.eval.config import EvalConfig

    tok = load_tokenizer(str(run_dir / "sft"), None)
    cfg = EvalConfig(run_dir=str(run_dir), models="sft", output_dir=str(work / "eval_unused"))
    prompts = build_prompts(cfg, tok, str(run_dir / "data" / "prompts"), "eval")
    score = make_scorer(ScoringOptions(BUILTIN_REWARD, 64), tok, None)
    sft = figures(str(run_dir / "sft"), prompts, tok, score)
    for r in rows:
        r.update(figures(r.pop("model"), prompts, tok, score))
        print(json.dumps(r), flush=True)
    load1 = os.getloadavg()
    f = lambda x: f"{x:.3f}"  # noqa: E731
    md = [f"| estimator | greedy accuracy | sampled accuracy (T=1, x{SAMPLES}) | sampled reward | KL (last 1/4) | steps | wall s |",
          "|---|---|---|---|---|---|---|",
          f"| SFT (start) | {f(sft['greedy_accuracy'])} | {f(sft['sampled_accuracy'])} | {f(sft['sampled_reward'])} | | | |"]
    for r in rows:
        md.append(f"| {r['estimator']} | {f(r['greedy_accuracy'])} | {f(r['sampled_accuracy'])} | {f(r['sampled_reward'])} | "
                  f"{r['kl_last_quarter']:.4f} | {r['steps']} | {r['wall_s']:.0f} |")
    text = "\n".join(md) + (f"\n\n{len(prompts)} held-out prompts. {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
                            f"load {load0[0]:.2f} -> {load1[0]:.2f}, {args.jobs} estimator(s) at a time; command: "
                            f"python benchmarks/rl_estimators.py {' '.join(sys.argv[1:])}\n")
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "rl_estimators.json").write_text(json.dumps({"sft": sft, "rows": rows, "loadavg": [load0, load1]}, indent=2) + "\n")
    (Path(args.out) / "rl_estimators.md").write_text(text)


if __name__ == "__main__":
    main()
