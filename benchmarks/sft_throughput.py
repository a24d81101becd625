"""SFT training throughput on the tiny preset, with packing on and off.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 40] [--repeats 2] [--out benchmarks/results]

Runs `rlhf_ops.cli.train_sft` in a subprocess per configuration (alternating packed/unpacked
runs when repeating, so machine noise hits both alike), reads the run's metrics JSONL for the
training wall time (model loading and tokenization excluded), and counts the tokens the run
actually consumed from the same data order the trainer uses. Prints a markdown table and writes
JSON + markdown. This is a benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(work: Path) -> tuple[Path, Path]:
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.models.tiny import make_tiny

    model, data = work / "model", work / "data"
    make_tiny(model, seed=0)
    write_dataset(data, preset="tiny", seed=42)
    return model, data


def _token_counts(model: Path, data: Path, steps: int, tbs: int, micro: int, seed: int) -> tuple[int, int]:
    """(real tokens, tokens incl. padding) consumed by `steps` optimizer steps on one process."""
    from rlhf_ops.data.batching import epoch_micro_batches
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.trainers.sft import SFTConfig, build_sft_set

    cfg = SFTConfig(pretrain=str(model), dataset=str(data / "sft"), input_key="input", output_key="output",
                    input_template="User: {}\nAssistant: ", max_len=128, train_batch_size=tbs,
                    micro_train_batch_size=micro, seed=seed)
    ds = build_sft_set(cfg, load_tokenizer(str(model)), cfg.dataset, "train")
    mbs = epoch_micro_batches(len(ds), tbs, micro, 1, 0, 0, seed)[: steps * tbs // micro]
    lens = [[len(ds.input_ids[i]) for i in mb] for mb in mbs]
    return sum(map(sum, lens)), sum(len(b) * max(b) for b in lens)


def run_once(model: Path, data: Path, out: Path, packed: bool, steps: int, tbs: int, micro: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "rlhf_ops.cli.train_sft", "--pretrain", str(model), "--dataset", str(data / "sft"),
            "--input_key", "input", "--output_key", "output", "--input_template", "User: {}\nAssistant: ",
            "--max_len", "128", "--train_batch_size", str(tbs), "--micro_train_batch_size", str(micro),
            "--max_samples", str(steps * tbs), "--learning_rate", "1e-3", "--zero_stage", "0",
            "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"), "--logging_steps", "1"]
    argv += ["--packing_samples"] if packed else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu")
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r["split"] == "train"]
    # time from the end of step 1 to the end of the last step: excludes warm-up of the first step
    return (train[-1]["seconds"] - train[0]["seconds"]) * steps / max(len(train) - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train_batch_size", type=int, default=32)
    ap.add_argument("--micro_train_batch_size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    model, data = _setup(work)
    real, padded = _token_counts(model, data, args.steps, args.train_batch_size, args.micro_train_batch_size, 42)
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for r in range(args.repeats):
        for name in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
            times[name].append(run_once(model, data, work / f"{name}{r}", name == "packed", args.steps,
                                        args.train_batch_size, args.micro_train_batch_size))
    load = os.getloadavg()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "loadavg_1m": load[0], "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
              "steps": args.steps, "train_batch_size": args.train_batch_size,
              "micro_train_batch_size": args.micro_train_batch_size, "real_tokens": real, "padded_tokens": padded,
              "rows": {k: {"seconds": min(v), "real_tokens_per_s": real / min(v)} for k, v in times.items()},
              "command": "python benchmarks/sft_throughput.py " + " ".join(sys.argv[1:])}
    table = ["| layout | train s (best of %d) | real tokens/s | tokens computed |" % args.repeats, "|---|---|---|---|"]
    for k, v in result["rows"].items():
        table.append(f"| {k} | {v['seconds']:.2f} | {v['real_tokens_per_s']:.0f} | {real if k == 'packed' else padded} |")
    md = "\n".join(table) + f"\n\nmachine: {result['machine']}, load {load[0]:.2f}, {result['date']}\n"
    print(md)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sft_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(args.out) / "sft_throughput.md").write_text(md)


if __name__ == "__main__":
    main()
