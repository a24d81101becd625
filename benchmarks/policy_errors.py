"""Where a policy goes wrong on the built-in task: the first wrong line of each held-out solution.

    .venv/bin/python benchmarks/policy_errors.py runs/tiny/sft [runs/tiny/rl ...] [--samples 4] [--temperature 1]

For each model, generates greedy (and, with --samples N, N sampled) solutions for the held-out
prompts (`<run>/data/prompts/eval.jsonl`) and classifies each by its first wrong line, checked
against the question: `copy` (an operand or operator not the question's), `chain` (a step that does
not start from the previous result), `arith_<op><digits>` (a wrong result; digits 1 when both
operands have one digit), `answer_line` (steps right, "Answer:" wrong), `format`, `missing_step`,
or `ok`. Also reports, over the 90 one-digit facts "a op b" (a, b in 1..9, b <= a), the mean
probability of the right first result digit and how many the greedy choice gets right: the facts
every longer problem is built from. Why: it tells knowledge errors (which RL with a verifier can
only sharpen) from behaviour errors (format, copying, stopping) that RL fixes quickly. Writes
benchmarks/results/policy_errors.{json,md}. It asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_STEP = re.compile(r"^\s*(-?\d+) ([+*-]) (-?\d+) = (-?\d+)\s*$")


def classify(question: str, completion: str) -> str:
    """The kind of the first wrong line of `completion` for "What is a op b [op c]?"."""
    terms = question[len("What is "):].rstrip("?").split()
    nums, ops = [int(x) for x in terms[0::2]], terms[1::2]
    lines = completion.strip().split("\n")
    steps = [x for x in lines if not x.startswith("Answer")]
    answers = [x for x in lines if x.startswith("Answer")]
    prev = nums[0]
    for i, op in enumerate(ops):
        if i >= len(steps):
            return "missing_step"
        m = _STEP.match(steps[i])
        if not m:
            return "format"
        a, o, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if a != prev:
            return "chain" if i else "copy"
        if o != op or b != nums[i + 1]:
            return "copy"
        if c != (a + b if o == "+" else a - b if o == "-" else a * b):
            return f"arith_{o}{1 if max(a, b) < 10 else 2}"
        prev = c
    if not answers:
        return "no_answer"
    return "ok" if answers[0].strip() == f"Answer: {prev}" else "answer_line"


def _generate(model, tok, prompts: list[str], temperature: float, n: int, max_new: int, seed: int) -> list[str]:
    import torch

    torch.manual_seed(seed)
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), 50):
        enc = tok(prompts[i:i + 50], return_tensors="pt", padding=True)
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new, num_return_sequences=n, pad_token_id=tok.pad_token_id, **kw)
        out += tok.batch_decode(g[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def one_digit_facts(model, tok, template: str) -> tuple[float, int, int]:
    """(mean p(right first result digit), greedy right, count) over a op b, a, b in 1..9, b <= a."""
    import torch

    probs, right, n = 0.0, 0, 0
    for a in range(1, 10):
        for b in range(1, a + 1):
            for op in "+-":
                c = a + b if op == "+" else a - b
                ids = tok(template.format(f"What is {a} {op} {b}?") + f"{a} {op} {b} = ", return_tensors="pt").input_ids
                with torch.no_grad():
                    p = model(ids).logits[0, -1].softmax(-1)
                target = tok(str(c), add_special_tokens=False).input_ids[0]
                probs += p[target].item()
                right += int(p.argmax().item() == target)
                n += 1
    return probs / n, right, n


def analyse(path: str, rows: list[dict], template: str, samples: int, temperature: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [template.format(r["input"]) for r in rows]
    res: dict = {"model": path}
    runs = [("greedy", 0.0, 1)] + ([(f"T={temperature:g} x{samples}", temperature, samples)] if samples else [])
    for name, t, n in runs:
        outs = _generate(model, tok, prompts, t, n, 48, seed=0)
        kinds = collections.Counter(classify(rows[j // n]["input"], o) for j, o in enumerate(outs))
        res[name] = {k: v / len(outs) for k, v in kinds.most_common()}
    res["one_digit_p_right"], res["one_digit_greedy_right"], res["one_digit_facts"] = one_digit_facts(model, tok, template)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", default=str(ROOT / "runs" / "tiny" / "data" / "prompts" / "eval.jsonl"))
    ap.add_argument("--template", default="User: {}\nAssistant: ")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [json.loads(x) for x in Path(args.prompts).read_text().splitlines() if x.strip()]
    results = [analyse(m, rows, args.template, args.samples, args.temperature) for m in args.models]
    md = []
    for r in results:
        md += [f"### {r['model']}", "", "| decoding | " + " | ".join(["ok", "arith", "copy", "chain", "answer_line", "other"]) + " |",
               "|---|---|---|---|---|---|---|"]
        for name in [k for k in r if k.startswith(("greedy", "T="))]:
            d = r[name]
            arith = sum(v for k, v in d.items() if k.startswith("arith"))
            known = {"ok", "copy", "chain", "answer_line"}
            other = sum(v for k, v in d.items() if k not in known and not k.startswith("arith"))
            md.append(f"| {name} | {d.get('ok', 0):.3f} | {arith:.3f} | {d.get('copy', 0):.3f} | {d.get('chain', 0):.3f} | "
                      f"{d.get('answer_line', 0):.3f} | {other:.3f} |")
        md += ["", f"one-digit facts: mean p(right first digit) {r['one_digit_p_right']:.3f}, greedy right "
                   f"{r['one_digit_greedy_right']}/{r['one_digit_facts']}", ""]
    md.append(f"{time.strftime('%Y-%m-%d %H:%M')}, {len(rows)} prompts from {args.prompts}; command: python "
              + " ".join(sys.argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_errors.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "policy_errors.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
