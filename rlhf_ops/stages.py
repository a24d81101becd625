"""One stage, one name: its params file, its entry point and where its artifacts go.

The pipeline runner, the Prefect tasks and `dvc.yaml` all read this table, so a stage's command
line is built in exactly one place. Params YAML files hold hyperparameters only; paths are
wired here from the run directory, so a preset never hard-codes where a run lives.

    params/presets/<preset>/<stage>.yaml   ->   python -m <module> --config <yaml> <path flags>
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_ops.config import ConfigError, check_keys

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Command:
    module: str
    config: str  # "module:Class" of the command's typed config, for up-front key/type checks
    yaml_section: str | None  # which top-level key of the stage's YAML this command reads (None: the whole file)
    path_flags: Callable[[Path], dict[str, str]]


@dataclass(frozen=True)
class Stage:
    name: str
    commands: tuple[Command, ...]
    outputs: Callable[[Path], list[Path]]
    inputs: Callable[[Path], list[Path]] = lambda r: []  # artifacts the stage reads (cache key, DVC deps)


BUILTIN_REWARD = str(REPO_ROOT / "rlhf_ops" / "rewards" / "arith.py")  # the built-in task's verifier


def _base_model(run: Path) -> str:
    return str(run / "base_model")


STAGES: dict[str, Stage] = {
    "prep": Stage("prep", (
        Command("rlhf_ops.cli.prepare", "rlhf_ops.cli.prepare:PrepareConfig", "data", lambda r: {"output_dir": str(r / "data")}),
        Command("rlhf_ops.cli.make_tiny", "rlhf_ops.cli.make_tiny:MakeTinyConfig", "tiny_model", lambda r: {"output_dir": _base_model(r), "overwrite": "true"}),
    ), lambda r: [r / "data", r / "base_model"]),
    "sft": Stage("sft", (
        Command("rlhf_ops.cli.train_sft", "rlhf_ops.trainers.sft:SFTConfig", None, lambda r: {
            "pretrain": _base_model(r), "dataset": str(r / "data" / "sft"), "eval_dataset": str(r / "data" / "sft"),
            "save_path": str(r / "sft"), "ckpt_path": str(r / "ckpt" / "sft"), "load_checkpoint": "true"}),
    ), lambda r: [r / "sft"], lambda r: [r / "base_model", r / "data" / "sft"]),
    "rm": Stage("rm", (
        Command("rlhf_ops.cli.train_rm", "rlhf_ops.trainers.rm:RMConfig", None, lambda r: {
            "pretrain": str(r / "sft"), "dataset": str(r / "data" / "preference"),
            "eval_dataset": str(r / "data" / "preference"), "save_path": str(r / "rm"), "ckpt_path": str(r / "ckpt" / "rm"),
            "load_checkpoint": "true"}),
    ), lambda r: [r / "rm"], lambda r: [r / "sft", r / "data" / "preference"]),
    "prm": Stage("prm", (
        Command("rlhf_ops.cli.train_prm", "rlhf_ops.trainers.prm:PRMConfig", None, lambda r: {
            "pretrain": str(r / "sft"), "dataset": str(r / "data" / "prm"), "eval_dataset": str(r / "data" / "prm"),
            "save_path": str(r / "prm"), "ckpt_path": str(r / "ckpt" / "prm"), "load_checkpoint": "true"}),
    ), lambda r: [r / "prm"], lambda r: [r / "sft", r / "data" / "prm"]),
    "rl": Stage("rl", (
        Command("rlhf_ops.cli.train_ppo", "rlhf_ops.rl.config:RLConfig", None, lambda r: {
            "pretrain": str(r / "sft"), "prompt_data": str(r / "data" / "prompts"),
            "eval_dataset": str(r / "data" / "prompts"), "reward_func": BUILTIN_REWARD,
            "save_path": str(r / "rl"), "ckpt_path": str(r / "ckpt" / "rl"), "load_checkpoint": "true"}),
    ), lambda r: [r / "rl"], lambda r: [r / "sft", r / "data" / "prompts"]),
    "eval": Stage("eval", (
        Command("rlhf_ops.cli.evaluate", "rlhf_ops.eval.config:EvalConfig", None, lambda r: {
            "run_dir": str(r), "output_dir": str(r / "eval")}),
    ), lambda r: [r / "eval"], lambda r: [r / "base_model", r / "sft", r / "rl", r / "rm", r / "data" / "prompts"]),
}
ORDER = ["prep", "sft", "rm", "rl", "eval"]  # the default plan; prm runs when a preset's pipeline.yaml lists it


def check_stage_names(names: list[str], what: str = "stages") -> None:
    for s in names:
        if s not in STAGES:
            raise ConfigError(f"{what}: unknown stage {s!r}; stages are {', '.join(STAGES)}")


def check_overrides(overrides: object) -> dict[str, dict]:
    """{stage: {option: value}} with known stage names; the options are checked by command_lines."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a mapping {{stage: {{option: value}}}}, got {type(overrides).__name__}")
    check_stage_names(list(overrides), "overrides")
    for s, ov in overrides.items():
        if not isinstance(ov, dict):
            raise ConfigError(f"overrides[{s!r}] must be a mapping of option -> value, got {type(ov).__name__}")
    return overrides


def params_dir(preset: str, root: Path | None = None) -> Path:
    base = (root or REPO_ROOT) / "params" / "presets"
    d = base / preset
    if not d.is_dir():
        known = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise ConfigError(f"unknown preset {preset!r}: no directory {d} (known presets: {', '.join(known) or 'none'})")
    return d


def stage_yaml(preset: str, stage: str, root: Path | None = None) -> Path:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(ORDER)})")
    path = params_dir(preset, root) / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {preset!r} has no params file for stage {stage!r}: {path}")
    return path


def command_lines(stage: str, preset: str, run_dir: Path, root: Path | None = None,
                  overrides: dict | None = None) -> list[list[str]]:
    """The argv of every command of a stage (YAML hyperparameters, then `overrides`, + wired paths).

    `overrides` has the YAML file's shape: option -> value, or section -> {option: value} for a
    stage whose commands read sections (prep). Unknown keys and wrong types are errors that name
    the file (or "override") and the key."""
    import yaml

    path = stage_yaml(preset, stage, root)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    for k, v in (overrides or {}).items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    argvs = []
    for cmd in STAGES[stage].commands:
        section = data if cmd.yaml_section is None else data.get(cmd.yaml_section)
        if section is None:
            raise ConfigError(f"{path}: missing section {cmd.yaml_section!r} for {cmd.module}")
        where = f"{path}" + (f" [{cmd.yaml_section}]" if cmd.yaml_section else "") + (" with overrides" if overrides else "")
        mod, cls = cmd.config.split(":")
        check_keys(getattr(importlib.import_module(mod), cls), section, where)
        argv = [sys.executable, "-m", cmd.module]
        argv += _flags(section, where)
        for k, v in cmd.path_flags(run_dir).items():
            argv += [f"--{k}"] if v == "true" else [f"--{k}", v]
        argvs.append(argv)
    return argvs


def _flags(section: dict, where: str) -> list[str]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values")
    out: list[str] = []
    for k, v in section.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, (list, tuple)):
            out += [f"--{k}", *map(str, v)]
        elif v is not None:
            out += [f"--{k}", str(v)]
    return out
