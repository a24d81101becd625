"""Metrics: a JSONL file per run (what later stages and plots read), TensorBoard, W&B.

Only rank 0 writes. Each JSONL line is `{"step": N, "split": "train"|"eval", ...metrics}`.
On resume the file is cut back to the resumed step, so a resumed run's file reads as if the
run had never stopped. W&B runs offline unless `--use_wandb` is given an API key.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, path: str | Path, *, enabled: bool = True, tensorboard_dir: str | None = None,
                 use_wandb: str | None = None, wandb_project: str = "rlhf_ops", wandb_group: str | None = None,
                 wandb_run_name: str | None = None, config: dict | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(tensorboard_dir)
        if use_wandb:
            self._wandb = _start_wandb(use_wandb, wandb_project, wandb_group, wandb_run_name, config)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (they belong to work a resume will redo)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        from rlhf_ops.utils.atomic import write_text
        write_text(self.path, "".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _num(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _num(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def _start_wandb(key: str, project: str, group: str | None, name: str | None, config: dict | None) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--use_wandb needs the wandb package: pip install -e '.[wandb]'") from e
    if key.lower() not in ("true", "1", "yes"):
        wandb.login(key=key)
        mode = "online"
    else:
        mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=project, group=group, name=name, config=config, mode=mode)


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def run_metrics(cfg: Any, rank: int) -> MetricsLogger:
    """The metrics logger of a training run from its TrainOptions: `<ckpt_path>/metrics.jsonl` + trackers."""
    return MetricsLogger(os.path.join(cfg.ckpt_path, "metrics.jsonl"), enabled=rank == 0,
                         tensorboard_dir=cfg.use_tensorboard, use_wandb=cfg.use_wandb,
                         wandb_project=cfg.wandb_project, wandb_group=cfg.wandb_group,
                         wandb_run_name=cfg.wandb_run_name, config=vars(cfg))
