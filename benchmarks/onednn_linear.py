"""fp32 GEMMs on CPU: MKL (PyTorch's default) against oneDNN (`rlhf_ops.models.onednn`), and what it does to SFT.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onednn_linear.py [--repeats 3] [--steps 200] [--out benchmarks/results]

1. Every Linear shape of the tiny model at one packed SFT micro-batch (352 rows): the forward GEMM,
   the input-gradient GEMM and the weight-gradient GEMM, timed with MKL (`F.linear`, `mm`) and
   with oneDNN (`models.onednn._mm_t` on the operands `_LinearFn` gives it: the input gradient against
   a contiguous W^T, its copy timed too), best of 5 x 50 calls each. In the model, weight gradients
   under `SMALL_WEIGHT` elements (here q/k/v/o's) stay with MKL.
2. `rlhf_ops.cli.train_sft` on the tiny preset, packed, with RLHF_OPS_ONEDNN_LINEAR=0 and =1,
   alternating runs: ms per optimizer step over steps 2..N from the run's metrics.jsonl.

Writes onednn_linear.{json,md} under --out. A benchmark: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_head, machine  # noqa: E402

ROWS = 352
SHAPES = {"q_proj / o_proj": (128, 128), "k_proj / v_proj": (128, 64), "gate_proj / up_proj": (128, 512),
          "down_proj": (512, 128), "lm_head": (128, 512)}


def _best_us(fn, calls: int = 50, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def gemm_table() -> list[dict]:
    import torch
    import torch.nn.functional as F

    from rlhf_ops.models import onednn

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (i, o) in SHAPES.items():
        x, w, gy = torch.randn(ROWS, i, generator=g), torch.randn(o, i, generator=g), torch.randn(ROWS, o, generator=g)
        flops = 2 * ROWS * i * o
        cases = {"forward": (lambda: F.linear(x, w), lambda: onednn._mm_t(x, w)),
                 "grad input": (lambda: gy @ w, lambda: onednn._mm_t(gy, w.t().contiguous())),  # as shipped
                 "grad weight": (lambda: gy.t() @ x, lambda: onednn._mm_t(gy.t(), x.t()))}
        for what, (mkl, dnnl) in cases.items():
            torch.testing.assert_close(dnnl(), mkl(), rtol=1e-4, atol=1e-3)  # the same product
            t_mkl, t_dnnl = _best_us(mkl), _best_us(dnnl)
            rows.append({"layer": name, "gemm": what, "m_k_n": _mkn(what, ROWS, i, o), "mkl_us": round(t_mkl, 1),
                         "onednn_us": round(t_dnnl, 1), "mkl_gflops": round(flops / t_mkl / 1e3, 1),
                         "onednn_gflops": round(flops / t_dnnl / 1e3, 1), "speedup": round(t_mkl / t_dnnl, 2)})
    return rows


def _mkn(what: str, n: int, i: int, o: int) -> str:
    return {"forward": f"{n}x{i}x{o}", "grad input": f"{n}x{o}x{i}", "grad weight": f"{o}x{n}x{i}"}[what]


def sft_run(work: Path, model: Path, data: Path, on: bool, steps: int, tag: str) -> float:
    out = work / tag
    argv = [sys.executable, "-m", "rlhf_ops.cli.train_sft", "--config", str(ROOT / "params/presets/tiny/sft.yaml"),
            "--pretrain", str(model), "--dataset", str(data / "sft"), "--max_samples", str(steps * 8),
            "--max_epochs", "1", "--logging_steps", "1", "--packing_samples",
            "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt")]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **{"RLHF_OPS_ONEDNN_LINEAR": "1" if on else "0"})
    with open(work / f"{tag}.log", "w") as log:
        subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    secs = [r["seconds"] for r in rows if r.get("split") == "train"]
    return (secs[-1] - secs[0]) / (len(secs) - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    load0 = os.getloadavg()
    gemms = gemm_table()
    runs = {"mkl": [], "onednn": []}
    with tempfile.TemporaryDirectory() as tmp:
        from rlhf_ops.data.prepare import write_dataset
        from rlhf_ops.models.tiny import make_tiny

        work = Path(tmp)
        model, data = make_tiny(work / "model", seed=0), work / "data"
        write_dataset(data, preset="tiny", seed=42)
        for r in range(args.repeats):
            for name in runs:
                runs[name].append(round(sft_run(work, model, data, name == "onednn", args.steps, f"{name}{r}"), 2))
                print(f"train_sft packed, {name}: {runs[name][-1]} ms/step", flush=True)
    meta = {"started": started, "machine": machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": git_head(), "load_avg_start": [round(x, 2) for x in load0],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onednn_linear.py " + " ".join(sys.argv[1:])}
    sft = {k: {"runs_ms_per_step": v, "best": min(v), "median": statistics.median(v)} for k, v in runs.items()}
    sft["speedup_best"] = round(sft["mkl"]["best"] / sft["onednn"]["best"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onednn_linear.json").write_text(json.dumps({"meta": meta, "gemms": gemms, "sft": sft}, indent=1) + "\n")
    md = ["| layer | GEMM | M x K x N | MKL us | oneDNN us | MKL GFLOP/s | oneDNN GFLOP/s | speed-up |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {g['layer']} | {g['gemm']} | {g['m_k_n']} | {g['mkl_us']} | {g['onednn_us']} | {g['mkl_gflops']} | "
           f"{g['onednn_gflops']} | {g['speedup']}x |" for g in gemms]
    md += ["", "train_sft (tiny preset, --packing_samples, steps 2..N), ms per optimizer step:", "",
           "| GEMMs | runs | best | median |", "|---|---|---|---|"]
    md += [f"| {k} | {', '.join(map(str, sft[k]['runs_ms_per_step']))} | {sft[k]['best']} | {sft[k]['median']} |"
           for k in ("mkl", "onednn")]
    md += ["", f"Speed-up of the SFT step (best of runs): {sft['speedup_best']}x", "",
           f"{started}; {meta['machine']}; {meta['cores']} cores; threads {meta['threads']}; torch {meta['torch']}; "
           f"commit {meta['commit']}; load average {meta['load_avg_start']} at start, {meta['load_avg_end']} at end.",
           "", f"Command: `{meta['command']}`"]
    (args.out / "onednn_linear.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
