"""`--profile_steps A-B`: torch.profiler over chosen optimizer steps of a training loop.

A step's wall time says how long it took; this says where the time went: which kernels, which
host-side ops, and how often the host waited for the device (`cudaStreamSynchronize`: every
`.item()`, boolean-mask index or `bool(tensor)` of a CUDA tensor is one).
The recorded steps include everything the loop does in them: batch collation, forward, backward,
the optimizer and the metrics. For `train_ppo` a step also includes generation and scoring.

Writes to `out_dir` (the run's `--ckpt_path`/profile):
  trace_rank{R}.json  Chrome trace of rank R (open in https://ui.perfetto.dev or chrome://tracing)
  ops.md, ops.json    rank 0's ops with the most self time: device time first where a GPU ran,
                      host time otherwise; calls, and per-step averages
Recording slows the recorded steps down (host time most), so do not time them for throughput.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rlhf_ops.config import ConfigError

logger = logging.getLogger(__name__)


def parse_steps(spec: str) -> tuple[int, int]:
    """'A-B' (or 'A'): the first and last optimizer step to record, 1-based and inclusive."""
    parts = str(spec).strip().split("-")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise ConfigError(f"--profile_steps: expected 'A-B' or 'A' with 1 <= A <= B (optimizer steps, 1-based), "
                          f"got {spec!r}")
    return first, last


class StepProfiler:
    """Starts torch.profiler before step A and writes its results after step B (a no-op without a spec)."""

    def __init__(self, spec: str | None, out_dir: str | os.PathLike, rank: int = 0, total_steps: int | None = None):
        self.range = parse_steps(spec) if spec else None
        self.out_dir, self.rank = Path(out_dir), rank
        self._prof: Any = None
        self._t0 = 0.0
        self._steps = self._first = 0
        if self.range and total_steps is not None and self.range[0] > total_steps:
            logger.warning("--profile_steps %s: this run has %d optimizer steps; nothing will be recorded",
                           spec, total_steps)

    def begin(self, step: int) -> None:
        """Call before optimizer step `step` (1-based) starts."""
        if self.range is None or self._prof is not None or not self.range[0] <= step <= self.range[1]:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()
        self._t0, self._steps, self._first = time.perf_counter(), 0, step

    def end(self, step: int) -> None:
        """Call after optimizer step `step` has finished (its optimizer step included)."""
        if self._prof is None:
            return
        self._steps += 1
        if step >= self.range[1]:
            self.close()

    def close(self) -> None:
        """Stop recording (if it runs) and write the results; a loop that ends early calls this too."""
        if self._prof is None:
            return
        import torch

        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self._t0  # before the profiler's own post-processing
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank}.json"
        tmp = trace.with_name(f".{trace.name}.tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        if self.rank == 0:
            self._write_ops(prof, wall_s)
        logger.info("profile of %d step(s) written to %s", self._steps, self.out_dir)

    def _write_ops(self, prof: Any, wall_s: float, limit: int = 40) -> None:
        import torch

        from rlhf_ops.utils.atomic import write_text

        n = max(self._steps, 1)
        rows = [{"op": e.key, "calls": e.count, "self_device_ms": e.self_device_time_total / 1e3,
                 "self_host_ms": e.self_cpu_time_total / 1e3} for e in prof.key_averages()]
        on_device = any(r["self_device_ms"] > 0 for r in rows)
        rows.sort(key=lambda r: r["self_device_ms" if on_device else "self_host_ms"], reverse=True)
        summary = {"steps": self._steps, "first_step": self._first, "wall_s_per_step": wall_s / n,
                   "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "self_device_ms_per_step": sum(r["self_device_ms"] for r in rows) / n,
                   "host_syncs_per_step": sum(r["calls"] for r in rows if r["op"] in _SYNC_OPS) / n,
                   "ops": rows[:limit]}
        write_text(self.out_dir / "ops.json", json.dumps(summary, indent=2) + "\n")
        lines = [f"# torch.profiler: {self._steps} optimizer step(s) from step {self._first}, rank 0, "
                 f"{summary['device']}", "",
                 f"wall time per step while recording: {summary['wall_s_per_step'] * 1e3:.1f} ms; "
                 f"device self time per step: {summary['self_device_ms_per_step']:.1f} ms; "
                 f"host syncs per step ({', '.join(sorted(_SYNC_OPS))}): {summary['host_syncs_per_step']:g}", "",
                 f"Sorted by self {'device' if on_device else 'host'} time; per-step figures divide by {self._steps}.", "",
                 "| op | calls/step | self device ms/step | self host ms/step |", "|---|---|---|---|"]
        lines += [f"| `{r['op'][:90]}` | {r['calls'] / n:g} | {r['self_device_ms'] / n:.3f} | {r['self_host_ms'] / n:.3f} |"
                  for r in rows[:limit]]
        write_text(self.out_dir / "ops.md", "\n".join(lines) + "\n")


# CUDA runtime calls where the host waits for the device (`.item()` is a device-to-host copy, then one of these)
_SYNC_OPS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
