"""`EvalConfig`: what to evaluate in a run directory, on which prompts, and where the report goes.

A run directory keeps each model under a fixed name (`MODEL_DIRS`); the prompt options carry the
names of the RL stage's (`RLConfig`) so that `rlhf_ops.rl.setup.build_prompts` reads them as is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf_ops.config import check, opt
from rlhf_ops.options import check_model_path
from rlhf_ops.stages import BUILTIN_REWARD

MODEL_DIRS = {"base": "base_model", "sft": "sft", "rl": "rl"}  # name -> directory in the run dir
RM_DIR = "rm"
OUTPUT_MARKER = "metrics.json"  # an existing --output_dir is replaced only if it holds an earlier evaluation
OUTPUT_NAMES = {"metrics.json", "report.md", "curves.png", "samples.jsonl", "plots", ".gitignore"}  # + DVC's .gitignore


def is_earlier_output(out: Path) -> bool:
    """An earlier evaluation, whole or in part (`dvc repro` deletes its outs file by file, leaving `plots/`)."""
    if (out / OUTPUT_MARKER).is_file():
        return True
    names = {p.name for p in out.iterdir()}
    plots = out / "plots"
    return names <= OUTPUT_NAMES and (not plots.is_dir() or all(p.suffix == ".csv" for p in plots.iterdir()))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a run's base/SFT/RL models on held-out prompts: accuracy, reward, RL-vs-SFT win rate and KL."""
    run_dir: str = opt(None, "Pipeline run directory (holds base_model/, sft/, rl/, data/, optionally rm/)", required=True)
    output_dir: Optional[str] = opt(None, "Where to write metrics.json, report.md, curves.png, plots/ (default: <run_dir>/eval); replaced as a whole")
    models: str = opt("base,sft,rl", "Comma-separated models to evaluate, from: base, sft, rl")
    reward_pretrain: Optional[str] = opt(None, "Reward model judging RL vs SFT (default: <run_dir>/rm if it exists)")
    win_rate: bool = opt(True, "Compute the RL-vs-SFT win rate when a reward model is available (--no-win_rate: skip)")
    value_head_prefix: str = opt("score", "Name of the value head in the reward model checkpoint")
    eval_dataset: Optional[str] = opt(None, "Held-out prompts (default: <run_dir>/data/prompts)")
    eval_split: str = opt("eval", "Split of --eval_dataset")
    input_key: str = opt("input", "JSON key of the prompt")
    label_key: Optional[str] = opt("label", "JSON key of the reference answer passed to the reward function")
    input_template: Optional[str] = opt("User: {}\nAssistant: ", "Prompt template when not using the chat template")
    apply_chat_template: bool = opt(False, "Format prompts with tokenizer.apply_chat_template (generation prompt added)")
    tokenizer_chat_template: Optional[str] = opt(None, "A Jinja chat template replacing the tokenizer's")
    reward_func: str = opt(BUILTIN_REWARD, "Python file defining reward_func(queries, prompts, labels)", aliases=["remote_rm_url"])
    max_samples: int = opt(100_000_000, "Evaluate at most the first N prompts")
    prompt_max_len: int = opt(1024, "Prompts longer than this (in tokens) are dropped, and counted in the log")
    generate_max_len: int = opt(48, "Maximum new tokens per response")
    micro_batch_size: int = opt(64, "Sequences per generation / forward")
    bf16: bool = opt(False, "Load the models in bfloat16 (fp32 otherwise)")
    eval_n_samples_per_prompt: int = opt(4, "Sampled responses per prompt for the sampled accuracy (0: greedy only)")
    eval_temperature: float = opt(1.0, "Temperature of the sampled responses (the RL stage samples at 1.0)")
    seed: int = opt(42, "Seed of the sampled responses and the KL samples (greedy responses do not depend on it)")

    def __post_init__(self) -> None:
        check(bool(self.run_dir), "run_dir", "must be a non-empty path")
        check(os.path.isdir(self.run_dir), "run_dir", f"{self.run_dir} is not a directory")
        names = self.model_names
        bad = [n for n in names if n not in MODEL_DIRS]
        check(not bad, "models", f"unknown model(s) {', '.join(map(repr, bad))}; choose from {', '.join(MODEL_DIRS)}")
        check(bool(names), "models", "name at least one model")
        for name, path in self.model_paths().items():
            check(os.path.isdir(path), "models", f"model {name!r}: {path} does not exist (expected a model directory)")
        check_model_path("reward_pretrain", self.reward_pretrain)
        check(os.path.isfile(self.reward_func), "reward_func",
              f"{self.reward_func} is not a file (expected a Python file defining reward_func)")
        check(self.max_samples > 0, "max_samples", f"must be > 0, got {self.max_samples}")
        check(self.generate_max_len > 0 and self.prompt_max_len > 0, "generate_max_len", "lengths must be > 0")
        check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        check(self.eval_n_samples_per_prompt >= 0, "eval_n_samples_per_prompt", f"must be >= 0, got {self.eval_n_samples_per_prompt}")
        check(self.eval_temperature > 0, "eval_temperature", f"must be > 0 (greedy is always reported), got {self.eval_temperature}")
        if self.input_template is not None:
            check("{}" in self.input_template, "input_template", "must contain '{}'")
        out, run = Path(self.out_dir).resolve(), Path(self.run_dir).resolve()
        check(out != run and out not in run.parents, "output_dir",
              f"{self.out_dir} contains the run directory {self.run_dir}; it is replaced as a whole, choose another")
        check(not out.exists() or out.is_dir(), "output_dir", f"{self.out_dir} is an existing file")
        check(not out.is_dir() or not any(out.iterdir()) or is_earlier_output(out), "output_dir",
              f"{self.out_dir} holds files that are not an evaluation's output (no {OUTPUT_MARKER}); "
              "it would be replaced as a whole, choose an empty or new directory")

    @property
    def model_names(self) -> list[str]:
        return [n.strip() for n in self.models.split(",") if n.strip()]

    def model_paths(self) -> dict[str, str]:
        """name -> directory of each model named by --models, in the order given."""
        return {n: os.path.join(self.run_dir, MODEL_DIRS[n]) for n in self.model_names if n in MODEL_DIRS}

    @property
    def out_dir(self) -> str:
        return self.output_dir or os.path.join(self.run_dir, "eval")

    @property
    def prompts(self) -> str:
        return self.eval_dataset or os.path.join(self.run_dir, "data", "prompts")

    def reward_model_path(self) -> tuple[str | None, str]:
        """(reward model directory or None, why), following --reward_pretrain, else <run_dir>/rm."""
        if not self.win_rate:
            return None, "--no-win_rate"
        if self.reward_pretrain:
            return self.reward_pretrain, "--reward_pretrain"
        default = os.path.join(self.run_dir, RM_DIR)
        if os.path.isdir(default):
            return default, "the run's reward model (no --reward_pretrain given)"
        return None, f"no --reward_pretrain and no {default}"
