"""Host time to collate one micro-batch: `data.batching.collate` against a per-token Python loop.

    .venv/bin/python benchmarks/collate.py [--rows 8] [--len 2048] [--repeats 200] [--out benchmarks/results]

Collation runs on the host between optimizer steps; on a GPU the device can idle through it. The
baseline is what `collate` did before 2026-12-07: a Python loop over every token for the shifted
targets and `torch.tensor` over Python lists. Both are checked to give the same batch first. Rows are
random ids with the first 10% of each masked out (a prompt). Best of 5 rounds of --repeats calls each,
alternating. Prints a markdown table and writes collate.{json,md}. A benchmark: it asserts nothing
about speed.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_token_collate(ids_rows, mask_rows, pad_id, packed=False):
    """The baseline: targets built token by token in Python, tensors from Python lists."""
    from rlhf_ops.data.batching import Batch

    tg = lambda r, m: [r[t + 1] if m[t + 1] else -100 for t in range(len(r) - 1)] + [-100]  # noqa: E731
    lens = [len(r) for r in ids_rows]
    if packed:
        ids = torch.tensor([t for r in ids_rows for t in r], dtype=torch.long)[None]
        tgt = torch.tensor([t for r, m in zip(ids_rows, mask_rows) for t in tg(r, m)], dtype=torch.long)[None]
        return Batch(ids, torch.cat([torch.arange(n) for n in lens])[None], None, tgt, lens)
    T = max(lens)
    ids, tgt = torch.full((len(lens), T), pad_id, dtype=torch.long), torch.full((len(lens), T), -100, dtype=torch.long)
    att = torch.zeros((len(lens), T), dtype=torch.long)
    for i, (r, m) in enumerate(zip(ids_rows, mask_rows)):
        ids[i, : len(r)], tgt[i, : len(r)], att[i, : len(r)] = torch.as_tensor(r), torch.as_tensor(tg(r, m)), 1
    return Batch(ids, torch.arange(T).expand(len(lens), T).contiguous(), att, tgt, lens)


def main() -> None:
    from provenance import git_head, machine, write_results  # benchmarks/ is on sys.path
    from rlhf_ops.data.batching import collate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    rng = random.Random(0)
    ids = [[rng.randrange(3, 512) for _ in range(a.len)] for _ in range(a.rows)]
    masks = [[0] * (a.len // 10) + [1] * (a.len - a.len // 10) for _ in range(a.rows)]
    res = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "machine": machine(), "commit": git_head(),
           "threads": torch.get_num_threads(), "rows": a.rows, "len": a.len, "repeats": a.repeats,
           "command": " ".join(["python", *sys.argv]), "ms": {}}
    for packed in (True, False):
        x, y = collate(ids, masks, 0, packed=packed), per_token_collate(ids, masks, 0, packed=packed)
        for f in ("input_ids_BT", "position_ids_BT", "targets_BT", "attention_mask"):
            if not (getattr(x, f) is None and getattr(y, f) is None or torch.equal(getattr(x, f), getattr(y, f))):
                raise SystemExit(f"collate and the baseline differ in {f} (packed={packed})")
        best = {"collate": float("inf"), "per-token loop": float("inf")}
        for _ in range(5):
            for name, fn in (("collate", collate), ("per-token loop", per_token_collate)):
                t = time.perf_counter()
                for _ in range(a.repeats):
                    fn(ids, masks, 0, packed=packed)
                best[name] = min(best[name], (time.perf_counter() - t) / a.repeats * 1e3)
        res["ms"]["packed" if packed else "padded"] = best
    lines = [f"# Collation of {a.rows} x {a.len} tokens, {res['date']}", "",
             f"{res['machine']}; {res['threads']} torch threads; commit {res['commit']}; `{res['command']}`", "",
             "| layout | collate (ms) | per-token loop (ms) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['collate']:.3f} | {v['per-token loop']:.3f} | {v['per-token loop'] / v['collate']:.1f}x |"
              for k, v in res["ms"].items()]
    write_results(a.out, "collate", res, lines)


if __name__ == "__main__":
    main()
