"""Command-line entry points, one module per stage, flags named as in the reference CLI."""
from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def run_stage(prog: str, fn: Callable[[Any], T], cfg: Any) -> T:
    """Run a stage; bad input (config, data, rewards) or a non-finite loss exits with one clear line."""
    from rlhf_ops.config import ConfigError
    from rlhf_ops.data.sources import DataError
    from rlhf_ops.rl.rewards import RewardError
    from rlhf_ops.utils import malloc

    malloc.tune()  # freed activations stay with the process: fewer page faults per step (utils/malloc.py)
    try:
        return fn(cfg)
    except (ConfigError, DataError, RewardError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        import gc
        gc.freeze()  # interpreter exit otherwise spends ~5 s walking the objects torch/DeepSpeed left behind


def stage_main(prog: str, config_cls: type, train: str, argv: list[str] | None) -> Any:
    """The body of every training CLI: parse flags/YAML into `config_cls`, then run `train`
    ("module:function", imported only after parsing so that `--help` and bad flags stay fast)."""
    import importlib

    from rlhf_ops.config import parse_config
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(config_cls, argv, prog=prog)
    setup_logging()
    module, fn = train.split(":")
    return run_stage(prog, getattr(importlib.import_module(module), fn), cfg)
