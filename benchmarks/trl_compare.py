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
2..N / that window, best of the repeats; peak memory = ru_maxrss of each training process
(os.wait4 on the child), the largest of the repeats. Writes `trl_compare.json` and
`trl_compare.md` under --out and prints the table. A benchmark: it asserts nothing about speed.
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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
TRL_SIDE = ROOT / "benchmarks" / "trl_side.py"
PRESETS = ROOT / "params" / "presets" / "tiny"
REWARD = ROOT / "rlhf_ops" / "rewards" / "arith.py"
TEMPLATE = "User: {}\nAssistant: "
# Runs our CLI module with an explicit torch.set_num_threads, and reports the count at exit.
OURS_WRAPPER = ("import atexit, runpy, sys, torch; n = int(sys.argv.pop(1)); torch.set_num_threads(n); "
                "atexit.register(lambda: print('BENCH_THREADS', torch.get_num_threads(), file=sys.stderr)); "
                "mod = sys.argv.pop(1); sys.argv[0] = mod; runpy.run_module(mod, run_name='__main__', alter_sys=True)")
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


def run_child(argv: list[str], log: Path, env: dict) -> dict:
    """Run one training process; (wall seconds, peak RSS of the child from wait4, its log)."""
    la = os.getloadavg()[0]
    t = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(argv)}\n--- {log} (tail) ---\n{tail}")
    return {"wall_s": time.perf_counter() - t, "maxrss_mb": ru.ru_maxrss / 1024, "load_before": la}


def child_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                PYTHONHASHSEED="0", DISABLE_MLFLOW_INTEGRATION="TRUE", WANDB_DISABLED="true")


def ours_cmd(module: str, flags: list[str], threads: int) -> list[str]:
    return [sys.executable, "-c", OURS_WRAPPER, str(threads), module, *flags]


def metrics_rows(ckpt: Path) -> list[dict]:
    rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "train"]


def threads_reported(log: Path) -> int | None:
    for ln in reversed(log.read_text().splitlines()):
        if ln.startswith("BENCH_THREADS"):
            return int(ln.split()[1])
    return None


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trl_run(spec: dict, work: Path, name: str, threads: int) -> dict:
    spec = dict(spec, threads=threads, out=str(work / f"{name}.result.json"))
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    run = run_child([str(BENCH_PY), str(TRL_SIDE), str(spec_path)], work / f"{name}.log", child_env(threads))
    return {**run, **json.loads(Path(spec["out"]).read_text())}


def window(ends: list[float], first: int, last: int) -> float:
    """Seconds from the end of optimizer step `first` to the end of step `last` (1-based)."""
    return ends[last - 1] - ends[first - 1]


# ----------------------------------------------------------------------------- SFT

SFT_BATCH = 8  # params/presets/tiny/sft.yaml: train_batch_size 8, micro 8, max_len 128, lr 1e-3, warm-up 0.05


def sft_plan(model: Path, data: Path, steps: int, work: Path) -> dict:
    """Our rows and their order, exactly as train_sft will consume them, and TRL's pre-tokenized copy."""
    from rlhf_ops.data.batching import epoch_micro_batches
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.trainers.sft import SFTConfig, build_sft_set

    n = steps * SFT_BATCH
    cfg = SFTConfig(pretrain=str(model), dataset=str(data / "sft"), input_key="input", output_key="output",
                    input_template=TEMPLATE, max_len=128, train_batch_size=SFT_BATCH, micro_train_batch_size=SFT_BATCH,
                    seed=42, max_samples=n)
    ds = build_sft_set(cfg, load_tokenizer(str(model)), cfg.dataset, "train", None, n)
    mbs = epoch_micro_batches(len(ds), SFT_BATCH, SFT_BATCH, 1, 0, 0, 42)
    assert len(mbs) == steps, (len(mbs), steps)
    order = [i for mb in mbs for i in mb]
    lens = [[len(ds.input_ids[i]) for i in mb] for mb in mbs]
    rows = [{"input_ids": ds.input_ids[i], "completion_mask": ds.loss_mask[i]} for i in order]
    mean_len = statistics.mean(len(r["input_ids"]) for r in rows)
    return {"data": write_jsonl(work / "sft_rows.jsonl", rows), "real_per_step": [sum(x) for x in lens],
            "padded_per_step": [len(x) * max(x) for x in lens], "target_tokens": sum(sum(r["completion_mask"]) for r in rows),
            "mean_len": mean_len,
            # TRL packs into bins of max_length 128 and counts a batch in bins: this many bins hold about the
            # tokens of our 8 samples (one packed row of 8 samples per step on our side)
            "trl_packed_bins": max(1, round(SFT_BATCH * mean_len / 128))}


