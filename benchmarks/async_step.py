"""RL step time of the tiny preset with and without --async_train (alternating runs, 12 steps each).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_step.py [RUN_DIR]

Needs a run directory with `data/` and `sft/` (what `make run` writes; default runs/tiny). Prints
the mean `time_step` of RL steps 2-12 per run, with its generation and training parts, and the
best of two runs per mode. Async uses a second thread (and so a second core) for generation.
It asserts nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(run_dir: Path, out: Path, async_train: bool) -> dict[str, float]:
    from rlhf_ops.stages import command_lines

    (argv,) = command_lines("rl", "tiny", run_dir)
    argv += ["--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), "--max_samples", "192",
             "--eval_steps", "0", "--no-load_checkpoint"] + (["--async_train"] if async_train else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("split") == "train"][1:]
    return {k: sum(r[k] for r in steps) / len(steps) for k in ("time_step", "time_generate", "time_train")}


def main() -> None:
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "tiny"
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rlhf_async_step_") as tmp:
        for rep in range(2):
            for mode in ("sync", "async"):
                t = run(run_dir, Path(tmp) / f"{mode}_{rep}", mode == "async")
                best[mode] = min(best.get(mode, float("inf")), t["time_step"])
                print(f"{mode} run {rep}: {t['time_step']:.3f} s/step (generate {t['time_generate']:.3f}, "
                      f"train {t['time_train']:.3f})", flush=True)
    print(f"best: sync {best['sync']:.3f} s/step, async {best['async']:.3f} s/step, "
          f"ratio {best['sync'] / best['async']:.2f}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
