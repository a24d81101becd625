"""The fused fp32 CPU kernels (`rlhf_ops.kernels`) against the PyTorch ops they replace.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fused_kernels.py [--steps 400] [--repeats 300] [--out benchmarks/results]

1. Each kernel, forward + backward where it has one, on the tiny model's SFT micro-batch shapes (351
   packed rows, hidden 128, intermediate 512, 4 query / 2 key-value heads of 32): best and median of 7
   rounds of --repeats calls, kernels and PyTorch ops alternating round by round. "PyTorch ops" is the
   path each module takes without the kernels: Hugging Face's RMSNorm, `models.rope`'s RoPE, and
   `models.mlp`'s elementwise ops.
2. A whole training step: one packed `train_sft` run (tiny preset, --steps samples / 8 per step, the
   tiny model and built-in data built into a temporary directory), with the kernels switched on and off
   at alternate optimizer steps in the same process, so both see the same weights, data and machine
   state; the time from one step's start to the next's, median over each half (the first 10 steps
   skipped).

`malloc.tune()` first, as every CLI stage does. Prints a markdown table and writes
fused_kernels.{json,md}. A benchmark: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _kernel_cases(rows: int = 351, H: int = 128, inter: int = 512, heads: int = 4, kv: int = 2, D: int = 32):
    """name -> (fused fn, PyTorch-ops fn), each one forward + backward of the piece it names."""
    from rlhf_ops.kernels import fused

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, H, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, generator=g)).requires_grad_()
    dy = torch.randn(rows, H, generator=g)

    def norm_torch():
        h = x.to(torch.float32)
        y = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float32)
        y.backward(dy)

    gate, up, grad_p = (torch.randn(rows, inter, generator=g) for _ in range(3))

    def swiglu_bwd_torch():  # models.mlp's backward without the kernels
        s = F.silu(gate)
        p = s * up
        gu = torch.mul(grad_p, s, out=p)
        gg = grad_p.clone().mul_(up)
        torch.ops.aten.silu_backward.grad_input(gg, gate, grad_input=gg)
        return gu

    proj_q, proj_k = torch.randn(1, rows, heads * D, generator=g), torch.randn(1, rows, kv * D, generator=g)
    ang = torch.randn(1, rows, D, generator=g)
    cos, sin = ang.cos(), ang.sin()

    def rope_with(fn):
        def run():
            q = proj_q.view(1, rows, heads, D).transpose(1, 2).requires_grad_()
            k = proj_k.view(1, rows, kv, D).transpose(1, 2).requires_grad_()
            oq, ok = fn(q, k)
            torch.autograd.backward((oq, ok), (torch.ones_like(oq), torch.ones_like(ok)))
        return run

    def torch_rope(q, k):  # models.rope's PyTorch path
        half = D // 2
        c, s = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(1)
        return q * c + q.roll(half, -1) * s, k * c + k.roll(half, -1) * s

    return {
        f"RMSNorm fwd+bwd [{rows}, {H}]": (lambda: fused.rms_norm(x, w, 1e-6).backward(dy), norm_torch),
        f"SwiGLU silu(g)*u fwd [{rows}, {inter}]": (lambda: fused.swiglu_forward(gate, up),
                                                   lambda: F.silu(gate).mul_(up)),
        f"SwiGLU elementwise bwd [{rows}, {inter}]": (lambda: fused.swiglu_backward(grad_p.clone(), gate, up),
                                                     swiglu_bwd_torch),
        f"RoPE q+k fwd+bwd [1, {rows}, {heads}+{kv}, {D}]": (rope_with(lambda q, k: (fused.rope(q, cos, sin),
                                                                                    fused.rope(k, cos, sin))),
                                                           rope_with(torch_rope)),
    }


def _time_kernels(repeats: int) -> dict:
    out = {}
    for name, (ours, theirs) in _kernel_cases().items():
        times: dict[str, list[float]] = {"fused": [], "torch": []}
        for fn in (ours, theirs):
            for _ in range(20):
                fn()
        for _ in range(7):
            for key, fn in (("fused", ours), ("torch", theirs)):
                t = time.perf_counter()
                for _ in range(repeats):
                    fn()
                times[key].append((time.perf_counter() - t) / repeats * 1e6)
        out[name] = {k: {"best_us": min(v), "median_us": statistics.median(v)} for k, v in times.items()}
    return out


def _time_steps(samples: int, workdir: Path) -> dict:
    """Median ms per optimizer step of one packed train_sft run, kernels on at even steps, off at odd."""
    import rlhf_ops.trainers.sft as sft
    from rlhf_ops.cli.train_sft import main as train_sft
    from rlhf_ops.data.prepare import write_dataset
    from rlhf_ops.kernels import cpu
    from rlhf_ops.models.tiny import make_tiny

    make_tiny(workdir / "model", seed=0)
    write_dataset(workdir / "data", preset="tiny", seed=42)
    lib, real_step = cpu.lib(), sft.sft_step
    state = {"i": 0, "t": None, "on": True}
    times: dict[str, list[float]] = {"kernels": [], "PyTorch ops": []}

    def step(model, batch, aux=0.0):  # train_sft's per-micro-batch function; one micro-batch per step here
        now = time.perf_counter()
        if state["t"] is not None and state["i"] > 10:
            times["kernels" if state["on"] else "PyTorch ops"].append((now - state["t"]) * 1e3)
        state["on"] = state["i"] % 2 == 0
        cpu._lib = lib if state["on"] else False
        state["i"] += 1
        state["t"] = time.perf_counter()
        return real_step(model, batch, aux)

    sft.sft_step = step
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train_sft(["--config", str(ROOT / "params/presets/tiny/sft.yaml"), "--pretrain", str(workdir / "model"),
                       "--dataset", str(workdir / "data/sft"), "--max_samples", str(samples), "--max_epochs", "1",
                       "--packing_samples", "--logging_steps", "50", "--save_path", str(workdir / "out"),
                       "--ckpt_path", str(workdir / "ckpt")])
    finally:
        sft.sft_step, cpu._lib = real_step, lib
    return {k: {"steps": len(v), "median_ms": statistics.median(v), "mean_ms": statistics.fmean(v)} for k, v in times.items()}


def main() -> None:
    from provenance import git_head, machine, write_results  # benchmarks/ is on sys.path
    from rlhf_ops.kernels import cpu
    from rlhf_ops.utils import malloc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of the SFT run (8 samples each)")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args()
    malloc.tune()
    if cpu.lib() is None:
        raise SystemExit("the fused CPU kernels did not build here (see the warning above): nothing to compare")
    res = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "machine": machine(), "commit": git_head(),
           "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv]),
           "kernels": _time_kernels(a.repeats)}
    with tempfile.TemporaryDirectory(prefix="fused_kernels_") as tmp:
        res["sft_step"] = _time_steps(8 * a.steps, Path(tmp))
    on, off = res["sft_step"]["kernels"]["median_ms"], res["sft_step"]["PyTorch ops"]["median_ms"]
    lines = [f"# Fused CPU kernels against PyTorch ops, {res['date']}", "",
             f"{res['machine']}; {res['threads']} torch threads; commit {res['commit']}; `{res['command']}`", "",
             "| piece | fused (us, best / median) | PyTorch ops (us, best / median) | speed-up (best) |", "|---|---|---|---|"]
    for name, r in res["kernels"].items():
        f, t = r["fused"], r["torch"]
        lines.append(f"| {name} | {f['best_us']:.1f} / {f['median_us']:.1f} | {t['best_us']:.1f} / {t['median_us']:.1f} "
                     f"| {t['best_us'] / f['best_us']:.2f}x |")
    lines += ["", "| tiny packed SFT, one process, alternate steps | ms per step (median) | steps |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.2f} | {v['steps']} |" for k, v in res["sft_step"].items()]
    lines += ["", f"Kernels on: {off / on:.3f}x the steps per second of PyTorch ops ({off - on:.2f} ms less per step)."]
    write_results(a.out, "fused_kernels", res, lines)


if __name__ == "__main__":
    main()