def sft_ours(model: Path, data: Path, steps: int, packed: bool, out: Path, threads: int, plan: dict) -> dict:
    flags = ["--config", str(PRESETS / "sft.yaml"), "--pretrain", str(model), "--dataset", str(data / "sft"),
             "--max_samples", str(steps * SFT_BATCH), "--max_epochs", "1", "--logging_steps", "1",
             "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
             "--packing_samples" if packed else "--no-packing_samples"]
    cmd = ours_cmd("rlhf_ops.cli.train_sft", flags, threads)
    run = run_child(cmd, out.with_suffix(".log"), child_env(threads))
    rows = metrics_rows(out / "ckpt")
    assert len(rows) == steps, f"expected {steps} logged steps, got {len(rows)}"
    secs = window([r["seconds"] for r in rows], 1, steps)
    real = sum(plan["real_per_step"][1:])
    computed = real if packed else sum(plan["padded_per_step"][1:])
    return {**run, "seconds": secs, "tokens": real, "computed_tokens": computed, "tokens_per_s": real / secs,
            "tokens_per_step": statistics.mean(plan["real_per_step"]), "samples_per_step": SFT_BATCH,
            "threads": threads_reported(out.with_suffix(".log")), "cmd": shlex.join(cmd)}


def sft_trl(model: Path, steps: int, packed: bool, work: Path, name: str, threads: int, plan: dict) -> dict:
    spec = {"kind": "sft", "model": str(model), "data": str(plan["data"]), "steps": steps, "seed": 42, "lr": 1e-3,
            "warmup_ratio": 0.05, "adam_betas": [0.9, 0.95], "max_norm": 1.0, "max_length": 128,
            "batch": plan["trl_packed_bins"] if packed else SFT_BATCH, "packing": packed}
    r = trl_run(spec, work, name, threads)
    assert len(r["step_end"]) == steps and len(r["tokens_per_step"]) >= steps, (len(r["step_end"]), steps)
    secs = window(r["step_end"], 1, steps)
    real = sum(r["tokens_per_step"][1:steps])
    return {**r, "seconds": secs, "tokens": real, "computed_tokens": sum(r["computed_tokens_per_step"][1:steps]),
            "tokens_per_s": real / secs, "tokens_per_step": statistics.mean(r["tokens_per_step"][:steps]),
            "samples_per_step": statistics.mean(r["rows_per_step"][:steps]),
            "same_batches_as_ours": (r["tokens_per_step"][:steps] == plan["real_per_step"]) if not packed else None}


# ----------------------------------------------------------------------------- reward model

RM_BATCH, RM_MICRO = 32, 16  # params/presets/tiny/rm.yaml: train 32, micro 16, max_len 128, lr 1e-3, warm-up 0.05


def rm_plan(model: Path, data: Path, steps: int, work: Path) -> dict:
    from rlhf_ops.data.batching import epoch_micro_batches
    from rlhf_ops.data.preference import build_preference_set
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.trainers.rm import RMConfig

    n = steps * RM_BATCH
    cfg = RMConfig(pretrain=str(model), dataset=str(data / "preference"), prompt_key="prompt", input_template=TEMPLATE,
                   max_len=128, train_batch_size=RM_BATCH, micro_train_batch_size=RM_MICRO, seed=42, max_samples=n)
    ps = build_preference_set(cfg, load_tokenizer(str(model)), cfg.dataset, "train", None, n)
    mbs = epoch_micro_batches(len(ps), RM_BATCH, RM_MICRO, 1, 0, 0, 42)
    if len(mbs) * RM_MICRO != n:
        raise SystemExit(f"trl_compare: {n - len(ps)} preference pairs were dropped; use fewer --rm_steps")
    rows = [{"chosen_ids": ps.chosen_ids[i], "rejected_ids": ps.rejected_ids[i]} for mb in mbs for i in mb]
    real = [sum(len(ps.chosen_ids[i]) + len(ps.rejected_ids[i]) for i in mb) for mb in mbs]
    padded = [2 * len(mb) * max(max(len(ps.chosen_ids[i]), len(ps.rejected_ids[i])) for i in mb) for mb in mbs]
    k = RM_BATCH // RM_MICRO
    return {"data": write_jsonl(work / "rm_rows.jsonl", rows),
            "real_per_step": [sum(real[i:i + k]) for i in range(0, len(real), k)],
            "padded_per_step": [sum(padded[i:i + k]) for i in range(0, len(padded), k)]}


