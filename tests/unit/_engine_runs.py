"""What tests/unit/test_local_engine.py and test_master_weights.py both do with a training engine: a few
micro-batches of next-token loss on a tiny Llama, and a run checkpointed halfway and resumed."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def micro_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (2, 9), generator=g) for _ in range(n)]


def next_token_loss(module: torch.nn.Module, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    logits = module(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) * scale


def train(eng: Any, batches: list[torch.Tensor], scales: list[float] | None = None) -> tuple[list[float], list[float]]:
    """One `backward_step` per micro-batch (loss times `scales[i]`); the losses and the lr after each."""
    losses, lrs = [], []
    for i, ids in enumerate(batches):
        loss = next_token_loss(eng.module, ids, scales[i] if scales else 1.0)
        eng.backward_step(loss)
        losses.append(loss.item())
        lrs.append(eng.lr)
    return losses, lrs


def resume_halfway(make: Callable[[], Any], tmp_path: Path) -> tuple[Any, Any, tuple, tuple]:
    """8 micro-batches straight through, and 4 + a checkpoint + a fresh engine resumed from it + the other 4:
    (straight engine, resumed engine, the resumed run's last 4 (losses, lrs), the straight run's last 4)."""
    batches = micro_batches(8)
    straight = make()
    run_straight = train(straight, batches)
    first = make()
    train(first, batches[:4])
    first.module.save_checkpoint(str(tmp_path / "global_step2"), tag="model", client_state={"step": 2})
    resumed = make()
    path, client = resumed.module.load_checkpoint(str(tmp_path / "global_step2"), tag="model")
    assert client == {"step": 2} and path.endswith("model")
    assert resumed.module.global_steps == 2 and resumed.module.micro_steps == 4
    rest = train(resumed, batches[4:])
    return straight, resumed, rest, (run_straight[0][4:], run_straight[1][4:])
