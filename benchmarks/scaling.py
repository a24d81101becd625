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
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaling_common import PACK_CHECK, model_state_bytes  # noqa: E402  (benchmarks/ is on sys.path)
from provenance import code_hash, git_head, machine, wait_for_load  # noqa: E402
from scaling_report import report  # noqa: E402

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




# ------------------------------------------------------------------------------------------------ main
def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


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


if __name__ == "__main__":
    main()
