"""Side-by-side CPU benchmarks of rlhf_ops against TRL 1.16: SFT, GRPO and reward-model training.

    .venv/bin/python benchmarks/trl_compare.py [--only sft,grpo,rm] [--repeats 2] [--threads 1]
        [--sft_steps 200] [--rm_steps 40] [--rl_steps 8] [--steps N (all three)] [--out benchmarks/results]

Needs TRL in its own venv, `.venv-bench` (never in the project's dependencies):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0          # first: the CPU wheel on disk
    echo torch==2.13.0 > /tmp/c.txt && .venv-bench/bin/pip install "trl==1.16.*" -c /tmp/c.txt

Each comparison runs our CLI (`python -m rlhf_ops.cli.train_sft|train_rm|train_ppo`, the project
venv) and TRL's trainer (`benchmarks/trl_side.py`, the TRL venv) as separate processes on the same
tiny model (`rlhf_ops.models.tiny.make_tiny`, seed 0) and data (`rlhf_ops.data.prepare`, preset
tiny, seed 42), built offline into a temporary directory. Both sides get the same token ids in
the same order (the harness tokenizes once with our code and hands TRL pre-tokenized rows), fp32,
the same optimizer steps, lr schedule, Adam betas, clipping, and the same OMP_NUM_THREADS and
torch.set_num_threads. Runs alternate ours/TRL (order flipped every repeat) so load hits both alike.

Timed window, both sides: from the end of optimizer step 1 to the end of the last step (model
loading, tokenization, the first step's warm-up, the final save and eval are outside it).
Ours: the `seconds` field of `<ckpt_path>/metrics.jsonl` (logged every step); GRPO: the sum of
the per-step `time_step` of steps 2..N (generation + scoring + logprobs + training of each RL
step). TRL: a TrainerCallback's perf_counter at `on_step_end`. Throughput = the work of steps
2..N / that window, best of the repeats; peak memory = the largest RssAnon of each training
process, sampled every 5 ms by the harness (`trl_workloads.PeakPrivate`, which says why not
ru_maxrss; ru_maxrss from os.wait4 is reported beside it), the largest of the repeats. Writes
`trl_compare.json` and `trl_compare.md` under --out and prints the table. A benchmark: it asserts nothing about speed.
The full run took ~18 min on the 2-core machine at load ~1; `--steps 3 --repeats 1` is a ~3 min smoke run.

Settings matched on the TRL side (trl_side.py): fp32 and no gradient checkpointing (TRL's configs default
to bf16 and checkpointing), cosine_with_min_lr (min 0.1 x lr), Adam betas (0.9, 0.95), weight decay 0,
clip 1.0, warm-up ratio, logging every step; SFT completion-only loss via a `completion_mask` column;
GRPO num_generations 4, 16 prompts per generation round (steps_per_generation 4 micro-batches of 16,
2 per optimizer step), num_iterations 1, beta 0.01 with TRL's k3 KL and its importance-weighted KL
correction off (ours has none), epsilon 0.2, loss_type dapo (token mean over the optimizer step, as
ours), group-std advantages, temperature 1, top_p 1, top_k 0, no prompt shuffling (our prompt order).
Differences that remain: TRL's optimizer is adamw_torch_fused, ours torch AdamW inside a DeepSpeed
ZeRO-0 engine; TRL's SFT/GRPO LM head is its chunked fused kernel (it also computes entropy and top-1
accuracy), ours a plain head at target positions; TRL packs SFT rows into 128-token BFD bins (3 bins per
step ~ our 8 samples), ours packs each micro-batch into one row; RewardTrainer and GRPOTrainer pad (no
packing); GRPO old/ref logprob forwards run in chunks of 16 on TRL, of --micro_rollout_batch_size 64 on
ours; sampling RNGs differ, so completions differ (their mean length is reported).

This file is the driver (venv check, alternation of the runs, the report); the per-workload
plan/run code, which builds the data and runs and times each side, is in `trl_workloads.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trl_workloads import (  # noqa: E402  (benchmarks/ is on sys.path)
    BENCH_PY, ROOT, SFT_BATCH, grpo_ours, grpo_plan, grpo_trl, rm_ours, rm_plan, rm_trl, sft_ours, sft_plan, sft_trl)

SETUP_HELP = ("create it with:\n  python3 -m venv .venv-bench\n  .venv-bench/bin/pip install torch==2.13.0\n"
              "  echo torch==2.13.0 > /tmp/c.txt && .venv-bench/bin/pip install 'trl==1.16.*' -c /tmp/c.txt")


# ----------------------------------------------------------------------------- environment

def check_bench_venv() -> dict:
    if not BENCH_PY.exists():
        raise SystemExit(f"trl_compare: {BENCH_PY} not found: the TRL side needs its own venv .venv-bench; "
                         + SETUP_HELP)
    probe = subprocess.run([str(BENCH_PY), "-c", "import json, torch, transformers, trl; print(json.dumps("
                            "{'torch': torch.__version__, 'transformers': transformers.__version__, "
                            "'trl': trl.__version__}))"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"trl_compare: cannot import trl/torch in .venv-bench ({last}); " + SETUP_HELP)
    versions = json.loads(probe.stdout)
    if not versions["trl"].startswith("1.16"):
        print(f"trl_compare: warning: .venv-bench has trl {versions['trl']}, not 1.16", file=sys.stderr)
    return versions


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = round(int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "ours_torch": torch.__version__}


# ----------------------------------------------------------------------------- driver

def best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def alternate(repeats: int, ours, trl) -> tuple[list[dict], list[dict]]:
    o, t = [], []
    for r in range(repeats):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            (o if side == "ours" else t).append((ours if side == "ours" else trl)(r))
            print(f"  {side} repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return o, t


def three_way(repeats: int, ours, trl, variants: tuple[str, ...] = ("packed", "padded")) -> dict[str, list[dict]]:
    """Our runs of each variant (ours(variant, repeat)) and TRL's (which has one layout), alternating: TRL in the
    middle, our variants' order reversed every repeat."""
    runs: dict[str, list] = {**{f"ours_{v}": [] for v in variants}, "trl": []}
    for r in range(repeats):
        order = [f"ours_{v}" for v in (variants if r % 2 == 0 else variants[::-1])]
        order.insert(len(order) // 2 if len(order) > 1 else 1, "trl")
        for side in order:
            runs[side].append(strip(trl(r) if side == "trl" else ours(side[5:], r)))
            print(f"  {side} repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return runs


def strip(run: dict) -> dict:
    """What the JSON keeps of one run (no per-step lists longer than needed)."""
    drop = {"log_history", "prompt_ids"}
    return {k: v for k, v in run.items() if k not in drop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="sft,grpo,rm", help="comma-separated subset of sft,grpo,rm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="OMP_NUM_THREADS and torch.set_num_threads for both sides")
    ap.add_argument("--sft_steps", type=int, default=200)
    ap.add_argument("--rm_steps", type=int, default=40)
    ap.add_argument("--rl_steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="set --sft_steps, --rm_steps and --rl_steps at once")
    ap.add_argument("--rl_model", default=None,
                    help="GRPO policy (a local HF model dir with its tokenizer, e.g. runs/tiny/sft); default: the "
                         "untrained tiny model, whose completions run to about --generate_max_len")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.steps is not None:
        args.sft_steps = args.rm_steps = args.rl_steps = args.steps
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = set(only) - {"sft", "grpo", "rm"}
    if bad:
        ap.error(f"--only: unknown {sorted(bad)}; choose from sft, grpo, rm")
    if min(args.sft_steps, args.rm_steps, args.rl_steps) < 2:
        ap.error("steps must be >= 2 (the first step is outside the timed window)")
    versions = check_bench_venv()
    os.environ.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.models.tiny import make_tiny

    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    load_start = os.getloadavg()
    res: dict = {"date": started, "machine": machine(), "loadavg_start": load_start, "threads": args.threads,
                 "trl_venv": versions, "repeats": args.repeats, "aggregate": "best of repeats (throughput); "
                 "largest of repeats (peak memory)",
                 "command": "OMP_NUM_THREADS=%s %s" % (os.environ.get("OMP_NUM_THREADS", "(unset)"),
                                                      shlex.join(["python", "benchmarks/trl_compare.py", *sys.argv[1:]])),
                 "steps": {"sft": args.sft_steps, "rm": args.rm_steps, "rl": args.rl_steps},
                 "rl_model": args.rl_model or "untrained tiny model (make_tiny seed 0)", "comparisons": {}}
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        work = Path(tmp)
        model, data = work / "model", work / "data"
        make_tiny(model, seed=0)
        write_dataset(data, preset="tiny", seed=42)
        th = args.threads
        if "sft" in only:
            plan = sft_plan(model, data, args.sft_steps, work)
            for packed in (False, True):
                tag = "packed" if packed else "padded"
                print(f"SFT {tag}: {args.sft_steps} steps x {args.repeats}", file=sys.stderr, flush=True)
                o, t = alternate(args.repeats,
                                 lambda r: sft_ours(model, data, args.sft_steps, packed, work / f"sft_{tag}_ours{r}", th, plan),
                                 lambda r: sft_trl(model, args.sft_steps, packed, work, f"sft_{tag}_trl{r}", th, plan))
                res["comparisons"][f"sft_{tag}"] = {"ours": [strip(x) for x in o], "trl": [strip(x) for x in t],
                                                    "mean_sample_len": plan["mean_len"],
                                                    "trl_batch": plan["trl_packed_bins"] if packed else SFT_BATCH}
        if "grpo" in only:
            policy = Path(args.rl_model).resolve() if args.rl_model else model
            plan = grpo_plan(policy, data, args.rl_steps, work)
            print(f"GRPO: {args.rl_steps} RL steps x {args.repeats} (ours shared prefix, packed, padded; TRL)",
                  file=sys.stderr, flush=True)
            variants = ("shared", "packed", "padded")
            runs = three_way(args.repeats,
                             lambda v, r: grpo_ours(policy, data, args.rl_steps, v, work / f"grpo_{v}_ours{r}", th),
                             lambda r: grpo_trl(policy, args.rl_steps, work, f"grpo_trl{r}", th, plan), variants)
            for tag in variants:
                res["comparisons"][f"grpo_{tag}"] = {"ours": runs[f"ours_{tag}"], "trl": runs["trl"]}
        if "rm" in only:
            plan = rm_plan(model, data, args.rm_steps, work)
            print(f"RM: {args.rm_steps} steps x {args.repeats} (ours shared prefix, packed, padded; TRL)", file=sys.stderr, flush=True)
            runs = three_way(args.repeats,
                             lambda v, r: rm_ours(model, data, args.rm_steps, v, work / f"rm_{v}_ours{r}", th, plan),
                             lambda r: rm_trl(model, args.rm_steps, work, f"rm_trl{r}", th, plan), ("shared", "packed", "padded"))
            for tag in ("shared", "packed", "padded"):
                res["comparisons"][f"rm_{tag}"] = {"ours": runs[f"ours_{tag}"], "trl": runs["trl"]}
    res["loadavg_end"] = os.getloadavg()
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    md = render(res)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_compare.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "trl_compare.md").write_text(md)


# ----------------------------------------------------------------------------- report

HOW = {
    "sft_padded": "train_sft (preset sft.yaml, --no-packing_samples) vs SFTTrainer(completion_only_loss, sequential "
                  "sampler): the same 8 pre-tokenized rows per step, right-padded to the longest; real tokens / window",
    "sft_packed": "train_sft --packing_samples (1 row of 8 samples, rlhf_sdpa: no padding computed) vs SFTTrainer(packing bfd, max_length "
                  "128, {bins} bins/step flattened padding-free into 1 row): same rows, TRL bins them its own way",
    "grpo_packed": "train_ppo group_norm (preset rl.yaml + --packing_samples) vs GRPOTrainer (padded); 16 prompts x 4 "
                   "per RL step, 2 optimizer steps of 32 completions (micro 16); prompts of RL steps 2..N / window",
    "grpo_padded": "as above, ours with --no-packing_samples",
    "grpo_shared": "as grpo_packed, ours with --prefix_sharing: each micro-batch carries a prompt once for its 4 "
                   "samples (same losses and gradients; micro-batches take whole prompt groups)",
    "rm_packed": "train_rm (preset rm.yaml + --packing_samples) vs RewardTrainer (padded; it has no packing): the same "
                 "pairs in the same micro-batches of 16 pairs, 32 per step; pairs / window",
    "rm_padded": "train_rm --no-packing_samples vs RewardTrainer: identical padded micro-batches; pairs / window",
    "rm_shared": "as rm_packed, ours with --prefix_sharing: each rejected side carries only what follows the tokens it "
                 "shares with the chosen side (same rewards and gradients)",
}


def checks(res: dict) -> list[str]:
    """Facts about the inputs of the runs (not about speed): threads, and that both sides saw the same data."""
    out = []
    threads = {x.get("threads") for c in res["comparisons"].values() for side in ("ours", "trl") for x in c[side]}
    out.append(f"torch threads seen in every run: {sorted(threads, key=str)}")
    for name, c in res["comparisons"].items():
        same = {x.get("same_batches_as_ours") for x in c["trl"]} - {None}
        if same:
            out.append(f"{name}: TRL's per-step token counts {'equal' if same == {True} else 'DIFFER from'} ours")
        ids = {x.get("same_prompt_ids") for x in c["trl"]} - {None}
        if ids and name == "grpo_shared":
            out.append(f"GRPO: TRL tokenizes the prompts to {'the same ids as' if ids == {True} else 'DIFFERENT ids from'} ours")
    return out


def render(res: dict) -> str:
    lines = ["| comparison | throughput: ours | TRL | ours/TRL | peak private MB: ours | TRL | ours/TRL | peak RSS MB "
             "ours / TRL | work per step (ours / TRL) | how measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in res["comparisons"].items():
        key, unit = {"sft": ("tokens_per_s", "tok/s"), "grp": ("prompts_per_s", "prompts/s"),
                     "rm_": ("pairs_per_s", "pairs/s")}[name[:3]]
        o, t = best(c["ours"], key), best(c["trl"], key)
        rss_o, rss_t = max(x["maxrss_mb"] for x in c["ours"]), max(x["maxrss_mb"] for x in c["trl"])
        anon_o, anon_t = (max(x.get("peak_anon_mb", float("nan")) for x in c[side]) for side in ("ours", "trl"))
        if name.startswith("sft"):
            work = f"{o['tokens_per_step']:.0f} / {t['tokens_per_step']:.0f} real tokens ({o['samples_per_step']:.0f} / " \
                   f"{t['samples_per_step']:.1f} samples)"
        elif name.startswith("grpo"):
            work = f"completion length {o['completion_len']:.1f} / {t['completion_len']:.1f} tokens"
        else:
            work = f"{o['computed_tokens_per_step']:.0f} / {t['computed_tokens_per_step']:.0f} tokens computed"
        how = HOW[name].format(bins=c.get("trl_batch"))
        lines.append(f"| {name} | {o[key]:.1f} {unit} | {t[key]:.1f} {unit} | **{o[key] / t[key]:.2f}** | {anon_o:.0f} | "
                     f"{anon_t:.0f} | {anon_o / anon_t:.2f} | {rss_o:.0f} / {rss_t:.0f} | {work} | {how} |")
    grpo = [k for k in ("grpo_shared", "grpo_packed", "grpo_padded") if k in res["comparisons"]]
    if grpo:
        lines += ["", "GRPO: share of the RL-step time per phase (best run of each side, RL steps 2..N):", "",
                  "| side | s per RL step | generate | score | logprobs (old + ref) | train | other |",
                  "|---|---|---|---|---|---|---|"]
        n = res["steps"]["rl"] - 1
        sides = [(f"ours ({k[5:]})", best(res["comparisons"][k]["ours"], "prompts_per_s")) for k in grpo]
        sides.append(("TRL", best(res["comparisons"][grpo[0]]["trl"], "prompts_per_s")))
        for side, r in sides:
            s = r["share"]
            lines.append(f"| {side} | {r['seconds'] / n:.2f} | {s['generate']:.0%} | {s['score']:.0%} | "
                         f"{s['logprobs']:.0%} | {s['train']:.0%} | {s['other']:.0%} |")
    lines += ["", "Timed window (both sides): end of optimizer step 1 to end of the last step; model loading, "
              "tokenization, step 1, the final eval and save are outside it. Ours: `seconds` in the run's "
              "metrics.jsonl (GRPO: sum of `time_step` of RL steps 2..N); TRL: perf_counter in a TrainerCallback's "
              "on_step_end. Peak private: the largest RssAnon of the training process, sampled every 5 ms from the "
              "harness (memory the process allocated). Peak RSS: ru_maxrss (os.wait4), which also counts mapped "
              "library pages; how many of libtorch's pages `import torch` maps depends on the page cache (225 vs "
              "295 MB for the same file here), and the two sides run from two venvs, so it is shown but not compared.",
              "", "Checks: " + "; ".join(checks(res)) + "."]
    la0, la1 = res["loadavg_start"], res["loadavg_end"]
    m = res["machine"]
    lines += ["", f"{res['date']}; {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; threads {res['threads']} per "
              f"process (OMP_NUM_THREADS and torch.set_num_threads, both sides); load average (1/5/15 min) "
              f"{la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at start, {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at end; "
              f"torch {m['ours_torch']} both sides, TRL {res['trl_venv']['trl']}, transformers "
              f"{res['trl_venv']['transformers']}; {res['repeats']} repeats alternating ours/TRL, {res['aggregate']}; "
              f"steps: SFT {res['steps']['sft']}, RM {res['steps']['rm']}, GRPO {res['steps']['rl']} RL steps.",
              "", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
