"""One Prefect task per pipeline stage: a thin shell around `python -m rlhf_ops.cli.pipeline --stages X`.

The task passes paths and small dicts, never models. It runs the stage's entry point as a Ray job
(`executor="ray"`, the default) or as a local subprocess (`executor="local"`), so Prefect, DVC and a
user at the shell all run the same command.

Caching: the key is the stage's content key (`rlhf_ops.artifacts.stage_key`: resolved params, input
artifact hashes, code version). Before calling the task the flow checks the stage's stamp; when the
outputs on disk are not exactly what that key produced (deleted by `dvc repro -f`, altered, never
built), it refreshes the cache, so a cache hit never stands for a missing or changed file.
Retries: twice with exponential backoff, except for bad input (exit code 2), which no retry fixes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.tasks import exponential_backoff

from rlhf_ops import artifacts
from rlhf_ops.cli.pipeline import plan

BAD_INPUT = 2  # exit code of rlhf_ops CLIs for bad input


class StageFailed(RuntimeError):
    def __init__(self, message: str, bad_input: bool = False):
        super().__init__(message)
        self.bad_input = bad_input


def stage_argv(stage: str, preset: str, run_dir: str, overrides: dict | None) -> list[str]:
    argv = [sys.executable, "-m", "rlhf_ops.cli.pipeline", "--preset", preset, "--output_dir", run_dir, "--stages", stage]
    return argv + (["--overrides", json.dumps({stage: overrides})] if overrides else [])


def cache_key(context: Any, parameters: dict[str, Any]) -> str:
    p = parameters
    _, key = plan(p["stage"], p["preset"], Path(p["run_dir"]), p.get("overrides"))
    return f"rlhf-{p['stage']}-{key}"


def outputs_valid(stage: str, preset: str, run_dir: str, overrides: dict | None) -> bool:
    _, key = plan(stage, preset, Path(run_dir), overrides)
    return artifacts.stamp_is_valid(Path(run_dir), stage, key)


def _no_retry_on_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except StageFailed as e:
        return not e.bad_input
    except Exception:  # noqa: BLE001 - anything else (a lost Ray node, OOM) may pass on a retry
        return True
    return True


@task(name="stage", cache_key_fn=cache_key, persist_result=True, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_no_retry_on_bad_input,
      task_run_name="{stage}")
def run_stage(stage: str, preset: str, run_dir: str, overrides: dict | None = None, executor: str = "ray",
              address: str | None = None) -> dict[str, Any]:
    """Run one stage (Ray job or subprocess); returns {"stage", "key", "outputs": {path: sha256}}.

    The flow passes no `address` when the stage's outputs already match its stamp (no Ray head is
    started for it); should Prefect's cache miss anyway, the entry point runs as a subprocess and
    only confirms the stamp."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    argv = stage_argv(stage, preset, run_dir, overrides)
    if executor == "ray" and address is not None:
        from tasks.ray_jobs import JobFailed, run_job
        try:
            run_job(address, argv, f"rlhf-{stage}", log=logger.info)
        except JobFailed as e:
            raise StageFailed(str(e), bad_input=f"(exit code {BAD_INPUT})" in str(e)) from None
    else:
        _run_local(argv, logger.info)
    stamp = artifacts.read_stamp(Path(run_dir), stage)
    if not stamp:
        raise StageFailed(f"stage {stage} finished without a stamp in {artifacts.stamp_path(Path(run_dir), stage)}")
    return {"stage": stage, "key": stamp["key"], "outputs": stamp["outputs"]}


def _run_local(argv: list[str], log: Callable[[str], None]) -> None:
    from tasks.ray_jobs import LogLines

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    split = LogLines()
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in split(raw):
            log(line)
            tail = (tail + [line])[-40:]
    rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"{' '.join(argv[1:])} exited with code {rc}\n--- last 40 log lines ---\n" + "\n".join(tail),
                          bad_input=rc == BAD_INPUT or f"(exit code {BAD_INPUT})" in "\n".join(tail))

