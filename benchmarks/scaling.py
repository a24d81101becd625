"""Scaling on this CPU: time per RL step vs length / samples / model size, and peak RSS per ZeRO stage.

    .venv/bin/python benchmarks/scaling.py [--quick] [--steps 4] [--wait_load 1.0] [--out benchmarks/results]

Part 1 runs `python -m rlhf_ops.cli.train_ppo` (GRPO: the tiny preset's params/presets/tiny/rl.yaml,
the built-in reward rlhf_ops/rewards/arith.py, no eval set so no eval runs) for a few steps per
point, growing one of `--generate_max_len`, `--n_samples_per_prompt` and the model size while the
others keep the preset's values (48 tokens, 4 samples, the 128-hidden tiny model). The policy is an
*untrained* tiny model (`rlhf_ops.models.tiny.make_tiny`): step time depends on shapes, not on
what the weights know, and an untrained model almost never emits EOS, so its responses run close
to `--generate_max_len` -- that is how the length sweep gets long responses at all. With
`--sft_model` (default runs/tiny/sft when it exists) the length sweep is repeated with the
trained SFT policy, whose answers stop at EOS. The first step of every run is dropped as warm-up;
the other steps' `time_step` / `time_generate` / `time_score` / `time_logprobs` / `time_train`
and `response_length` come from the run's metrics JSONL.

Part 2 runs `torchrun --standalone --nproc_per_node 2 -m rlhf_ops.cli.train_sft` (gloo, fp32) with
`--zero_stage 0..3` on the tiny model and on the largest model of part 1, and records each rank's
peak RSS (VmHWM of /proc/self/status and ru_maxrss, read by a small runpy wrapper when the rank's
module returns), next to an imports-only baseline process and the textbook size of the model states.

Prints markdown tables; writes scaling.json, scaling.md, scaling_rl_step.png and
scaling_zero_memory.png under --out. A benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
BIN = Path(PY).parent
PRESET_RL = ROOT / "params" / "presets" / "tiny" / "rl.yaml"
PRESET_SFT = ROOT / "params" / "presets" / "tiny" / "sft.yaml"
RL_YAML, SFT_YAML = PRESET_RL, PRESET_SFT  # main() points these at copies taken at the start of the run
REWARD = ROOT / "rlhf_ops" / "rewards" / "arith.py"
BASE = {"generate_max_len": 48, "n_samples_per_prompt": 4, "hidden": 128}  # the tiny preset's values
ROLLOUT = 16  # prompts per RL step (rl.yaml's rollout_batch_size)
BASE_MICRO = 64  # rl.yaml's micro_rollout_batch_size (read from the YAML in main): sequences per generate call / logprob forward
COMPONENTS = ("generate", "score", "logprobs", "train")
PACKED = False  # rl.yaml's packing_samples (read in main)
PACK_CHECK = "n_samples_per_prompt, packing flipped (check)"

# The runpy wrapper every measured process runs under: it records the process's own peak RSS when
# the CLI's module returns (or exits), so nothing has to poll from outside.
WRAPPER = r'''
import json, os, resource, runpy, sys
mod, out = sys.argv[1], os.environ["SCALING_RSS_DIR"]
sys.argv = [mod] + sys.argv[2:]
code = 0
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
finally:
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            d[k + "_kb"] = int(v.split()[0])
    d["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d["rank"] = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, "rank%d.json" % d["rank"]), "w") as f:
        json.dump(d, f)
sys.exit(code)
'''

BASELINE = r'''
import json
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k + "_kb"] = int(v.split()[0])
    return d
import torch, transformers, deepspeed  # noqa: F401  what every rank imports before building a model
import rlhf_ops.trainers.sft  # noqa: F401
print(json.dumps(status()))
# what DeepSpeed 0.19's ZeRO optimizer check (runtime/zero/utils.py: is_zero_supported_optimizer) imports for
# ZeRO >= 1: its Muon module, whose @compiler.compile() decorator loads the torch.compile stack at import time
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
print(json.dumps(status()))
'''


# ----------------------------------------------------------------------------------------------- setup
def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return e


def sizes(hidden: int) -> dict:
    """The tiny preset's shape (4 layers, 4 heads, 2 KV heads, intermediate 4 x hidden) at another width."""
    return dict(hidden_size=hidden, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=4 * hidden)


