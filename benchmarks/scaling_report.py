"""Report half of `benchmarks/scaling.py`: scaling.md and the two PNG plots from a result dict.

Split from the measuring script so each stays readable; `scaling.py --replot scaling.json` calls
`report` alone. Nothing here measures or runs anything.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

BASE_MICRO = 64  # rl.yaml's micro_rollout_batch_size, the fallback for results that do not record it
PACK_CHECK = "n_samples_per_prompt, packing flipped (check)"

def model_state_bytes(P: int, stage: int, world: int) -> float:
    """fp32 weights (4 B) + grads (4 B) + Adam m, v (8 B) per parameter, per rank, as ZeRO partitions them
    (the textbook count; DeepSpeed adds flat buffers, a master copy of the partition and buckets)."""
    w, g, o = 4.0 * P, 4.0 * P, 8.0 * P
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return w + g + o


# ---------------------------------------------------------------------------------------------- report
def exponent(x0: float, x1: float, y0: float, y1: float) -> float | None:
    if min(x0, x1, y0, y1) <= 0 or x0 == x1:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def rel_se(r: dict, f: str) -> float:
    """Relative standard error of a point's mean `f` ("step_s", "generate_s", ...) over its measured steps."""
    vals = [x["time_" + f[:-2]] for x in r["per_step"][1:]] or [x["time_" + f[:-2]] for x in r["per_step"]]
    if len(vals) < 2 or not sum(vals):
        return 0.0
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return sd / m / len(vals) ** 0.5


def exponent_err(key: str, p0: dict, p1: dict, f: str) -> float | None:
    """Standard error of exponent(...) from the step-to-step spread of the two points (not run-to-run drift)."""
    if p0[key] == p1[key] or min(p0[key], p1[key]) <= 0:
        return None
    return math.hypot(rel_se(p0, f), rel_se(p1, f)) / abs(math.log(p1[key] / p0[key]))


SWEEP_X = {"generate_max_len": ("response_length", "mean response tokens"),
           "generate_max_len (SFT policy)": ("response_length", "mean response tokens"),
           "n_samples_per_prompt": ("n_samples", "samples per prompt"),
           "model_size": ("params", "parameters"),
           "micro_rollout_batch_size (check)": ("micro_rollout", "--micro_rollout_batch_size"),
           PACK_CHECK: ("n_samples", "samples per prompt")}


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def rl_tables(rows: list[dict]) -> tuple[list[str], list[str]]:
    md = ["| sweep | policy | hidden | params | max len | samples/prompt | samples/step | micro rollout | mean resp. "
          "tokens | packed | step s | step s min-max | generate s | score s | logprobs s | train s | other s | "
          "ms per sample-token | peak RSS MB | load before/after |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['sweep']} | {r['policy']} | {r['hidden']} | {r['params']:,} | {r['gen_len']} | {r['n_samples']} | "
                  f"{r['samples_per_step']} | {r.get('micro_rollout', BASE_MICRO)} | {r['response_length']:.1f} | "
                  f"{'yes' if r.get('packing') else 'no'} | "
                  f"**{r['step_s']:.2f}** | {fmt(r.get('step_s_min'))}-{fmt(r.get('step_s_max'))} | {r['generate_s']:.2f} | "
                  f"{r['score_s']:.3f} | {r['logprobs_s']:.2f} | {r['train_s']:.2f} | {r['other_s']:.2f} | "
                  f"{r['ms_per_token']:.3f} | {fmt(r['peak_rss_mb'], 0)} | "
                  f"{fmt(r.get('loadavg_1m_before'))}/{fmt(r.get('loadavg_1m_after'))} |")
    ex = ["| sweep | from -> to | x ratio | step | generate | logprobs | train |", "|---|---|---|---|---|---|---|"]
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        key, _ = SWEEP_X[sweep]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        for p0, p1 in zip(pts, pts[1:]):
            label = {"response_length": lambda r: f"{r['response_length']:.0f} tok (max {r['gen_len']})",
                     "n_samples": lambda r: f"n={r['n_samples']}",
                     "params": lambda r: f"h{r['hidden']} ({r['params'] / 1e6:.2f}M)",
                     "micro_rollout": lambda r: f"micro {r['micro_rollout']}"}[key]
            cs = ("step_s", "generate_s", "logprobs_s", "train_s")
            es = [exponent(p0[key], p1[key], p0[c], p1[c]) for c in cs]
            errs = [exponent_err(key, p0, p1, c) for c in cs]
            ex.append(f"| {sweep} | {label(p0)} -> {label(p1)} | {p1[key] / p0[key]:.2f} | " +
                      " | ".join("-" if e is None else f"{e:.2f} ± {d:.2f}" for e, d in zip(es, errs)) + " |")
    return md, ex


