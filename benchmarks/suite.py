"""The benchmark suite: every benchmark in one go, one results file. What `make bench` runs.

    .venv/bin/python benchmarks/suite.py [--only trl,scaling,orchestration,weight_sync,bf16,collate,fused] [--out benchmarks/results]

Runs, one after the other on an otherwise idle machine (they are never run concurrently, so no
benchmark loads another's CPU):

* `trl_compare.py`: SFT, GRPO and reward-model training side by side with TRL 1.16 (needs
  `.venv-bench`; `make bench` creates it);
* `scaling.py`: time per RL step against response length, samples per prompt and model size, and
  peak memory per ZeRO stage (PNG plots);
* `orchestration.py`: the full tiny pipeline, a fully cached rerun, a resume after an RL failure;
* `weight_sync.py`: trainer -> vLLM engine weight-sync time per transport and model size (needs
  `.venv-vllm`);
* `bf16_engine.py`: bf16 SFT in one process, DeepSpeed's BF16_Optimizer against `LocalEngine`'s fp32
  master weights (time per step, peak RSS);
* `collate.py`: host time to collate one 8 x 2048-token micro-batch, against a per-token Python loop;
* `fused_kernels.py`: the fused CPU kernels (RMSNorm, RoPE, SwiGLU) against the PyTorch ops they
  replace, per kernel and over a whole SFT step.

Each writes its own `<name>.json` / `<name>.md`; this script then writes `suite.json` (every
result, plus the machine, the load before and after each part, and the device) and `suite.md`.
GPU figures come only from a GPU machine: when there is none, `suite.json` says so and holds none.
They are measured by `benchmarks/gpu.py` (not part of this suite: it needs CUDA).
It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"trl": "trl_compare", "scaling": "scaling", "orchestration": "orchestration", "weight_sync": "weight_sync",
         "bf16": "bf16_engine", "collate": "collate", "fused": "fused_kernels"}


def _gpu() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = _gpu()
    suite: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "python": platform.python_version(), "gpu": gpu or "none: GPU figures were not measured",
                   "command": " ".join(["python", *sys.argv]), "parts": {}}
    md = [f"# Benchmark suite, {suite['date']}", "", f"machine: {suite['machine']}; GPU: {suite['gpu']}", ""]
    for part in parts:
        name = PARTS[part]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(args.out)], cwd=ROOT)
        entry = {"exit_code": rc, "wall_s": round(time.perf_counter() - t0, 1), "load_before": load0,
                 "load_after": os.getloadavg()[0]}
        result = args.out / f"{name}.json"
        if rc == 0 and result.is_file():
            entry["result"] = json.loads(result.read_text())
        suite["parts"][part] = entry
        md += [f"## {part} (`benchmarks/{name}.py`, {entry['wall_s']:.0f} s, load {load0:.2f} -> {entry['load_after']:.2f})", ""]
        table = args.out / f"{name}.md"
        md += [table.read_text().strip() if rc == 0 and table.is_file() else f"FAILED (exit code {rc})", ""]
    (args.out / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
    (args.out / "suite.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    failed = [p for p, e in suite["parts"].items() if e["exit_code"] != 0]
    if failed:
        raise SystemExit(f"benchmark part(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
