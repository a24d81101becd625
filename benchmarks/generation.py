"""Sampling speed: the KV-cached sampler (`rlhf_ops/generation/decode.py`) against transformers' `generate`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py [--model DIR] [--repeats 5] [--out benchmarks/results]

Both sides are `HFGenerator` on the same model and prompts, one process, one call per repeat:
the RL preset's rollout by default (16 built-in RL prompts x 4 samples, 48 new tokens,
temperature 1, one micro-batch of 64). `kv_sampler=False` is the `generate` path. Repeats
alternate the two sides; the table gives the best and the median seconds per call and the new
tokens per second. The default model is the untrained tiny Llama (make_tiny seed 0), whose
completions run to the length limit; `--model runs/tiny/sft` times a trained model whose
completions end early (finished rows leave the batch). Greedy completions of both sides are
compared as a check. A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEMPLATE = "User: {}\nAssistant: "


def _prompts(tokenizer, data: Path, n: int) -> list[list[int]]:
    rows = [json.loads(x) for x in (data / "prompts" / "train.jsonl").read_text().splitlines()[:n]]
    return [tokenizer(TEMPLATE.format(r["input"]))["input_ids"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an HF checkpoint dir (default: the untrained tiny model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n_samples_per_prompt", type=int, default=4)
    ap.add_argument("--generate_max_len", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="generation", help="results file stem (<out>/<name>.{json,md})")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.models.tiny import make_tiny

    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="gen_bench_") as tmp:
        model_dir = Path(args.model) if args.model else make_tiny(Path(tmp) / "model", seed=0)
        write_dataset(Path(tmp) / "data", preset="tiny", seed=42)
        tok = load_tokenizer(str(model_dir))
        prompts = [p for p in _prompts(tok, Path(tmp) / "data", args.prompts) for _ in range(args.n_samples_per_prompt)]
        model = load_causal_lm(str(model_dir)).eval()
    B = len(prompts)
    sides = {"kv_sampler": HFGenerator(model, tok, B), "generate": HFGenerator(model, tok, B, kv_sampler=False)}
    params = SamplingParams(args.temperature, args.generate_max_len, 1.0, seed=0)
    greedy = {k: g.generate(prompts, SamplingParams(0.0, args.generate_max_len)) for k, g in sides.items()}  # + warm-up
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.repeats):
        for name, gen in sides.items():
            t = time.perf_counter()
            out = gen.generate(prompts, SamplingParams(params.temperature, params.max_new_tokens, 1.0, seed=r))
            s = time.perf_counter() - t
            new = sum(map(len, out))
            runs[name].append({"seconds": s, "new_tokens": new, "tokens_per_s": new / s})
    load.append(os.getloadavg())

    def agg(name: str) -> dict:
        secs = [x["seconds"] for x in runs[name]]
        best = min(runs[name], key=lambda x: x["seconds"])
        return {"best_s": best["seconds"], "median_s": statistics.median(secs), "best_tokens_per_s": best["tokens_per_s"],
                "mean_new_tokens": statistics.mean(x["new_tokens"] for x in runs[name]) / B, "runs": runs[name]}

    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores", "threads": args.threads, "loadavg_start_end": load, "model": args.model or
           "untrained tiny Llama (make_tiny seed 0)", "batch": B, "generate_max_len": args.generate_max_len,
           "temperature": args.temperature, "repeats": args.repeats,
           "greedy_equal_rows": sum(a == b for a, b in zip(greedy["kv_sampler"], greedy["generate"])),
           "command": "OMP_NUM_THREADS=%s python benchmarks/generation.py %s" % (
               os.environ.get("OMP_NUM_THREADS", "(unset)"), " ".join(sys.argv[1:])),
           "sides": {k: agg(k) for k in sides}}
    kv, hf = res["sides"]["kv_sampler"], res["sides"]["generate"]
    lines = ["| sampler | best s per call | median s | new tokens/s (best) | mean completion length |", "|---|---|---|---|---|"]
    for name, a in res["sides"].items():
        lines.append(f"| {name} | {a['best_s']:.3f} | {a['median_s']:.3f} | {a['best_tokens_per_s']:.0f} | {a['mean_new_tokens']:.1f} |")
    lines += ["", f"KV sampler / generate: **{hf['best_s'] / kv['best_s']:.2f}x** (best), {hf['median_s'] / kv['median_s']:.2f}x "
              f"(median). Greedy completions equal on {res['greedy_equal_rows']} of {B} rows.", "",
              f"{res['date']}; {res['machine']}; {args.threads} thread(s); {res['model']}; {B} sequences "
              f"({args.prompts} prompts x {args.n_samples_per_prompt}), {args.generate_max_len} new tokens at most, "
              f"T={args.temperature}; {args.repeats} alternating repeats; load {load[0][0]:.2f} -> {load[1][0]:.2f}.", "",
              f"Command: `{res['command']}`"]
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{args.name}.md").write_text(md)


if __name__ == "__main__":
    main()
