"""The evaluation stage: score a pipeline run's models on held-out prompts (`python -m rlhf_ops.cli.evaluate`).

* `config`:  `EvalConfig` (the CLI's flags) and where a run directory keeps each model;
* `policy`:  greedy accuracy/reward of a policy, KL of one policy to another, reward-model win rate;
* `report`:  metrics.json, report.md, curves.png and the DVC plot CSVs, written atomically;
* `run`:     `evaluate(cfg)`, which ties them together.
"""
from rlhf_ops.eval.config import EvalConfig

__all__ = ["EvalConfig"]