def rm_ours(model: Path, data: Path, steps: int, packed: bool, out: Path, threads: int, plan: dict) -> dict:
    flags = ["--config", str(PRESETS / "rm.yaml"), "--pretrain", str(model), "--dataset", str(data / "preference"),
             "--max_samples", str(steps * RM_BATCH), "--max_epochs", "1", "--logging_steps", "1", "--eval_steps", "-1",
             "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
             "--packing_samples" if packed else "--no-packing_samples"]
    cmd = ours_cmd("rlhf_ops.cli.train_rm", flags, threads)
    run = run_child(cmd, out.with_suffix(".log"), child_env(threads))
    rows = metrics_rows(out / "ckpt")
    assert len(rows) == steps, f"expected {steps} logged steps, got {len(rows)}"
    secs = window([r["seconds"] for r in rows], 1, steps)
    pairs = RM_BATCH * (steps - 1)
    return {**run, "seconds": secs, "pairs": pairs, "pairs_per_s": pairs / secs,
            "tokens_per_step": statistics.mean(plan["real_per_step"]),
            "computed_tokens_per_step": statistics.mean(plan["real_per_step" if packed else "padded_per_step"]),
            "threads": threads_reported(out.with_suffix(".log")), "cmd": shlex.join(cmd)}


def rm_trl(model: Path, steps: int, work: Path, name: str, threads: int, plan: dict) -> dict:
    spec = {"kind": "rm", "model": str(model), "data": str(plan["data"]), "steps": steps, "seed": 42, "lr": 1e-3,
            "warmup_ratio": 0.05, "adam_betas": [0.9, 0.95], "max_norm": 1.0, "max_length": 128,
            "micro": RM_MICRO, "accum": RM_BATCH // RM_MICRO}
    r = trl_run(spec, work, name, threads)
    assert len(r["step_end"]) == steps, (len(r["step_end"]), steps)
    secs = window(r["step_end"], 1, steps)
    pairs = RM_BATCH * (steps - 1)
    return {**r, "seconds": secs, "pairs": pairs, "pairs_per_s": pairs / secs,
            "tokens_per_step": statistics.mean(r["tokens_per_step"][:steps]),
            "computed_tokens_per_step": statistics.mean(r["computed_tokens_per_step"][:steps]),
            "same_batches_as_ours": r["tokens_per_step"][:steps] == plan["real_per_step"]}


# ----------------------------------------------------------------------------- GRPO

RL = {"prompts": 16, "G": 4, "train_batch": 32, "micro": 16, "max_new": 48, "lr": 1e-4, "beta": 0.01}  # rl.yaml


def grpo_plan(model: Path, data: Path, steps: int, work: Path) -> dict:
    """The prompts of our steps 1..N in our order (train_ppo: first --max_samples rows, randperm(seed 42))."""
    import torch

    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.rl.config import RLConfig
    from rlhf_ops.rl.setup import build_prompts

    n = steps * RL["prompts"]
    cfg = RLConfig(pretrain=str(model), prompt_data=str(data / "prompts"), input_key="input", label_key="label",
                   input_template=TEMPLATE, reward_func=str(REWARD), advantage_estimator="group_norm",
                   n_samples_per_prompt=RL["G"], rollout_batch_size=RL["prompts"], train_batch_size=RL["train_batch"],
                   prompt_max_len=64, max_samples=n, seed=42)
    ps = build_prompts(cfg, load_tokenizer(str(model)), cfg.prompt_data, "train")
    if len(ps) != n:
        raise SystemExit(f"trl_compare: only {len(ps)} of {n} RL prompts fit --prompt_max_len")
    order = torch.randperm(len(ps), generator=torch.Generator().manual_seed(42)).tolist()
    rows = [{"prompt": ps.texts[i], "label": ps.labels[i]} for i in order]
    return {"data": write_jsonl(work / "grpo_prompts.jsonl", rows), "prompt_ids": [ps.ids[i] for i in order]}


def grpo_ours(model: Path, data: Path, steps: int, packed: bool, out: Path, threads: int) -> dict:
    flags = ["--config", str(PRESETS / "rl.yaml"), "--pretrain", str(model), "--prompt_data", str(data / "prompts"),
             "--reward_func", str(REWARD), "--max_samples", str(steps * RL["prompts"]), "--logging_steps", "1",
             "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
             "--packing_samples" if packed else "--no-packing_samples"]
    cmd = ours_cmd("rlhf_ops.cli.train_ppo", flags, threads)
    run = run_child(cmd, out.with_suffix(".log"), child_env(threads))
    rows = metrics_rows(out / "ckpt")
    assert len(rows) == steps, f"expected {steps} logged RL steps, got {len(rows)}"
    timed = rows[1:]
    secs = sum(r["time_step"] for r in timed)
    phase = {k: sum(r[f"time_{k}"] for r in timed) for k in ("generate", "score", "logprobs", "train")}
    phase["other"] = secs - sum(phase.values())
    return {**run, "seconds": secs, "prompts": RL["prompts"] * (steps - 1), "prompts_per_s": RL["prompts"] * (steps - 1) / secs,
            "share": {k: v / secs for k, v in phase.items()}, "phase_s": phase,
            "completion_len": statistics.mean(r["response_length"] for r in rows),
            "reward": statistics.mean(r["reward"] for r in rows),
            "threads": threads_reported(out.with_suffix(".log")), "cmd": shlex.join(cmd)}


def grpo_trl(model: Path, steps: int, work: Path, name: str, threads: int, plan: dict) -> dict:
    accum = RL["train_batch"] // RL["micro"]
    per_gen = RL["prompts"] * RL["G"] // RL["micro"]  # micro-batches per generation round (TRL counts these)
    opt_per_rl = per_gen // accum                      # optimizer steps per RL step
    spec = {"kind": "grpo", "model": str(model), "data": str(plan["data"]), "steps": steps * opt_per_rl, "seed": 42,
            "lr": RL["lr"], "warmup_ratio": 0.0, "adam_betas": [0.9, 0.95], "max_norm": 1.0, "micro": RL["micro"],
            "accum": accum, "steps_per_generation": per_gen, "num_generations": RL["G"],
            "max_completion_length": RL["max_new"], "temperature": 1.0, "beta": RL["beta"], "reward_file": str(REWARD),
            "prompt_ids": plan["prompt_ids"]}
    r = trl_run(spec, work, name, threads)
    ends = r["step_end"]
    assert len(ends) == steps * opt_per_rl and len(r["phases"]) == steps, (len(ends), len(r["phases"]))
    rl_end = [ends[(k + 1) * opt_per_rl - 1] for k in range(steps)]  # end of each RL step
    secs = rl_end[-1] - rl_end[0]
    dur = [rl_end[k] - rl_end[k - 1] for k in range(1, steps)]
    ph = r["phases"][1:]
    phase = {"generate": sum(p["generate"] for p in ph), "score": sum(p["score"] for p in ph),
             "logprobs": sum(p["generate_and_score"] - p["generate"] - p["score"] for p in ph),
             "train": sum(d - p["generate_and_score"] for d, p in zip(dur, ph))}
    phase["other"] = secs - sum(phase.values())
    lens = [h["completions/mean_length"] for h in r["log_history"] if "completions/mean_length" in h]
    rewards = [h["reward"] for h in r["log_history"] if "reward" in h]
    return {**r, "seconds": secs, "prompts": RL["prompts"] * (steps - 1),
            "prompts_per_s": RL["prompts"] * (steps - 1) / secs, "share": {k: v / secs for k, v in phase.items()},
            "phase_s": phase, "completion_len": statistics.mean(lens) if lens else None,
            "reward": statistics.mean(rewards) if rewards else None}


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


def three_way(repeats: int, ours, trl) -> dict[str, list[dict]]:
    """Our packed and padded runs and TRL's (which has one layout), alternating; TRL always in the middle."""
    runs: dict[str, list] = {"ours_packed": [], "ours_padded": [], "trl": []}
    for r in range(repeats):
        for side in (("ours_packed", "trl", "ours_padded") if r % 2 == 0 else ("ours_padded", "trl", "ours_packed")):
            runs[side].append(strip(trl(r) if side == "trl" else ours(side == "ours_packed", r)))
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
                 "largest of repeats (peak RSS)",
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
            print(f"GRPO: {args.rl_steps} RL steps x {args.repeats} (ours packed + padded, TRL)", file=sys.stderr, flush=True)
            runs = three_way(args.repeats,
                             lambda packed, r: grpo_ours(policy, data, args.rl_steps, packed,
                                                         work / f"grpo_{'packed' if packed else 'padded'}_ours{r}", th),
                             lambda r: grpo_trl(policy, args.rl_steps, work, f"grpo_trl{r}", th, plan))
            for tag in ("packed", "padded"):
                res["comparisons"][f"grpo_{tag}"] = {"ours": runs[f"ours_{tag}"], "trl": runs["trl"]}
        if "rm" in only:
            plan = rm_plan(model, data, args.rm_steps, work)
            print(f"RM: {args.rm_steps} steps x {args.repeats} (ours packed + padded, TRL)", file=sys.stderr, flush=True)
            runs = three_way(args.repeats,
                             lambda packed, r: rm_ours(model, data, args.rm_steps, packed,
                                                       work / f"rm_{'packed' if packed else 'padded'}_ours{r}", th, plan),
                             lambda r: rm_trl(model, args.rm_steps, work, f"rm_trl{r}", th, plan))
            for tag in ("packed", "padded"):
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
    "sft_packed": "train_sft --packing_samples (1 row of 8 samples, block mask) vs SFTTrainer(packing bfd, max_length "
                  "128, {bins} bins/step flattened padding-free into 1 row): same rows, TRL bins them its own way",
    "grpo_packed": "train_ppo group_norm (preset rl.yaml + --packing_samples) vs GRPOTrainer (padded); 16 prompts x 4 "
                   "per RL step, 2 optimizer steps of 32 completions (micro 16); prompts of RL steps 2..N / window",
    "grpo_padded": "as above, ours with --no-packing_samples",
    "rm_packed": "train_rm (preset rm.yaml + --packing_samples) vs RewardTrainer (padded; it has no packing): the same "
                 "pairs in the same micro-batches of 16 pairs, 32 per step; pairs / window",
    "rm_padded": "train_rm --no-packing_samples vs RewardTrainer: identical padded micro-batches; pairs / window",
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
        if ids and name == "grpo_packed":
            out.append(f"GRPO: TRL tokenizes the prompts to {'the same ids as' if ids == {True} else 'DIFFERENT ids from'} ours")
    return out


def render(res: dict) -> str:
    lines = ["| comparison | throughput: ours | TRL | ours/TRL | peak RSS MB: ours | TRL | ours/TRL | work per step "
             "(ours / TRL) | how measured |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in res["comparisons"].items():
        key, unit = {"sft": ("tokens_per_s", "tok/s"), "grp": ("prompts_per_s", "prompts/s"),
                     "rm_": ("pairs_per_s", "pairs/s")}[name[:3]]
        o, t = best(c["ours"], key), best(c["trl"], key)
        rss_o, rss_t = max(x["maxrss_mb"] for x in c["ours"]), max(x["maxrss_mb"] for x in c["trl"])
        if name.startswith("sft"):
            work = f"{o['tokens_per_step']:.0f} / {t['tokens_per_step']:.0f} real tokens ({o['samples_per_step']:.0f} / " \
                   f"{t['samples_per_step']:.1f} samples)"
        elif name.startswith("grpo"):
            work = f"completion length {o['completion_len']:.1f} / {t['completion_len']:.1f} tokens"
        else:
            work = f"{o['computed_tokens_per_step']:.0f} / {t['computed_tokens_per_step']:.0f} tokens computed"
        how = HOW[name].format(bins=c.get("trl_batch"))
        lines.append(f"| {name} | {o[key]:.1f} {unit} | {t[key]:.1f} {unit} | **{o[key] / t[key]:.2f}** | {rss_o:.0f} | "
                     f"{rss_t:.0f} | {rss_o / rss_t:.2f} | {work} | {how} |")
    grpo = [k for k in ("grpo_packed", "grpo_padded") if k in res["comparisons"]]
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
              "on_step_end. Peak RSS: ru_maxrss of the training process (os.wait4).",
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
