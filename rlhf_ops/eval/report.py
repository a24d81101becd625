"""The evaluation's files, all written into one temporary directory that replaces --output_dir at once.

    metrics.json          nested numbers (DVC metrics): {<model>: {accuracy, reward, ...}, rl_vs_sft_win_rate,
                          rl_kl_to_sft: {per_sequence, per_token}, n_prompts}
    report.md             model | accuracy | reward table (greedy and sampled), win rate and KL lines, the command
    curves.png            training curves from the models' metrics.jsonl (panels whose file is missing are left out)
    plots/*.csv           the same curves for DVC plots: sft_train (step,loss), rl_train (step,reward,accuracy,kl),
                          rl_eval (step,reward,accuracy)
    samples.jsonl         each prompt with its label and every model's greedy response and reward
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# curve name -> (model directory name, metrics split, columns)
CURVES = {
    "sft_train": ("sft", "train", ("step", "loss")),
    "rl_train": ("rl", "train", ("step", "reward", "accuracy", "kl")),
    "rl_eval": ("rl", "eval", ("step", "reward", "accuracy")),
}


COLORS = {"loss": "C0", "reward": "C0", "accuracy": "C1"}  # one colour per quantity across panels


def training_curves(run_dir: str | Path) -> dict[str, list[dict]]:
    """Rows (only CURVES' columns, None where a row lacks one) of every curve whose metrics.jsonl exists."""
    from rlhf_ops.utils.tracking import read_metrics

    out: dict[str, list[dict]] = {}
    for name, (model, split, cols) in CURVES.items():
        path = Path(run_dir) / model / "metrics.jsonl"
        if not path.is_file():
            logger.info("no %s: skipping the %s curve", path, name)
            continue
        rows = sorted(read_metrics(path, split), key=lambda r: r["step"])
        out[name] = [{c: r.get(c) for c in cols} for r in rows]
    return out


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([["" if r.get(c) is None else r[c] for c in columns] for r in rows])


def plot_curves(path: Path, curves: dict[str, list[dict]]) -> None:
    """SFT train loss, RL train reward/accuracy, RL eval accuracy/reward vs step (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, title, keys) for name, title, keys in (
        ("sft_train", "SFT train loss", ("loss",)),
        ("rl_train", "RL train reward / accuracy", ("reward", "accuracy")),
        ("rl_eval", "RL eval accuracy / reward", ("accuracy", "reward"))) if curves.get(name)]
    fig = Figure(figsize=(4.5 * max(len(panels), 1), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training metrics found", ha="center", va="center")
        ax.set_axis_off()
    for i, (name, title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            pts = [(r["step"], r[k]) for r in curves[name] if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k, color=COLORS.get(k))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def report_markdown(metrics: dict, models: list[str], command: str, notes: list[str]) -> str:
    lines = [f"# Evaluation on {metrics['n_prompts']} held-out prompts", "",
             "| model | accuracy (greedy) | reward (greedy) | accuracy (sampled) | reward (sampled) | response length |",
             "|---|---|---|---|---|---|"]
    for m in models:
        r = metrics[m]
        lines.append(f"| {m} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('reward'))} | {_fmt(r.get('sampled_accuracy'))} "
                     f"| {_fmt(r.get('sampled_reward'))} | {r['response_length']:.1f} |")
    lines.append("")
    if "rl_vs_sft_win_rate" in metrics:
        lines.append(f"- RL vs SFT win rate (reward model, ties 0.5): {metrics['rl_vs_sft_win_rate']:.4f}")
    if "rl_kl_to_sft" in metrics:
        kl = metrics["rl_kl_to_sft"]
        lines.append(f"- KL(rl || sft), k1 on one temperature-1 sample per prompt: {kl['per_sequence']:.4f} per "
                     f"sequence, {kl['per_token']:.5f} per token")
    lines += [f"- {n}" for n in notes]
    lines += ["", "Greedy: one greedy response per prompt. Sampled: the mean over the seeded samples per prompt at the "
              "eval temperature (see the command). Accuracy and reward from the reward function. "
              "Curves: curves.png, plots/*.csv.",
              "", "```", command, "```", ""]
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, metrics: dict, models: list[str], curves: dict[str, list[dict]],
                  samples: list[dict], command: str, notes: list[str]) -> Path:
    """Write every file into a temporary directory, then swap it in for `out_dir`; returns report.md's path."""
    from rlhf_ops.utils.atomic import atomic_dir

    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (tmp / "report.md").write_text(report_markdown(metrics, models, command, notes))
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        for name, rows in curves.items():
            write_csv(tmp / "plots" / f"{name}.csv", CURVES[name][2], rows)
        plot_curves(tmp / "curves.png", curves)
    return Path(out_dir) / "report.md"
