"""gpu.md: the markdown report of one `benchmarks/gpu.py` run, from its results dict (gpu.json)."""
from __future__ import annotations


def report(r: dict) -> str:
    lines = [f"# GPU benchmark, {r['date']}", "", f"device: {r['device']}; torch {r['torch']}; model {r['params'] / 1e6:.1f}M "
             f"parameters ({r['model_sizes']})", ""]
    if r["smoke"]:
        lines += ["**--smoke: CPU, tiny fp32 model. These are not GPU figures.**", ""]
    for part in ("sft", "profile", "sync", "rl"):
        if "error" in r.get(part, {}):
            lines += [f"**{part}: failed**: `{r[part]['error'].splitlines()[0][:300]}`", ""]
    r = {k: v for k, v in r.items() if not (isinstance(v, dict) and "error" in v)}
    if "sft" in r:
        s = r["sft"]
        mfu = f"{100 * s['mfu']:.1f}% of {s['peak_tflops']:.0f} TFLOP/s" if s["mfu"] is not None else "n/a (no peak known)"
        lines += ["| SFT | tokens/step | s/step (median) | tokens/s | achieved TFLOP/s | MFU |", "|---|---|---|---|---|---|",
                  f"| packed, {r['args']['seq_len']} tokens x {r['args']['batch']} rows | {s['tokens_per_step']} | "
                  f"{s['step_s_median']:.4f} | {s['tokens_per_s']:.0f} | {s['achieved_tflops']:.2f} | {mfu} |", "",
                  f"`{s['command']}`" + (f" (engine: {s['engine']})" if s.get("engine") else ""), ""]
        tp = s["trainer_profile"]
        lines += [f"The trainer's steps {tp['first_step']}-{tp['first_step'] + tp['steps'] - 1} under torch.profiler: "
                  f"{1e3 * tp['wall_s_per_step']:.1f} ms wall per step, {tp['self_device_ms_per_step']:.1f} ms of it device "
                  f"time, {tp['host_syncs_per_step']:g} host syncs per step (top ops: sft_trainer_ops.md)", ""]
    if "rl" in r:
        q = r["rl"]
        ph = " | ".join(f"{k} {q['phase_s_median'][k]:.3f} s ({100 * q['phase_share'][k]:.0f}%)" for k in q["phase_s_median"])
        lines += [f"RL step (median of {q['steps_timed']}): {q['step_s_median']:.3f} s; {ph}; mean response "
                  f"{q['response_length']:.1f} tokens", "", f"`{q['command']}`", ""]
    if "sync" in r:
        w = r["sync"]
        lines += [f"Weight sync of {w['bytes'] / 1e6:.1f} MB: gather {w['gather_s']:.4f} s, pack {w['pack_s']:.4f} s, "
                  + (f"NCCL self-broadcast (group of one) {w['nccl_self_broadcast_s']:.4f} s, " if "nccl_self_broadcast_s" in w else "")
                  + f"gloo to a host-memory receiver {w['gloo_to_host_s']:.4f} s (best of 3 each)", ""]
    if "profile" in r:
        p = r["profile"]
        mm = f"; plain bf16 matmul 8192^3: {p['matmul_8192_tflops']:.0f} TFLOP/s" if "matmul_8192_tflops" in p else ""
        mfu = f", MFU {100 * p['mfu']:.1f}%" if p.get("mfu") is not None else ""
        lines += [f"Model step without the trainer (same packed batch, forward + backward + AdamW, in-process"
                  f"{', --use_liger_kernel' if p.get('use_liger_kernel') else ''}): "
                  f"{p['step_s_median']:.4f} s, {p['achieved_tflops']:.2f} TFLOP/s{mfu}{mm}; profiled "
                  f"{'kernel' if 'matmul_8192_tflops' in p else 'op'} time {p['profiled_ms_per_step']:.1f} ms per step", "",
                  "| op (profiler, 2 steps) | calls/step | ms/step | share |", "|---|---|---|---|"]
        lines += [f"| `{o['name']}` | {o['calls']} | {o['ms_per_step']:.2f} | {100 * o['share']:.1f}% |" for o in p["top_ops"]]
        lines.append("")
    return "\n".join(lines)
