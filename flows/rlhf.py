"""The `rlhf` Prefect flow: every stage of a preset as one cached, retryable DAG.

    python -m flows.rlhf --preset tiny --output_dir runs/tiny          # what `make run` does
    python -m flows.serve && prefect deployment run rlhf/full-pipeline  # as a deployment

Stages run in the order of the preset's `pipeline.yaml`, each as a task (`tasks.stage.run_stage`)
that submits the stage's entry point as a Ray job (to RAY_ADDRESS, or to a local head started when
the first stage has to run and stopped afterwards) or, with `executor="local"`, as a subprocess. Tasks pass paths and
hashes only. Every params file and override is checked before the first stage starts. At the end
the flow writes `<run>/lineage.json` (stage -> key, outputs and their hashes, cached or ran),
publishes the eval report as a Prefect markdown artifact when there is one, and pushes to the Hub
when a repo is configured.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from prefect import flow

from flows.settings import PipelinePlan, load_plan


# a local head `main()` starts in the background before the flow (None in deployment runs)
_prestarted: Any = None


class _Cluster:
    """Where Ray jobs go: RAY_ADDRESS, else a local head started on first need and stopped at exit.

    The head starts only when a stage has to run, so a fully cached rerun starts no Ray at all.
    `python -m flows.rlhf` starts it ahead, while Prefect starts (`main`); the flow then takes that one.
    """

    def __init__(self, executor: str, log: Any):
        self.executor, self.log = executor, log
        self._stack = contextlib.ExitStack()
        self._address: Optional[str] = None

    def address(self, needed: bool) -> Optional[str]:
        if self.executor == "local" or (self._address is None and not needed):
            return self._address
        if self._address is None:
            if os.environ.get("RAY_ADDRESS"):
                self.log(f"submitting stages to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
                self._address = os.environ["RAY_ADDRESS"]
            elif _prestarted is not None and _prestarted.address() is not None:
                self._address = _prestarted.address()
                head = _prestarted
                self._stack.push(lambda exc_type, *_: head.close(failed=exc_type is not None))
            else:
                from tasks.ray_jobs import local_head
                self._address = self._stack.enter_context(local_head(log=self.log))
        return self._address

    def __enter__(self) -> "_Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)  # a stage's failure reaches the head's context: it keeps its logs


@flow(name="rlhf", log_prints=True)
def rlhf(preset: str = "tiny", output_dir: str = "runs/tiny", stages: Optional[list[str]] = None,
         overrides: Optional[dict[str, dict]] = None, executor: str = "ray", hub_repo: Optional[str] = None) -> dict:
    """Run the preset's stages (or `stages`) into `output_dir`; returns {stage: state and outputs}."""
    from tasks.stage import outputs_valid, run_stage

    run = str(Path(output_dir).resolve())
    p: PipelinePlan = load_plan(preset, stages, overrides, executor, hub_repo, Path(run))
    summary: dict[str, Any] = {}
    with _Cluster(p.executor, print) as cluster:
        for stage in p.stages:
            ov = p.overrides.get(stage)
            fresh = not outputs_valid(stage, preset, run, ov)
            state = run_stage.with_options(refresh_cache=fresh)(
                stage, preset, run, ov, p.executor, cluster.address(needed=fresh), return_state=True)
            result = state.result()  # raises the stage's error when it failed
            summary[stage] = {"state": state.name, **result}
            print(f"stage {stage}: {state.name}")
    _write_lineage(Path(run), preset, summary)
    _publish_eval(Path(run))
    if p.hub_repo:
        from tasks.hub import push
        summary["hub"] = push(run, p.hub_repo, p.hub_private)
    print(f"artifacts under {run}: " + ", ".join(o for s in summary.values() if "outputs" in s for o in s["outputs"]))
    return summary


def _write_lineage(run: Path, preset: str, summary: dict[str, Any]) -> None:
    from rlhf_ops.utils.atomic import write_json
    write_json(run / "lineage.json", [{"stage": s, "preset": preset, "state": v["state"], "key": v["key"],
                                       "outputs": v["outputs"]} for s, v in summary.items()])


def _publish_eval(run: Path) -> None:
    report = run / "eval" / "report.md"
    if report.is_file():
        from prefect.artifacts import create_markdown_artifact
        create_markdown_artifact(key="rlhf-eval", markdown=report.read_text(), description=f"eval of {run}")
        print(f"eval report: {report}")


def _start_head_if_needed(preset: str, stages: Optional[list[str]], overrides: Optional[dict], run: Path) -> Any:
    """A local Ray head started in the background when some stage's outputs do not match its stamp (the
    check hashes the stages' inputs, so it runs in that thread too): ~3 s of the head's start overlap the
    temporary Prefect server's."""
    from tasks.ray_jobs import BackgroundHead
    from tasks.stage import outputs_valid

    def needed() -> bool:
        p = load_plan(preset, stages, overrides, "ray", None, run)
        return any(not outputs_valid(s, preset, str(run), p.overrides.get(s)) for s in p.stages)

    return BackgroundHead(needed)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m flows.rlhf", description="Run the rlhf flow once, in this process.")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--output_dir", default="runs/tiny")
    ap.add_argument("--stages", default=None, help="comma-separated subset (default: the preset's pipeline.yaml)")
    ap.add_argument("--overrides", default=None, help='JSON {stage: {option: value}}')
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--hub_repo", default=None)
    a = ap.parse_args(argv)
    try:
        overrides = json.loads(a.overrides) if a.overrides else None
    except ValueError as e:
        print(f"python -m flows.rlhf: error: --overrides is not valid JSON ({e})", file=sys.stderr)
        return 2
    stages = a.stages.split(",") if a.stages else None
    from rlhf_ops.config import ConfigError
    try:  # fail fast, before Prefect starts; the flow checks again (deployment runs do not pass here)
        load_plan(a.preset, stages, overrides, a.executor, a.hub_repo, Path(a.output_dir).resolve())
    except ConfigError as e:
        print(f"python -m flows.rlhf: error: {e}", file=sys.stderr)
        return 2
    global _prestarted
    head = None
    if a.executor == "ray" and not os.environ.get("RAY_ADDRESS"):
        head = _start_head_if_needed(a.preset, stages, overrides, Path(a.output_dir).resolve())
    _prestarted = head
    state = None
    try:
        state = rlhf(a.preset, a.output_dir, stages, overrides, a.executor, a.hub_repo, return_state=True)
    finally:
        _prestarted = None
        if head is not None:
            head.close(failed=state is None or state.is_failed())
    if state.is_failed():
        print(f"python -m flows.rlhf: the flow failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
