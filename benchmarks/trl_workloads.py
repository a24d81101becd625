"""Workload half of `benchmarks/trl_compare.py`: plan, run and time each side of SFT, RM and GRPO.

Split from the driver so each file stays readable; `trl_compare.py` (its docstring gives the
measurement method) calls these and renders the table. Per workload: `*_plan` builds the data
both sides train on (our rows in our order, tokenized once with our code) in the project venv,
`*_ours` runs our CLI as a child process and reads its metrics.jsonl, `*_trl` writes a spec for
`trl_side.py` and runs it in `.venv-bench`. Each run returns its timed window, its work and the
child's peak RSS. Nothing here renders or aggregates.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the *_plan functions import rlhf_ops (the project venv side)
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
TRL_SIDE = ROOT / "benchmarks" / "trl_side.py"
PRESETS = ROOT / "params" / "presets" / "tiny"
REWARD = ROOT / "rlhf_ops" / "rewards" / "arith.py"
TEMPLATE = "User: {}\nAssistant: "
# Runs our CLI module with an explicit torch.set_num_threads, and reports the count at exit.
OURS_WRAPPER = ("import atexit, runpy, sys, torch; n = int(sys.argv.pop(1)); torch.set_num_threads(n); "
                "atexit.register(lambda: print('BENCH_THREADS', torch.get_num_threads(), file=sys.stderr)); "
                "mod = sys.argv.pop(1); sys.argv[0] = mod; runpy.run_module(mod, run_name='__main__', alter_sys=True)")


# ----------------------------------------------------------------------------- child processes and files

def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                k = ln.split(":", 1)[0]
                if k in keys:
                    out[k] = int(ln.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


class PeakPrivate:
    """Samples a child's RssAnon (its private, allocated memory) every `every` s from this process.

    Why not only ru_maxrss: it also counts the shared libraries' file pages that the process has
    mapped, and how many of libtorch_cpu.so's pages one `import torch` maps depends on the page
    cache, not on the program: after a sequential read of that file (large folios), `import torch`
    alone measured 295 MB here, against 225 MB for the same file cached by page faults. The two
    sides run from two venvs whose copies of libtorch are cached differently, so ru_maxrss can
    differ by tens of MB for the same work. RssAnon does not depend on that. Sampling can miss a
    peak shorter than `every`; a training step here lasts ~30 ms or more.
    """

    def __init__(self, pid: int, every: float = 0.005):
        import threading

        self.pid, self.every, self.peak_kb, self.file_kb = pid, every, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            st = _status_kb(self.pid, ("RssAnon", "RssFile"))
            if st.get("RssAnon", 0) > self.peak_kb:
                self.peak_kb, self.file_kb = st["RssAnon"], st.get("RssFile", 0)
            self.stop.wait(self.every)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_anon_mb": self.peak_kb / 1024, "file_at_peak_mb": self.file_kb / 1024}


def run_child(argv: list[str], log: Path, env: dict) -> dict:
    """Run one training process; wall seconds, its peak RSS (wait4's ru_maxrss) and sampled peak private
    memory (`PeakPrivate`), and its log."""
    la = os.getloadavg()[0]
    t = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        probe = PeakPrivate(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        mem = probe.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(argv)}\n--- {log} (tail) ---\n{tail}")
    return {"wall_s": time.perf_counter() - t, "maxrss_mb": ru.ru_maxrss / 1024, "load_before": la, **mem}


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
    from rlhf_ops.data.preference import build_preference_set, shared_pair_row
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
    shared = [shared_pair_row([ps.chosen_ids[i] for i in mb], [ps.rejected_ids[i] for i in mb])[0].input_ids_BT.numel()
              for mb in mbs]
    padded = [2 * len(mb) * max(max(len(ps.chosen_ids[i]), len(ps.rejected_ids[i])) for i in mb) for mb in mbs]
    k = RM_BATCH // RM_MICRO
    return {"data": write_jsonl(work / "rm_rows.jsonl", rows),
            "real_per_step": [sum(real[i:i + k]) for i in range(0, len(real), k)],
            "shared_per_step": [sum(shared[i:i + k]) for i in range(0, len(shared), k)],
            "padded_per_step": [sum(padded[i:i + k]) for i in range(0, len(padded), k)]}


RM_VARIANTS = {"shared": (["--packing_samples", "--prefix_sharing"], "shared_per_step"),
               "packed": (["--packing_samples"], "real_per_step"), "padded": (["--no-packing_samples"], "padded_per_step")}


def rm_ours(model: Path, data: Path, steps: int, variant: str, out: Path, threads: int, plan: dict) -> dict:
    flags = ["--config", str(PRESETS / "rm.yaml"), "--pretrain", str(model), "--dataset", str(data / "preference"),
             "--max_samples", str(steps * RM_BATCH), "--max_epochs", "1", "--logging_steps", "1", "--eval_steps", "-1",
             "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), *RM_VARIANTS[variant][0]]
    cmd = ours_cmd("rlhf_ops.cli.train_rm", flags, threads)
    run = run_child(cmd, out.with_suffix(".log"), child_env(threads))
    rows = metrics_rows(out / "ckpt")
    assert len(rows) == steps, f"expected {steps} logged steps, got {len(rows)}"
    secs = window([r["seconds"] for r in rows], 1, steps)
    pairs = RM_BATCH * (steps - 1)
    return {**run, "seconds": secs, "pairs": pairs, "pairs_per_s": pairs / secs,
            "tokens_per_step": statistics.mean(plan["real_per_step"]),
            "computed_tokens_per_step": statistics.mean(plan[RM_VARIANTS[variant][1]]),
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


GRPO_VARIANTS = {"shared": ["--packing_samples", "--prefix_sharing"], "packed": ["--packing_samples"],
                 "padded": ["--no-packing_samples"]}


def grpo_ours(model: Path, data: Path, steps: int, variant: str, out: Path, threads: int) -> dict:
    flags = ["--config", str(PRESETS / "rl.yaml"), "--pretrain", str(model), "--prompt_data", str(data / "prompts"),
             "--reward_func", str(REWARD), "--max_samples", str(steps * RL["prompts"]), "--logging_steps", "1",
             "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), *GRPO_VARIANTS[variant]]
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


def grpo_trl(model: Path, steps: int, work: Path, name: str, threads: int, plan: dict,
             save_model: Path | None = None) -> dict:
    accum = RL["train_batch"] // RL["micro"]
    per_gen = RL["prompts"] * RL["G"] // RL["micro"]  # micro-batches per generation round (TRL counts these)
    opt_per_rl = per_gen // accum                      # optimizer steps per RL step
    spec = {"kind": "grpo", "model": str(model), "data": str(plan["data"]), "steps": steps * opt_per_rl, "seed": 42,
            "lr": RL["lr"], "warmup_ratio": 0.0, "adam_betas": [0.9, 0.95], "max_norm": 1.0, "micro": RL["micro"],
            "accum": accum, "steps_per_generation": per_gen, "num_generations": RL["G"],
            "max_completion_length": RL["max_new"], "temperature": 1.0, "beta": RL["beta"], "reward_file": str(REWARD),
            "prompt_ids": plan["prompt_ids"], "save_model": str(save_model) if save_model else None}
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
