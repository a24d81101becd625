"""`python -m rlhf_ops.cli.make_tiny --output_dir DIR`: write the tiny offline Llama + tokenizer.

The pipeline's `tiny` preset and the tests start from this checkpoint instead of a hub model,
so that everything runs with no network on a CPU in seconds. Same options and seed give
byte-identical files. See `rlhf_ops.models.tiny` for the tokenizer and chat format.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence

from rlhf_ops.config import check, opt, parse_config


@dataclass(frozen=True)
class MakeTinyConfig:
    """Write a tiny randomly initialised Llama model and its tokenizer in Hugging Face format."""

    output_dir: str = opt(None, "Directory to write the model and tokenizer to", required=True)
    hidden_size: int = opt(128, "Width of the residual stream")
    num_layers: int = opt(4, "Number of transformer layers")
    num_heads: int = opt(4, "Number of attention (query) heads; must divide --hidden_size")
    num_kv_heads: int = opt(2, "Number of key/value heads (grouped-query attention); must divide --num_heads")
    intermediate_size: int = opt(512, "Width of the MLP's hidden layer")
    max_position_embeddings: int = opt(1024, "Longest sequence the model supports (RoPE positions)")
    seed: int = opt(0, "Seed of the random weight initialisation (same seed, same weights)")
    overwrite: bool = opt(False, "Replace --output_dir if it exists and is not empty")

    def __post_init__(self) -> None:
        check(bool(self.output_dir), "output_dir", "must be a non-empty path")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.hidden_size % self.num_heads == 0, "hidden_size",
              f"must be divisible by --num_heads ({self.hidden_size} % {self.num_heads} != 0)")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
              f"must divide --num_heads ({self.num_heads} % {self.num_kv_heads} != 0)")
        check((self.hidden_size // self.num_heads) % 2 == 0, "hidden_size",
              f"--hidden_size / --num_heads (the head size, {self.hidden_size // self.num_heads}) must be even for RoPE")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def main(argv: Sequence[str] | None = None) -> str:
    cfg = parse_config(MakeTinyConfig, argv, prog="python -m rlhf_ops.cli.make_tiny")
    from rlhf_ops.models.tiny import make_tiny  # heavy import (torch, transformers) after parsing

    try:
        path = make_tiny(cfg.output_dir, seed=cfg.seed, overwrite=cfg.overwrite, hidden_size=cfg.hidden_size,
                         num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=cfg.max_position_embeddings)
    except FileExistsError as e:
        raise SystemExit(f"python -m rlhf_ops.cli.make_tiny: error: --output_dir {e}") from None
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"wrote {path} ({n_params:,} parameters)")
    return str(path)

if __name__ == "__main__":
    main()
