"""`python -m rlhf_ops.cli.pipeline --preset tiny --output_dir runs/tiny [--stages sft,rl]`: run stages.

The one entry point of a stage, whoever calls it: `dvc repro` runs it per stage, the Prefect
flow submits it per stage as a Ray job, and a user can run it by hand. Each stage's commands come
from `rlhf_ops.stages` (params YAML + `--overrides` + wired paths) and run as subprocesses, so every
stage starts from a clean process. All params are checked (unknown keys, wrong types) before the
first stage starts. Per stage (`run_stage`):

* skip it when its stamp says its outputs are exactly what this key produced (`rlhf_ops.artifacts`);
* resume from its own checkpoints (`--load_checkpoint`) when the last start had the same key, and
  move checkpoints of another key aside (`ckpt/<stage>.stale-<key>`) instead of resuming them;
* stamp the outputs' hashes when it succeeds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rlhf_ops import artifacts
from rlhf_ops.config import ConfigError, opt, parse_config
from rlhf_ops.stages import ORDER, STAGES, check_overrides, check_stage_names, command_lines
from rlhf_ops.utils.atomic import write_json


@dataclass(frozen=True)
class PipelineConfig:
    """Run the pipeline's stages for a preset."""
    preset: str = opt("tiny", "Params preset: a directory under params/presets/")
    output_dir: str = opt("runs/tiny", "Run directory: every stage's artifacts go under it")
    stages: Optional[str] = opt(None, f"Comma-separated subset of stages to run (default: {', '.join(ORDER)})")
    overrides: Optional[str] = opt(None, 'JSON {stage: {option: value}} applied over the preset\'s params, e.g. \'{"sft": {"max_epochs": 1}}\'')
    force: bool = opt(False, "Run the stages even when their stamps say the outputs are up to date")

    def __post_init__(self) -> None:
        check_stage_names(self.selected())
        self.parsed_overrides()

    def selected(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",")] if self.stages else list(ORDER)

    def parsed_overrides(self) -> dict[str, dict]:
        if not self.overrides:
            return {}
        try:
            value = json.loads(self.overrides)
        except ValueError as e:
            raise ConfigError(f"--overrides: not valid JSON ({e})") from None
        return check_overrides(value)


def plan(stage: str, preset: str, run: Path, overrides: dict | None = None) -> tuple[list[list[str]], str]:
    """(command lines, cache key) of one stage."""
    argvs = command_lines(stage, preset, run, overrides=overrides)
    return argvs, artifacts.stage_key(stage, argvs, STAGES[stage].inputs(run), artifacts.code_version())


def run_stage(stage: str, argvs: list[list[str]], key: str, run: Path, force: bool = False) -> str:
    """Run one planned stage; returns "cached" (stamp valid, nothing run) or "ran"."""
    outputs = STAGES[stage].outputs(run)
    if not force and artifacts.stamp_is_valid(run, stage, key):
        print(f"==> stage {stage}: up to date (outputs match stamp {key[:12]})", flush=True)
        return "cached"
    _set_aside_stale_checkpoints(stage, key, run)
    write_json(artifacts.stamp_path(run, f"{stage}.started"), {"stage": stage, "key": key, "time": time.time()})
    print(f"==> stage {stage} (key {key[:12]})", flush=True)
    t0 = time.perf_counter()
    for argv in argvs:
        print("    $ " + " ".join(_quote(a) for a in argv[1:]), flush=True)
        rc = subprocess.call(argv)
        if rc != 0:
            raise SystemExit(f"stage {stage} failed (exit code {rc}): {' '.join(argv[1:3])}")
    artifacts.write_stamp(run, stage, key, outputs, extra={"work_s": round(time.perf_counter() - t0, 3)})
    return "ran"


def _set_aside_stale_checkpoints(stage: str, key: str, run: Path) -> None:
    ckpt = run / "ckpt" / stage
    started = artifacts.read_stamp(run, f"{stage}.started")
    if ckpt.exists() and (started is None or started.get("key") != key):
        old = (started or {}).get("key", "unknown")[:12]
        aside = ckpt.with_name(f"{stage}.stale-{old}")
        n = 0
        while aside.exists():
            n += 1
            aside = ckpt.with_name(f"{stage}.stale-{old}-{n}")
        os.replace(ckpt, aside)
        print(f"    checkpoints in {ckpt} were made with other params or inputs: moved to {aside}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    cfg = parse_config(PipelineConfig, argv, prog="python -m rlhf_ops.cli.pipeline")
    run = Path(cfg.output_dir).resolve()
    try:
        overrides = cfg.parsed_overrides()
        # check every selected stage's params first; keys are computed per stage, after its inputs exist
        for s in cfg.selected():
            command_lines(s, cfg.preset, run, overrides=overrides.get(s))
    except ConfigError as e:
        raise SystemExit(f"python -m rlhf_ops.cli.pipeline: error: {e}") from None
    timings: dict[str, float] = {}
    for stage in cfg.selected():
        t0 = time.perf_counter()
        argvs, key = plan(stage, cfg.preset, run, overrides.get(stage))
        run_stage(stage, argvs, key, run, force=cfg.force)
        timings[stage] = time.perf_counter() - t0
        print(f"<== stage {stage} done in {timings[stage]:.1f} s", flush=True)
    print("\nartifacts:")
    for stage in cfg.selected():
        for p in STAGES[stage].outputs(run):
            print(f"  {stage:6s} {p}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f" (total {sum(timings.values()):.1f} s)")
    return timings


def _quote(a: str) -> str:
    import shlex
    return shlex.quote(a)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
