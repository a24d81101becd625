"""Does GRPO beat SFT on the built-in task, with our loop and with TRL's? The same start, the same eval.

    .venv/bin/python benchmarks/rl_accuracy_vs_trl.py [--run_dir runs/tiny] [--steps 32] [--samples 8]

A cross-check for the RL diagnostics (README): when our GRPO leaves the policy worse than the SFT
model it started from, is it our loop or the regime? Both sides start from `<run_dir>/sft`, train
on the same prompts in the same order with the tiny preset's GRPO settings
(`benchmarks/trl_workloads.py`: `grpo_ours` runs `train_ppo` with params/presets/tiny/rl.yaml,
`grpo_trl` runs TRL 1.16's GRPOTrainer in `.venv-bench` with the matched settings listed in
trl_compare.py), then all three policies (SFT, ours, TRL) are scored by one evaluator on the
held-out prompts (`<run_dir>/data/prompts`, eval split): greedy accuracy, sampled accuracy
(temperature 1, --samples per prompt, one seed for all), and the share of sampled answers whose
work checks out (`rlhf_ops.data.arith.checks_out`). Writes rl_accuracy_vs_trl.{json,md} under --out.
It asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_workloads import ROOT, grpo_ours, grpo_plan, grpo_trl  # noqa: E402  (benchmarks/ is on sys.path)


def evaluate(model_dir: Path, rows: list[dict], samples: int) -> dict:
    """Greedy and sampled held-out accuracy of one policy, and the verified share of its samples."""

    from rlhf_ops.data.arith import checks_out
    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.rewards.arith import score

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), bf16=False, flash_attn=False, ds_config=None)
    texts = [f"User: {r['input']}\nAssistant: " for r in rows]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gen = HFGenerator(model, tok, micro_batch_size=200)
    out = {}
    for name, temp, n in (("greedy", 0.0, 1), ("sampled", 1.0, samples)):
        comps = gen.generate([p for p in prompts for _ in range(n)], SamplingParams(temp, 48, 1.0, seed=7))
        text = [tok.decode(c, skip_special_tokens=True) for c in comps]
        right = [score(t, str(rows[i // n]["label"])) == 1.0 for i, t in enumerate(text)]
        out[f"{name}_acc"] = sum(right) / len(right)
        if name == "sampled":
            out["sampled_verified"] = sum(r and checks_out(texts[i // n], t) for i, (r, t) in enumerate(zip(right, text))) / len(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", default=str(ROOT / "runs" / "tiny"))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    run = Path(args.run_dir).resolve()
    sft, data = run / "sft", run / "data"
    rows = [json.loads(x) for x in (data / "prompts" / "eval.jsonl").read_text().splitlines() if x.strip()]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl_") as tmp:
        work = Path(tmp)
        plan = grpo_plan(sft, data, args.steps, work)
        ours = grpo_ours(sft, data, args.steps, "padded", work / "ours", args.threads)
        trl = grpo_trl(sft, args.steps, work, "trl", args.threads, plan, save_model=work / "trl_model")
        policies = {"SFT (start)": sft, "ours (train_ppo GRPO)": work / "ours" / "model", "TRL GRPOTrainer": work / "trl_model"}
        res = {name: evaluate(path, rows, args.samples) for name, path in policies.items()}
    res["SFT (start)"]["train_reward"] = None
    res["ours (train_ppo GRPO)"]["train_reward"] = ours["reward"]
    res["TRL GRPOTrainer"]["train_reward"] = trl["reward"]
    load = os.getloadavg()[0]
    md = [f"| policy | greedy acc | sampled acc (T=1, x{args.samples}) | sampled, work checks out | mean train reward |",
          "|---|---|---|---|---|"]
    for name, r in res.items():
        tr = "-" if r["train_reward"] is None else f"{r['train_reward']:.3f}"
        md.append(f"| {name} | {r['greedy_acc']:.3f} | {r['sampled_acc']:.4f} | {r['sampled_verified']:.4f} | {tr} |")
    text = "\n".join(md) + (f"\n\n{len(rows)} held-out prompts; {args.steps} GRPO steps of 16 prompts x 4 samples on each side; "
                            f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t0:.0f} s, load {load:.2f}; command: "
                            f"python benchmarks/rl_accuracy_vs_trl.py {' '.join(sys.argv[1:])}\n")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_accuracy_vs_trl.json").write_text(json.dumps({"results": res, "steps": args.steps, "loadavg_1m": load}, indent=2) + "\n")
    (out / "rl_accuracy_vs_trl.md").write_text(text)


if __name__ == "__main__":
    main()