def zero_table(baseline: dict, rows: list[dict]) -> list[str]:
    md = ["| model | params | ZeRO | peak RSS rank 0 MB | rank 1 MB | mean MB | vs ZeRO 0 MB | "
          "model states per rank MB (textbook) | saved vs ZeRO 0 (textbook) MB | train s/step |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z0 = next((x for x in rows if x["hidden"] == r["hidden"] and x["zero_stage"] == 0), None)
        d = r["peak_rss_mb_mean"] - z0["peak_rss_mb_mean"] if z0 else None
        saved = z0["model_state_mb_per_rank"] - r["model_state_mb_per_rank"] if z0 else None
        per = r["peak_rss_mb_per_rank"] + [None] * (2 - len(r["peak_rss_mb_per_rank"]))
        md.append(f"| h{r['hidden']} | {r['params']:,} | {r['zero_stage']} | {fmt(per[0], 0)} | {fmt(per[1], 0)} | "
                  f"{r['peak_rss_mb_mean']:.0f} | {'+' if d is not None and d >= 0 else ''}{fmt(d, 0)} | "
                  f"{r['model_state_mb_per_rank']:.1f} | {fmt(saved, 1)} | {fmt(r['train_s_per_step'])} |")
    md.append(f"| imports only (torch, transformers, deepspeed, rlhf_ops) | - | - | {baseline['VmHWM_kb'] / 1024:.0f} "
              f"| - | - | - | - | - | - |")
    zc = baseline["with_zero_check_imports"]["VmHWM_kb"] / 1024
    md.append(f"| imports only + `deepspeed.runtime.zero.muon.muon_optimizer` (imported by the ZeRO >= 1 optimizer "
              f"check; loads the torch.compile stack) | - | - | {zc:.0f} | - | - | - | - | - | - |")
    return md


def noise(rows: list[dict]) -> float:
    """Largest deviation of a single measured step from its point's mean step time, in percent."""
    return max((100 * max(r["step_s_max"] - r["step_s"], r["step_s"] - r["step_s_min"]) / r["step_s"]
                for r in rows if "step_s_min" in r), default=float("nan"))


def growth(k: float | None) -> str:
    if k is None:
        return "n/a"
    if k < 0.2:
        return "about flat"
    if k < 0.8:
        return "sublinear"
    if k <= 1.2:
        return "about linear"
    if k <= 1.8:
        return "between linear and quadratic"
    return "about quadratic or worse"


def rl_summary(rows: list[dict]) -> list[str]:
    """One verdict per sweep: measured first-to-last exponent of the step time against the expectation."""
    out = []
    expect = {"n_samples_per_prompt": ("samples", (0.8, 1.2), "about linear"),
              "generate_max_len": ("length (untrained policy)", (0.8, 9.9), "linear or worse"),
              "model_size": ("model size", (0.0, 1.0), "sublinear at these widths, at most linear")}
    for sweep, (what, (lo, hi), exp) in expect.items():
        key = SWEEP_X[sweep][0]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        k, e = exponent(a[key], b[key], a["step_s"], b["step_s"]), exponent_err(key, a, b, "step_s")
        ok = lo <= k <= hi
        near = not ok and e is not None and (lo - 2 * e <= k <= hi + 2 * e)
        out.append(f"- {what}: x{b[key] / a[key]:.2f} -> step time x{b['step_s'] / a['step_s']:.2f}, k = {k:.2f} ± {fmt(e)} "
                   f"({growth(k)}); expected {exp}: "
                   + ("**as expected**" if ok else "**within 2 standard errors of the expectation**" if near
                      else "**not as expected**") + ".")
    return out


def knee_reason(sweep: str, name: str, n: float, pre: dict | None) -> str:
    """The mechanism at a knee, when the knee sits where the code changes regime (n = micro_rollout / rollout)."""
    if pre is None or sweep not in ("n_samples_per_prompt", PACK_CHECK):
        return ""
    mr, rb = int(pre["micro_rollout_batch_size"]), int(pre["rollout_batch_size"])
    if rb * n != mr:
        return ""
    packed = bool(pre.get("packing_samples")) != (sweep == PACK_CHECK)
    why = {"generate": f"up to n = {n}, the {rb} x n samples fit one generate call of up to {mr} sequences, which "
                       f"gets wider at little cost per decode step; above it, calls are added (linear)",
           "logprobs": (f"up to n = {n}, one packed row of {rb} x n sequences grows longer, and its dense block "
                        f"mask makes that quadratic; above it, full rows are added (linear)") if packed else
                       f"at n = {n} the padded batches reach {mr} sequences",
           "step": "the sum of the parts' regimes (see generate and logprobs)"}.get(name, "")
    return f" n = {n} is where {rb} x n = micro_rollout_batch_size {mr}: {why}." if why else ""


def rl_findings(rows: list[dict], pre: dict | None = None) -> list[str]:
    """Statements of measured ratios and exponents, classified by fixed thresholds (no claim beyond the numbers)."""
    out = []
    comps = (("step_s", "step"), ("generate_s", "generate"), ("logprobs_s", "logprobs"), ("train_s", "train"))
    names = {"generate_max_len": "Length (untrained policy; x = mean response tokens)",
             "generate_max_len (SFT policy)": "Length (SFT policy; x = mean response tokens)",
             "n_samples_per_prompt": "Samples per prompt (x = n; samples per step = 16 n)",
             "model_size": "Model size (x = parameters)",
             "micro_rollout_batch_size (check)": "--micro_rollout_batch_size (x; n=4, max len 48)",
             PACK_CHECK: "Samples per prompt with --packing_samples flipped relative to the preset"}
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        key = SWEEP_X[sweep][0]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        xr = b[key] / a[key]
        parts = []
        for f, name in comps:
            k = exponent(a[key], b[key], a[f], b[f])
            parts.append(f"{name} x{b[f] / a[f]:.2f} (k={fmt(k)}, {growth(k)})")
        line = f"- **{names[sweep]}**, x{xr:.2f} from first to last point: " + "; ".join(parts) + "."
        if sweep.startswith("generate_max_len"):
            line += " Mean response / --generate_max_len: " + ", ".join(
                f"{r['response_length']:.1f}/{r['gen_len']}" for r in sorted(pts, key=lambda r: r["gen_len"])) + "."
        if sweep == "n_samples_per_prompt":
            line += " Time per sample: " + ", ".join(
                f"{1000 * r['step_s'] / r['samples_per_step']:.0f} ms (n={r['n_samples']})" for r in pts) + "."
        if sweep == PACK_CHECK:
            base = {r["n_samples"]: r for r in rows if r["sweep"] == "n_samples_per_prompt"}
            line += " Packed / padded step time: " + ", ".join(
                f"{(r['step_s'] / base[r['n_samples']]['step_s']) ** (1 if r['packing'] else -1):.2f} (n={r['n_samples']})"
                for r in pts if r["n_samples"] in base) + "; logprobs packed / padded: " + ", ".join(
                f"{(r['logprobs_s'] / base[r['n_samples']]['logprobs_s']) ** (1 if r['packing'] else -1):.2f}"
                f" (n={r['n_samples']})" for r in pts if r["n_samples"] in base) + "."
        if sweep in ("n_samples_per_prompt", PACK_CHECK, "micro_rollout_batch_size (check)"):
            line += " Logprobs per sample: " + ", ".join(
                f"{1000 * r['logprobs_s'] / r['samples_per_step']:.0f} ms (n={r['n_samples']}, "
                f"{min(r.get('micro_rollout', BASE_MICRO), r['samples_per_step'])} sequences per "
                f"{'packed row' if r.get('packing') else 'padded batch'})" for r in pts) + "."
        out.append(line)
        if len(pts) >= 3:  # a knee: the local exponent changes by more than twice its standard error
            x = lambda r: f"{r[key]:,.0f}" if key != "response_length" else f"{r[key]:.0f} tok"  # noqa: E731
            for f, name in comps:
                ks = [exponent(p0[key], p1[key], p0[f], p1[f]) for p0, p1 in zip(pts, pts[1:])]
                es = [exponent_err(key, p0, p1, f) for p0, p1 in zip(pts, pts[1:])]
                for i in range(len(ks) - 1):
                    if None in (ks[i], ks[i + 1], es[i], es[i + 1]):
                        continue
                    d, lim = ks[i + 1] - ks[i], 2 * math.hypot(es[i], es[i + 1])
                    if abs(d) >= 0.3:
                        out.append(f"  - slope of *{name}* at x = {x(pts[i + 1])}: k = {ks[i]:.2f} ± {es[i]:.2f} "
                                   f"below, {ks[i + 1]:.2f} ± {es[i + 1]:.2f} above: "
                                   + ("**a change beyond twice its standard error**." + knee_reason(sweep, name, pts[i + 1][key], pre)
                                      if abs(d) > lim else "within twice its standard error, so not a measured knee."))
    # the same work measured twice: the SFT policy's seeded samples all end before the smaller max length
    sft = sorted((r for r in rows if r["sweep"] == "generate_max_len (SFT policy)"), key=lambda r: r["gen_len"])
    for r0, r1 in zip(sft, sft[1:]):
        if abs(r0["response_length"] - r1["response_length"]) < 1e-9 and r0["response_length"] < r0["gen_len"] - 1:
            out.append(f"- **Run-to-run noise**: the SFT policy at max {r0['gen_len']} and {r1['gen_len']} generated the same "
                       f"{r0['response_length']:.1f}-token mean (same seeds, every sample ended at EOS before "
                       f"{r0['gen_len']}): the same work, measured {r0['step_s']:.2f} s and {r1['step_s']:.2f} s per step "
                       f"({100 * abs(r1['step_s'] / r0['step_s'] - 1):.0f}% apart) under the recorded load. Differences of that "
                       f"size between any two points are not meaningful; the ± above come from the step-to-step spread "
                       f"within a point only, which understates this drift.")
    return out


def mechanisms(pre: dict) -> str:
    """What the code does per step, for the preset's packing mode: the expectations the exponents are read against."""
    mr, mt, tb = pre["micro_rollout_batch_size"], pre["micro_train_batch_size"], pre["train_batch_size"]
    packed = bool(pre.get("packing_samples"))
    ROLLOUT = int(pre["rollout_batch_size"])  # noqa: N806
    full = max(1, mr // ROLLOUT)
    packed_logp = (
        f"packed into rows of up to {mr} sequences ({ROLLOUT} x n sequences per step: n={max(1, full // 2)} -> "
        f"{ROLLOUT * max(1, full // 2)} sequences per row,\n  n={full} -> {mr}, one full row; beyond that more rows). "
        f"`rlhf_sdpa` (rlhf_ops/models/attention.py) attends each\n  sample in its own slot, so no work is spent on "
        f"padding or on a block mask: about linear in samples and in length,\n  plus the gather/scatter into slots.")
    padded_logp = (
        f"in padded micro-batches of {mr} sequences, each padded to its longest sequence: about linear in samples\n"
        f"  and in the padded length, plus attention quadratic in each sequence's own length (at most prompt +\n"
        f"  --generate_max_len, ~100 tokens here). Padding wastes work when lengths in a micro-batch differ (the\n"
        f"  SFT policy's answers), hardly any when every response runs to --generate_max_len (untrained policies).")
    logp_models = ("a no-grad forward of the reference over every sample (the actor's old logprobs are\n  recorded "
                   "while sampling, `use_rollout_logprobs`)" if pre.get("use_rollout_logprobs") else
                   "a no-grad forward of the actor and of the reference over every sample")
    return f"""\
What the code does per step (rlhf_ops/trainers/rl.py, rl/experience.py, generation/base.py,
data/batching.py), the expectations to read the exponents against. The preset runs with
`packing_samples: {str(packed).lower()}`.
- *generate*: the KV-cached sampler (rlhf_ops/generation/decode.py) on micro-batches of
  `micro_rollout_batch_size` = {mr} sequences; each group of identical prompts is prefilled once, and a
  micro-batch runs until its longest sample stops or hits --generate_max_len, finished rows leaving the
  batch as they end. Expected: about linear in length (each decode step also attends over a growing
  cache); in samples, linear in the number of micro-batches ({ROLLOUT} n / {mr}) plus whatever a wider
  batch costs per decode step.
- *logprobs*: {logp_models}, then KL and advantages, which are cheap;
  {packed_logp if packed else padded_logp}
- *train*: forward + backward of micro-batches of {mt} sequences ({"packed, each sample attended in its own slot"
  if packed else "padded"}), one AdamW step per {tb} samples (`train_batch_size`): expected about linear in
  samples, linear or a little worse in length.
- *score*: the rule-based reward, negligible at every point.
- Model size: matmul work grows about linearly in parameters for a fixed token count; attention does
  not (it scales with tokens times each sample's own length, with the head count fixed at 4);
  at these widths (64-256) fixed per-op overhead is also a large part of a forward, so sublinear
  growth is expected.
- The `{PACK_CHECK}` rows repeat the samples sweep with packing {"off" if packed else "on"};
  the logprob forward then runs {padded_logp if packed else packed_logp}
"""


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



def report(r: dict, out: Path) -> None:
    """scaling.md and the two plots from a result dict (also `--replot scaling.json`)."""
    rl, baseline, zero = r["rl"], r["zero_baseline_imports"], r["zero"]
    la = lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
    header = (f"{r['date']} -> {r['end']} ({r['seconds']:.0f} s); machine: {r['machine']}, {r['cores']} cores, no GPU; "
              f"OMP_NUM_THREADS={r['omp_num_threads']}; load average (1/5/15 min) at start {la(r['loadavg_start'])}, "
              f"at end {la(r['loadavg_end'])}"
              + (f" (waited for 1-min load < {r['load_wait_threshold']}: readings every 30 s {r['load_wait_readings']})"
                 if r["load_wait_readings"] else "")
              + f".\n\nCommand: `{r['command'].strip()}`\n\nCode: git {r.get('git_head', '?')}; hash of rlhf_ops/**/*.py "
              f"and params/presets/tiny/*.yaml {r.get('code_hash_start', '?')} at start, {r.get('code_hash_end', '?')} at end"
              + (" (**changed during the run: numbers may mix two versions**)"
                 if r.get("code_hash_start") != r.get("code_hash_end") else " (unchanged)")
              + ". The preset YAMLs were copied at the start and every run used the copies.\n")
    md = ["# Scaling benchmark", "", header]
    steps = r["steps_per_point"]
    pre = r["preset_rl"]
    if rl:
        t, ex = rl_tables(rl)
        md += ["## 1. Time per RL step (GRPO, `rlhf_ops.cli.train_ppo`)", "",
               f"Settings: params/presets/tiny/rl.yaml ({pre['advantage_estimator']}, KL loss {pre.get('use_kl_loss')} "
               f"({pre.get('kl_estimator')}), {pre['rollout_batch_size']} prompts per step, train batch "
               f"{pre['train_batch_size']}, micro {pre['micro_train_batch_size']}, micro rollout "
               f"{pre['micro_rollout_batch_size']}, packing_samples {str(bool(pre.get('packing_samples'))).lower()}, "
               f"fp32, ZeRO {pre.get('zero_stage', 0)}, one process), reward "
               f"rlhf_ops/rewards/arith.py, no eval. {steps} steps per point, the first dropped as warm-up; "
               f"columns are the mean over the other {steps - 1} step(s). Policies: *untrained* tiny Llama "
               f"models from `make_tiny` (4 layers, 4 heads, 2 KV heads, intermediate 4 x hidden, vocab 512): "
               f"their step time is what a trained model of the same shape would cost for the same lengths, "
               f"and they rarely emit EOS, so responses run close to --generate_max_len. An untrained policy "
               f"scores ~0 on the arithmetic reward, so its group advantages are ~0, but the update does the same "
               f"forward/backward (policy + k3 KL loss) and optimizer work whatever the advantages (nothing in "
               f"rlhf_ops/rl/update.py skips on zero advantages). "
               + ("The `sft` rows use the trained SFT model (" + r["sft_model"] + "), whose answers stop at EOS. "
                  if r["sft_model"] else "")
               + "logprobs = `time_logprobs`, all of `make_experience` (actor and reference forwards, KL, "
               "advantages); other = step time outside the four parts (NaN checks, weight sync, bookkeeping). "
               "ms per sample-token = step time / (samples x mean response tokens).", ""] + t + [
               "", "Local scaling exponents k (time ~ x^k between neighbouring points; x is mean response "
               "tokens, samples per prompt or parameters; 1 = linear, 2 = quadratic). Noise: single steps vary by "
               f"up to {noise(rl):.0f}% around their point's mean (column step s min-max); a mean of "
               f"{steps - 1} steps is correspondingly less noisy, but a 10% error in one time moves k by "
               "log(1.1)/log(x ratio): 0.14 over a doubling, 0.36 over x1.3, so exponents over small x ratios "
               "are rough:", ""] + ex + [
               "", "Summary (step time, first to last point of each sweep; the ± is from the step-to-step spread within "
               "the two points and understates run-to-run drift, see the last item under Measured):", ""] + rl_summary(rl) + [
               "", "Measured (classes: k < 0.2 flat, < 0.8 sublinear, 0.8-1.2 linear, 1.2-1.8 between linear and "
               "quadratic, above: quadratic or worse):", ""] + rl_findings(rl, pre) + ["", mechanisms(pre)]
    if zero:
        P0 = {z["hidden"]: z["params"] for z in zero}
        md += ["## 2. Peak memory per ZeRO stage (`rlhf_ops.cli.train_sft`, 2 processes)", "",
               f"`torchrun --standalone --nproc_per_node 2` (as tests/integration does), gloo, fp32, "
               f"params/presets/tiny/sft.yaml with train batch 16, micro 8 (no accumulation), max_len 128, "
               f"{r['zero_steps']} optimizer steps, final model saved. Peak RSS = VmHWM of each rank process "
               f"(read from /proc/self/status by a runpy wrapper when the CLI returns; ru_maxrss agrees, see JSON). "
               f"Model states (textbook) = per rank, fp32 weights 4 B + grads 4 B + Adam 8 B per parameter, "
               f"with ZeRO-1 sharding the Adam state, ZeRO-2 also the grads, ZeRO-3 also the weights over 2 ranks.",
               ""] + zero_table(baseline, zero) + [""] + zero_findings(baseline, zero, P0)
    text = "\n".join(md) + "\n"
    print(text)
    (out / "scaling.md").write_text(text)
    plots(out, rl, baseline, zero)
    print(f"wrote {out / 'scaling.md'}, {out / 'scaling_rl_step.png'}, {out / 'scaling_zero_memory.png'}")


def zero_findings(baseline: dict, zero: list[dict], P0: dict) -> list[str]:
    out = []
    base = baseline["VmHWM_kb"] / 1024
    for h in sorted(P0):
        rs = sorted((r for r in zero if r["hidden"] == h), key=lambda r: r["zero_stage"])
        if not rs:
            continue
        means = [r["peak_rss_mb_mean"] for r in rs]
        ms = [r["model_state_mb_per_rank"] for r in rs]
        rank_gap = max(max(r["peak_rss_mb_per_rank"]) - min(r["peak_rss_mb_per_rank"]) for r in rs)
        line = (f"- h{h} ({P0[h] / 1e6:.2f}M parameters, {16 * P0[h] / 2**20:.1f} MB of fp32 weights + grads + Adam "
                f"state in all): peak RSS per rank " + ", ".join(f"{m:.0f} MB (ZeRO {r['zero_stage']})" for m, r in zip(means, rs))
                + f"; largest minus smallest {max(means) - min(means):.0f} MB; the two ranks of one run differ by up to "
                f"{rank_gap:.0f} MB. Textbook model states per rank: " + ", ".join(f"{m:.1f}" for m in ms)
                + f" MB, at most {100 * max(ms) / min(means):.1f}% of the smallest peak RSS. The imports alone reach "
                f"{base:.0f} MB ({100 * base / min(means):.0f}% of it).")
        if len(rs) > 1 and rs[0]["zero_stage"] == 0:
            hi = [r["peak_rss_mb_mean"] - rs[0]["peak_rss_mb_mean"] for r in rs[1:]]
            line += (f" ZeRO 1-3 peak {min(hi):+.0f} to {max(hi):+.0f} MB above ZeRO 0 (see below).")
        z0 = next((r for r in rs if r["zero_stage"] == 0), None)
        if z0:
            line += " Measured change vs ZeRO 0 (textbook saving): " + ", ".join(
                f"ZeRO {r['zero_stage']} {r['peak_rss_mb_mean'] - z0['peak_rss_mb_mean']:+.0f} MB "
                f"(-{z0['model_state_mb_per_rank'] - r['model_state_mb_per_rank']:.1f} MB)" for r in rs if r is not z0) + "."
        out.append(line)
    hs = sorted(P0)
    if len(hs) >= 2:
        lo, hi = hs[0], hs[-1]
        dP = P0[hi] - P0[lo]
        marg = {}
        for z in sorted({r["zero_stage"] for r in zero}):
            a = next((r for r in zero if r["hidden"] == lo and r["zero_stage"] == z), None)
            b = next((r for r in zero if r["hidden"] == hi and r["zero_stage"] == z), None)
            if a and b:
                marg[z] = (b["peak_rss_mb_mean"] - a["peak_rss_mb_mean"]) * 2**20 / dP
        gap = max(max(r["peak_rss_mb_per_rank"]) - min(r["peak_rss_mb_per_rank"]) for r in zero)
        err = gap * 2**20 / dP
        line = (f"- Marginal peak RSS per added parameter, h{lo} -> h{hi} (+{dP / 1e6:.2f}M parameters): "
                + "; ".join(f"ZeRO {z}: {v:.0f} B (textbook {model_state_bytes(1, z, 2):.0f} B)" for z, v in marg.items())
                + f"; the rank-to-rank spread ({gap:.0f} MB at most) makes these uncertain by about {err:.0f} B. Part "
                "of it is activations, which grow with the width rather than the parameter count.")
        if 0 in marg and len(marg) > 1:
            above = [z for z in marg if z > 0 and marg[z] > marg[0] + err]
            below = [z for z in marg if z > 0 and marg[z] < marg[0] - err]
            if len(above) == len(marg) - 1:
                line += " Every ZeRO stage >= 1 adds more per parameter than ZeRO 0 here, beyond that uncertainty."
            elif len(below) == len(marg) - 1:
                line += " Every ZeRO stage >= 1 adds less per parameter than ZeRO 0 here, beyond that uncertainty."
            else:
                line += " The stages do not differ consistently beyond that uncertainty."
        out.append(line)
    zc = baseline["with_zero_check_imports"]["VmHWM_kb"] / 1024
    max_saved = max(16.0 * r["params"] / 2**20 - r["model_state_mb_per_rank"] for r in zero)
    higher = all(r["peak_rss_mb_mean"] > z0["peak_rss_mb_mean"] for z0 in zero if z0["zero_stage"] == 0
                 for r in zero if r["hidden"] == z0["hidden"] and r["zero_stage"] > 0)
    out.append(("- Why ZeRO 1-3 use *more* than ZeRO 0 here: " if higher else "- Extra code at ZeRO >= 1: ") +
               f"for any stage >= 1, DeepSpeed 0.19's optimizer sanity "
               f"check (`deepspeed/runtime/zero/utils.py: is_zero_supported_optimizer`) imports "
               f"`deepspeed.runtime.zero.muon.muon_optimizer`, whose `@compiler.compile()` decorator runs "
               f"`torch.compile` at import time and so loads torch._dynamo / torch._inductor / functorch / sympy / "
               f"networkx (found by tracing the imports of `deepspeed.initialize`: 961 new modules at ZeRO 1 vs 288 "
               f"at ZeRO 0). In the imports-only process that import alone adds {zc - base:.0f} MB "
               f"({base:.0f} -> {zc:.0f} MB); in the trainer less is new, as part of torch._dynamo is loaded "
               f"before the engine. The largest textbook saving here is {max_saved:.1f} MB. Nothing is compiled: "
               f"it is import-time memory, paid once per process whatever the model size.")
    out.append("- What ZeRO partitions (optimizer state, gradients, weights: 16 bytes per parameter in fp32 with Adam) "
               "is a few MB to tens of MB at these sizes, while each rank's peak RSS is dominated by what no stage "
               "shards: the interpreter and the torch/transformers/DeepSpeed libraries (the imports-only process), "
               "allocator arenas, the data and the activations. DeepSpeed's own buffers also differ by stage (ZeRO 1/2 "
               "flatten the weights into one buffer and keep an fp32 copy of their partition, see "
               "deepspeed/runtime/zero/stage_1_and_2.py; ZeRO 2/3 add communication buckets), so a stage can hold "
               "more than the textbook count. ZeRO's savings matter when 16 B x parameters is comparable to the device "
               "memory (models of billions of parameters on GPUs), which this machine cannot show.")
    return out