def param_count(model_dir: Path) -> int:
    """Parameters in model.safetensors, read from its header (no torch needed)."""
    with open(model_dir / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def setup(work: Path, hiddens: list[int]) -> tuple[Path, dict[int, Path]]:
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.models.tiny import make_tiny

    data = work / "data"
    if not (data / "manifest.json").exists():
        write_dataset(data, preset="tiny", seed=42)
    models = {}
    for h in hiddens:
        models[h] = work / f"tiny_h{h}"
        if not (models[h] / "model.safetensors").exists():
            make_tiny(models[h], seed=0, overwrite=True, **sizes(h))
    (work / "rss_wrap.py").write_text(WRAPPER)
    return data, models


def run_wrapped(launcher: list[str], module: str, argv: list[str], out: Path, log: Path) -> tuple[float, list[dict]]:
    """Run `launcher wrapper module argv`; (wall seconds, per-rank RSS records)."""
    rss = out / "rss"
    shutil.rmtree(rss, ignore_errors=True)
    rss.mkdir(parents=True)
    cmd = launcher + [WRAP, module] + argv
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, env={**env(), "SCALING_RSS_DIR": str(rss)}, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"exit {p.returncode}: {shlex.join(cmd)}\n{tail}")
    return wall, [json.loads(x.read_text()) for x in sorted(rss.glob("rank*.json"))]


WRAP = ""  # set in main: the wrapper's path in the work dir


def read_metrics(path: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("split") == split]


# ---------------------------------------------------------------------------------------------- part 1
def rl_point(work: Path, data: Path, model: Path, tag: str, gen_len: int, n: int, steps: int, micro: int,
             extra: list[str]) -> dict:
    out = work / "rl" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = ["--config", str(RL_YAML), "--pretrain", str(model), "--prompt_data", str(data / "prompts"),
            "--reward_func", str(REWARD), "--generate_max_len", str(gen_len), "--n_samples_per_prompt", str(n),
            "--rollout_batch_size", str(ROLLOUT), "--micro_rollout_batch_size", str(micro),
            "--max_samples", str(steps * ROLLOUT), "--eval_steps", "1000000",
            "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt")] + extra
    load0 = os.getloadavg()[0]
    wall, rss = run_wrapped([PY], "rlhf_ops.cli.train_ppo", argv, out, out / "log.txt")
    load1 = os.getloadavg()[0]
    train = read_metrics(out / "ckpt" / "metrics.jsonl")
    kept = train[1:] if len(train) > 1 else train  # the first step is warm-up
    mean = lambda k: sum(r[k] for r in kept) / len(kept)  # noqa: E731
    steps_s = [r["time_step"] for r in kept]
    row = {"tag": tag, "gen_len": gen_len, "n_samples": n, "samples_per_step": ROLLOUT * n, "micro_rollout": micro,
           "packing": PACKED if not extra else ("--packing_samples" in extra),
           "step_s_min": min(steps_s), "step_s_max": max(steps_s), "loadavg_1m_before": load0, "loadavg_1m_after": load1,
           "steps_logged": len(train), "steps_measured": len(kept), "wall_s": wall,
           "step_s": mean("time_step"), **{f"{c}_s": mean(f"time_{c}") for c in COMPONENTS},
           "response_length": mean("response_length"),
           "response_length_all_steps": sum(r["response_length"] for r in train) / len(train),
           "per_step": [{k: r[k] for k in ("step", "time_step", "time_generate", "time_score", "time_logprobs",
                                           "time_train", "response_length")} for r in train],
           "peak_rss_mb": rss[0]["VmHWM_kb"] / 1024 if rss else None,
           "argv": ["python", "-m", "rlhf_ops.cli.train_ppo"] + argv}
    row["other_s"] = row["step_s"] - sum(row[f"{c}_s"] for c in COMPONENTS)
    row["ms_per_token"] = 1000 * row["step_s"] / (row["samples_per_step"] * row["response_length"])
    return row


