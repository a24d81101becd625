"""The plot half of the scaling report: scaling_rl_step.png and scaling_zero_memory.png."""
from __future__ import annotations

import os
from pathlib import Path

from scaling_common import PACK_CHECK, SWEEP_X


def plots(out: Path, rl: list[dict], baseline: dict | None, zero: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if rl:
        sweeps = [s for s in ("generate_max_len", "n_samples_per_prompt", "model_size", "micro_rollout_batch_size (check)")
                  if any(r["sweep"] == s for r in rl)]
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.6 * len(sweeps), 4.2), squeeze=False)
        styles = {"step_s": ("total step", "k", "o"), "generate_s": ("generate", "C0", "s"),
                  "logprobs_s": ("logprobs (ref; actor too without use_rollout_logprobs)", "C1", "^"), "train_s": ("train", "C2", "D")}
        for ax, sweep in zip(axes[0], sweeps):
            key, xlabel = SWEEP_X[sweep]
            companion = {"generate_max_len": ("generate_max_len (SFT policy)", " (SFT policy)"),
                         "n_samples_per_prompt": (PACK_CHECK, " (packing flipped)")}.get(sweep, ("-", ""))
            for sw, ls, suffix in ((sweep, "-", ""), (companion[0], ":", companion[1])):
                pts = sorted((r for r in rl if r["sweep"] == sw), key=lambda r: r[key])
                if not pts:
                    continue
                xs = [r[key] for r in pts]
                for f, (name, col, mk) in styles.items():
                    ax.plot(xs, [r[f] for r in pts], ls=ls, color=col, marker=mk, label=name + suffix)
                if key == "response_length":
                    for r in pts:
                        ax.annotate(f"max {r['gen_len']}", (r[key], r["step_s"]), textcoords="offset points",
                                    xytext=(3, 5), fontsize=7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            main = sorted(r[key] for r in rl if r["sweep"] == sweep)
            ax.set_xticks(main, [f"{x / 1e6:.2f}M" if key == "params" else f"{x:.0f}" for x in main])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(f"{y:g}")[0] in "25" else ""))
            ax.set_xlabel(xlabel + " (log)")
            ax.set_ylabel("seconds per RL step (log)")
            ax.set_title(sweep.replace("_", " "))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.suptitle("GRPO step time on %d CPU cores (untrained tiny policies; dotted: the SFT policy / packing flipped)"
                     % os.cpu_count(), fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "scaling_rl_step.png", dpi=110)
        plt.close(fig)
    if zero:
        hs = sorted({r["hidden"] for r in zero})
        stages = sorted({r["zero_stage"] for r in zero})
        fig, ax = plt.subplots(figsize=(7, 4.2))
        w = 0.8 / len(hs)
        for i, h in enumerate(hs):
            rs = [next(r for r in zero if r["hidden"] == h and r["zero_stage"] == z) for z in stages]
            xs = [j + (i - (len(hs) - 1) / 2) * w for j in range(len(stages))]
            ax.bar(xs, [r["peak_rss_mb_mean"] for r in rs], w, label=f"h{h} ({rs[0]['params'] / 1e6:.2f}M params): peak RSS",
                   color=f"C{i}", alpha=0.8,
                   yerr=[[r["peak_rss_mb_mean"] - min(r["peak_rss_mb_per_rank"]) for r in rs],
                         [max(r["peak_rss_mb_per_rank"]) - r["peak_rss_mb_mean"] for r in rs]], capsize=3)
            ax.bar(xs, [r["model_state_mb_per_rank"] for r in rs], w * 0.5, color="k",
                   label="model states per rank (textbook)" if i == 0 else None)
        if baseline:
            ax.axhline(baseline["VmHWM_kb"] / 1024, color="gray", ls="--", label="imports only (torch, transformers, deepspeed)")
            ax.axhline(baseline["with_zero_check_imports"]["VmHWM_kb"] / 1024, color="gray", ls=":",
                       label="imports + what the ZeRO>=1 optimizer check imports")
        ax.set_xticks(range(len(stages)), [f"ZeRO {z}" for z in stages])
        ax.set_ylabel("MB per rank process (mean of ranks; bars: min/max)")
        ax.set_title("SFT, 2 processes (torchrun, gloo, fp32): peak RSS per rank", fontsize=10)
        ax.set_ylim(0, 1.45 * max(max(r["peak_rss_mb_per_rank"]) for r in zero))
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        fig.tight_layout()
        fig.savefig(out / "scaling_zero_memory.png", dpi=110)
        plt.close(fig)
