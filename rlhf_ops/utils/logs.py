"""Process-wide logging set-up for the CLIs: INFO on rank 0, warnings only elsewhere."""
from __future__ import annotations

import logging
import os
import warnings


def setup_logging(verbose: bool = True) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if verbose and rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