def part_rl(work: Path, data: Path, models: dict[int, Path], sft: Path | None, a) -> list[dict]:
    pts: dict[tuple, dict] = {}
    rows = []

    def point(sweep: str, policy: str, model: Path, hidden: int, gen_len: int, n: int, micro: int | None = None,
              extra: tuple[str, ...] = ()) -> None:
        micro = micro or BASE_MICRO
        key = (policy, hidden, gen_len, n, micro, extra)
        if key not in pts:
            tag = (f"{policy}_h{hidden}_len{gen_len}_n{n}" + (f"_micro{micro}" if micro != BASE_MICRO else "")
                   + "".join("_" + x.strip("-") for x in extra))
            print(f"  rl {tag} ...", flush=True)
            pts[key] = rl_point(work, data, model, tag, gen_len, n, a.steps, micro, list(extra))
            pts[key].update(policy=policy, hidden=hidden, params=param_count(model))
            r = pts[key]
            print(f"    step {r['step_s']:.2f}s (gen {r['generate_s']:.2f} logp {r['logprobs_s']:.2f} "
                  f"train {r['train_s']:.2f}), resp len {r['response_length']:.1f}, wall {r['wall_s']:.0f}s", flush=True)
        rows.append({**pts[key], "sweep": sweep})

    b = BASE
    m = models[b["hidden"]]
    for L in a.lengths:
        point("generate_max_len", "untrained", m, b["hidden"], L, b["n_samples_per_prompt"])
    for n in a.samples:
        point("n_samples_per_prompt", "untrained", m, b["hidden"], b["generate_max_len"], n)
    for h in a.hiddens:
        point("model_size", "untrained", models[h], h, b["generate_max_len"], b["n_samples_per_prompt"])
    for n in a.packing_check:  # the samples sweep again with --packing_samples flipped (see mechanisms())
        point(PACK_CHECK, "untrained", m, b["hidden"], b["generate_max_len"], n,
              extra=("--no-packing_samples",) if PACKED else ("--packing_samples",))
    for mr in a.micro_rollouts:
        point("micro_rollout_batch_size (check)", "untrained", m, b["hidden"], b["generate_max_len"],
              b["n_samples_per_prompt"], mr)
    if sft is not None:
        for L in a.sft_lengths:
            point("generate_max_len (SFT policy)", "sft", sft, b["hidden"], L, b["n_samples_per_prompt"])
    return rows


