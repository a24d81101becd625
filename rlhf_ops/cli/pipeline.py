"""`python -m rlhf_ops.cli.pipeline --preset tiny --output_dir runs/tiny`: run the stages in order.

The plain sequential runner behind `make run` until the Prefect flow takes over: each stage's
commands come from `rlhf_ops.stages` (params YAML + wired paths) and run as subprocesses, so
every stage starts from a clean process, exactly as a Ray job or a `dvc repro` stage would.
All params files are checked (unknown keys, wrong types) before the first stage starts.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rlhf_ops.config import ConfigError, check, opt, parse_config
from rlhf_ops.stages import ORDER, STAGES, command_lines


@dataclass(frozen=True)
class PipelineConfig:
    """Run the pipeline's stages for a preset."""
    preset: str = opt("tiny", "Params preset: a directory under params/presets/")
    output_dir: str = opt("runs/tiny", "Run directory: every stage's artifacts go under it")
    stages: Optional[str] = opt(None, f"Comma-separated subset of stages to run (default: all of {', '.join(ORDER)})")

    def __post_init__(self) -> None:
        for s in self.selected():
            check(s in STAGES, "stages", f"unknown stage {s!r}; stages are {', '.join(ORDER)}")

    def selected(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",")] if self.stages else list(ORDER)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse_config(PipelineConfig, argv, prog="python -m rlhf_ops.cli.pipeline")
    run = Path(cfg.output_dir).resolve()
    try:
        plan = {s: command_lines(s, cfg.preset, run) for s in cfg.selected()}
    except ConfigError as e:
        raise SystemExit(f"python -m rlhf_ops.cli.pipeline: error: {e}") from None
    timings: dict[str, float] = {}
    for stage, argvs in plan.items():
        t0 = time.perf_counter()
        print(f"==> stage {stage}", flush=True)
        for argv in argvs:
            print("    $ " + " ".join(_quote(a) for a in argv[1:]), flush=True)
            rc = subprocess.call(argv)
            if rc != 0:
                raise SystemExit(f"stage {stage} failed (exit code {rc}): {' '.join(argv[1:3])}")
        timings[stage] = time.perf_counter() - t0
        print(f"<== stage {stage} done in {timings[stage]:.1f} s", flush=True)
    print("\nartifacts:")
    for stage in plan:
        for p in STAGES[stage].outputs(run):
            print(f"  {stage:6s} {p}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f" (total {sum(timings.values()):.1f} s)")
    return timings


def _quote(a: str) -> str:
    import shlex
    return shlex.quote(a)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
