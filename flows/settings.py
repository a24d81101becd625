"""The flow's plan for a preset: `params/presets/<preset>/pipeline.yaml`, checked before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ops.config import ConfigError
from rlhf_ops.stages import check_overrides, check_stage_names, command_lines, params_dir

PLAN_KEYS = {"stages": list, "schedule": (str, type(None)), "hub_repo": (str, type(None)), "hub_private": bool}
EXECUTORS = ("ray", "local")


@dataclass(frozen=True)
class PipelinePlan:
    preset: str
    stages: list[str]
    overrides: dict[str, dict] = field(default_factory=dict)
    executor: str = "ray"
    schedule: Optional[str] = None
    hub_repo: Optional[str] = None
    hub_private: bool = True


def read_plan_file(preset: str) -> dict[str, Any]:
    import yaml

    path = params_dir(preset) / "pipeline.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {preset!r} has no {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    for k, v in data.items():
        if k not in PLAN_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} (known: {', '.join(PLAN_KEYS)})")
        if not isinstance(v, PLAN_KEYS[k]):
            want = " or ".join(t.__name__ for t in (PLAN_KEYS[k] if isinstance(PLAN_KEYS[k], tuple) else (PLAN_KEYS[k],)))
            raise ConfigError(f"{path}: key {k!r} must be {want}, got {type(v).__name__} {v!r}")
    return data


def load_plan(preset: str, stages: Optional[list[str]], overrides: Optional[dict], executor: str,
              hub_repo: Optional[str], run: Path) -> PipelinePlan:
    """Check the preset, the stage names, the overrides and every stage's params; ConfigError names what is wrong."""
    data = read_plan_file(preset)
    stages = list(stages or data.get("stages") or [])
    check_stage_names(stages)
    overrides = check_overrides(overrides)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    for s in stages:
        command_lines(s, preset, run, overrides=overrides.get(s))
    return PipelinePlan(preset, stages, overrides, executor, data.get("schedule"),
                        hub_repo or data.get("hub_repo"), data.get("hub_private", True))