# ---------------------------------------------------------------------------------------------- part 2
def part_zero(work: Path, data: Path, models: dict[int, Path], a) -> tuple[dict, list[dict]]:
    p = subprocess.run([PY, "-c", BASELINE], env=env(), cwd=ROOT, capture_output=True, text=True, check=True)
    lines = [x for x in p.stdout.strip().splitlines() if x.startswith("{")]
    baseline = {**json.loads(lines[0]), "with_zero_check_imports": json.loads(lines[1])}
    print(f"  imports-only baseline: VmHWM {baseline['VmHWM_kb'] / 1024:.0f} MB, "
          f"{baseline['with_zero_check_imports']['VmHWM_kb'] / 1024:.0f} MB with the ZeRO check's imports", flush=True)
    rows = []
    tbs, micro = 16, 8  # 2 ranks x micro 8 = 16 per optimizer step, no accumulation
    for h in a.zero_hiddens:
        for z in a.zero_stages:
            out = work / "zero" / f"h{h}_z{z}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            argv = ["--config", str(SFT_YAML), "--pretrain", str(models[h]), "--dataset", str(data / "sft"),
                    "--train_batch_size", str(tbs), "--micro_train_batch_size", str(micro), "--max_epochs", "1",
                    "--max_samples", str(a.zero_steps * tbs), "--zero_stage", str(z), "--logging_steps", "1",
                    "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt")]
            launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
            print(f"  sft h{h} zero {z} (2 processes) ...", flush=True)
            wall, rss = run_wrapped(launcher, "rlhf_ops.cli.train_sft", argv, out, out / "log.txt")
            train = read_metrics(out / "ckpt" / "metrics.jsonl")
            P = param_count(models[h])
            per = [r["VmHWM_kb"] / 1024 for r in rss]
            row = {"hidden": h, "params": P, "zero_stage": z, "ranks": len(rss), "steps": len(train), "wall_s": wall,
                   "peak_rss_mb_per_rank": per, "peak_rss_mb_mean": sum(per) / len(per),
                   "ru_maxrss_mb_per_rank": [r["ru_maxrss_kb"] / 1024 for r in rss],
                   "rss_anon_at_exit_mb_per_rank": [r.get("RssAnon_kb", 0) / 1024 for r in rss],
                   "rss_file_at_exit_mb_per_rank": [r.get("RssFile_kb", 0) / 1024 for r in rss],
                   "model_state_mb_per_rank": model_state_bytes(P, z, 2) / 2**20,
                   "train_s_per_step": ((train[-1]["seconds"] - train[0]["seconds"]) / (len(train) - 1)
                                        if len(train) > 1 else None),
                   "argv": ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "rlhf_ops.cli.train_sft"] + argv}
            print(f"    peak RSS per rank {', '.join(f'{x:.0f}' for x in per)} MB; model states "
                  f"{row['model_state_mb_per_rank']:.1f} MB/rank (textbook)", flush=True)
            rows.append(row)
    return baseline, rows


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
        f"packed into rows of up to {mr} sequences. On CPU each packed row carries a dense [T, T] block-diagonal\n"
        f"  causal mask (sdpa has no variable-length kernel here), so attention work and mask memory are quadratic\n"
        f"  in the row's total length T = sum of its (prompt + response) lengths: quadratic in length, and in\n"
        f"  samples until a row is full ({ROLLOUT} x n sequences per step: n={max(1, full // 2)} -> {ROLLOUT * max(1, full // 2)} "
        f"sequences per row, n={full} -> {mr}, one full row; beyond that more rows, linear).")
    padded_logp = (
        f"in padded micro-batches of {mr} sequences, each padded to its longest sequence: about linear in samples\n"
        f"  and in the padded length, plus attention quadratic in each sequence's own length (at most prompt +\n"
        f"  --generate_max_len, ~100 tokens here). Padding wastes work when lengths in a micro-batch differ (the\n"
        f"  SFT policy's answers), hardly any when every response runs to --generate_max_len (untrained policies).")
    return f"""\
What the code does per step (rlhf_ops/trainers/rl.py, rl/experience.py, generation/base.py,
data/batching.py), the expectations to read the exponents against. The preset runs with
`packing_samples: {str(packed).lower()}`.
- *generate*: HF `generate` with a KV cache on micro-batches of `micro_rollout_batch_size` = {mr}
  sequences; a micro-batch runs until its longest sample stops or hits --generate_max_len, so the
  number of decode steps follows the longest response of each micro-batch, not the mean. Expected:
  about linear in length (each decode step also attends over a growing cache); in samples, linear in
  the number of micro-batches ({ROLLOUT} n / {mr}) plus whatever a wider batch costs per decode step.
- *logprobs*: a no-grad forward of the actor and of the reference over every sample (then KL and
  advantages, which are cheap), {packed_logp if packed else padded_logp}
- *train*: forward + backward of micro-batches of {mt} sequences ({"packed, with the same dense mask" if packed
  else "padded"}), one AdamW step per {tb} samples (`train_batch_size`): expected about linear in samples,
  linear or a little worse in length.
- *score*: the rule-based reward, negligible at every point.
- Model size: matmul work grows about linearly in parameters for a fixed token count; attention does
  not (it scales with tokens and, for packed rows, tokens squared, with the head count fixed at 4);
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
                  "logprobs_s": ("logprobs (actor+ref)", "C1", "^"), "train_s": ("train", "C2", "D")}
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


# ------------------------------------------------------------------------------------------------ main
def wait_for_load(threshold: float, max_s: float) -> list[float]:
    t0, seen = time.time(), []
    while True:
        l1 = os.getloadavg()[0]
        seen.append(round(l1, 2))
        if l1 < threshold or time.time() - t0 >= max_s:
            return seen
        print(f"  load {l1:.2f} >= {threshold}: waiting 30 s ({time.time() - t0:.0f}/{max_s:.0f} s)", flush=True)
        time.sleep(30)


def machine() -> str:
    name = platform.machine()
    try:
        name = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal")) / 2**20
        name += f", {mem:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return name


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def git_head() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    d = subprocess.run(["git", "status", "--porcelain", "rlhf_ops", "params"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() + (" + uncommitted changes in rlhf_ops/ or params/" if d.stdout.strip() else "")


def code_hash() -> str:
    """sha256 of rlhf_ops/**/*.py and the tiny preset's YAML files: compared at start and end of a run."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(list((ROOT / "rlhf_ops").rglob("*.py")) + list((ROOT / "params" / "presets" / "tiny").glob("*.yaml"))):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    global WRAP, RL_YAML, SFT_YAML, PACKED, BASE_MICRO, ROLLOUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few points and steps, for development")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per point (first dropped); default 4, quick 2")
    ap.add_argument("--lengths", default=None, help="--generate_max_len values (default 16,32,48,64)")
    ap.add_argument("--samples", default=None, help="--n_samples_per_prompt values (default 2,4,8)")
    ap.add_argument("--hiddens", default=None, help="hidden sizes of the tiny models (default 64,128,256)")
    ap.add_argument("--packing_check", default=None, help="--n_samples_per_prompt values to rerun with "
                    "--packing_samples flipped relative to the preset (default 2,4,8; quick: none)")
    ap.add_argument("--micro_rollouts", default=None, help="--micro_rollout_batch_size values at the base point "
                    "(default: none)")
    ap.add_argument("--sft_model", default=None, help="trained policy for a second length sweep (default runs/tiny/sft "
                    "if present; 'none' to skip)")
    ap.add_argument("--sft_lengths", default=None, help="--generate_max_len values for the SFT policy (default 16,48,64)")
    ap.add_argument("--zero_stages", default=None, help="default 0,1,2,3")
    ap.add_argument("--zero_hiddens", default=None, help="models for the ZeRO part (default: 128 and the largest)")
    ap.add_argument("--zero_steps", type=int, default=8, help="SFT optimizer steps per ZeRO run")
    ap.add_argument("--skip_rl", action="store_true")
    ap.add_argument("--skip_zero", action="store_true")
    ap.add_argument("--wait_load", type=float, default=None,
                    help="wait until the 1-min load average is below this before measuring (default 1.0; quick: no wait)")
    ap.add_argument("--wait_max", type=float, default=1200.0, help="give up waiting after this many seconds, run anyway")
    ap.add_argument("--work", default=None, help="work dir (default: a new temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--replot", default=None, help="only rewrite scaling.md and the plots from this scaling.json")
    a = ap.parse_args()
    if a.replot:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        report(json.loads(Path(a.replot).read_text()), Path(a.out))
        return
    q = a.quick
    a.steps = a.steps or (2 if q else 4)
    a.lengths = ints(a.lengths or ("16,48" if q else "16,32,48,64"))
    a.samples = ints(a.samples or ("2,4" if q else "2,4,8"))
    a.hiddens = ints(a.hiddens or ("64,128" if q else "64,128,256"))
    a.micro_rollouts = ints(a.micro_rollouts or "")
    a.packing_check = ints(a.packing_check if a.packing_check is not None else ("" if q else "2,4,8"))
    a.sft_lengths = ints(a.sft_lengths or ("16,48" if q else "16,48,64"))
    a.zero_stages = ints(a.zero_stages or ("0,3" if q else "0,1,2,3"))
    a.zero_hiddens = ints(a.zero_hiddens or ("128" if q else f"128,{max(a.hiddens)}"))
    wait = a.wait_load if a.wait_load is not None else (None if q else 1.0)
    sft = a.sft_model or (str(ROOT / "runs" / "tiny" / "sft") if (ROOT / "runs" / "tiny" / "sft" / "config.json").exists()
                          else "none")
    sft_path = None if sft == "none" else Path(sft).resolve()
    if a.skip_rl:
        a.hiddens = sorted(set(a.zero_hiddens))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    data, models = setup(work, sorted(set(a.hiddens) | set(a.zero_hiddens)))
    WRAP = str(work / "rss_wrap.py")
    import yaml

    # the preset as it is now, copied: every run of this benchmark uses the same settings even if the file changes
    RL_YAML, SFT_YAML = work / "rl.yaml", work / "sft.yaml"
    shutil.copyfile(PRESET_RL, RL_YAML)
    shutil.copyfile(PRESET_SFT, SFT_YAML)
    preset_rl = yaml.safe_load(RL_YAML.read_text())
    PACKED = bool(preset_rl.get("packing_samples", False))
    BASE_MICRO, ROLLOUT = int(preset_rl["micro_rollout_batch_size"]), int(preset_rl["rollout_batch_size"])
    BASE.update(generate_max_len=int(preset_rl["generate_max_len"]), n_samples_per_prompt=int(preset_rl["n_samples_per_prompt"]))
    hash0 = code_hash()

    waited = wait_for_load(wait, a.wait_max) if wait is not None else []
    start = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}
    t0 = time.perf_counter()
    print(f"start {start['time']}, load {start['loadavg'][0]:.2f}", flush=True)
    rl = part_rl(work, data, models, sft_path, a) if not a.skip_rl else []
    baseline, zero = part_zero(work, data, models, a) if not a.skip_zero else (None, [])
    end = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg()}
    hash1 = code_hash()
    command = ("OMP_NUM_THREADS=%s .venv/bin/python benchmarks/scaling.py %s" % (env()["OMP_NUM_THREADS"], shlex.join(sys.argv[1:]))).strip()
    result = {"date": start["time"], "end": end["time"], "seconds": time.perf_counter() - t0, "machine": machine(),
              "cores": os.cpu_count(), "omp_num_threads": env()["OMP_NUM_THREADS"], "loadavg_start": start["loadavg"],
              "loadavg_end": end["loadavg"], "load_wait_threshold": wait, "load_wait_readings": waited,
              "command": command, "work_dir": str(work), "steps_per_point": a.steps, "zero_steps": a.zero_steps,
              "base": BASE, "rollout_batch_size": ROLLOUT, "sft_model": str(sft_path) if sft_path else None,
              "model_sizes": {h: {**sizes(h), "params": param_count(models[h])} for h in sorted(models)},
              "preset_rl": preset_rl, "preset_sft": yaml.safe_load(SFT_YAML.read_text()),
              "code_hash_start": hash0, "code_hash_end": hash1, "git_head": git_head(),
              "rl": rl, "zero_baseline_imports": baseline, "zero": zero}
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'scaling.json'}")
    report(result, out)


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


if __name__ == "__main__":
    main()
