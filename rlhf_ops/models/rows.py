"""The last decoder layer's MLP at the positions the loss reads only.

In a causal LM, the last layer's output at a position feeds nothing but that position's head (the
LM head, or a reward / value head). Earlier positions' keys and values, which later positions attend
to, come from the last layer's *attention* input, not from its MLP. So where a head output is
not used (prompt tokens in SFT, DPO and RL; every token but the last in a reward model), the last
layer's MLP, two thirds or more of that layer's FLOPs in a Llama, is wasted work, forward and backward.

`install(model)` hooks the last layer's MLP once (a forward pre-hook and a forward hook: the
model's modules and state dict are unchanged). Inside `only_rows(rows_BT)` the MLP runs on the
`rows_BT` positions only and writes zeros elsewhere; outside it, and for inputs of another shape,
it runs as before. The kept rows get the same values up to rounding: a GEMM over fewer rows may
round differently (CPU kernels pick their blocking by size), and the MLP's weight gradients sum
fewer rows (the skipped ones contribute exact zeros). `tests/unit/test_rows.py` checks 1e-6 on
outputs, and rounding-level agreement of the loss and every gradient on its SFT batch (bitwise outside
that MLP with MKL on an AMD EPYC, not on an Intel Xeon with AMX, whose GEMMs block by size). On the
tiny SFT benchmark, whose targets are 56% of its tokens, it saves ~2.3 ms of a ~37 ms step; a
reward model reads one position per sample and saves nearly the whole MLP.

Not used: with gradient checkpointing (the recomputation runs outside `only_rows`, and must repeat the
forward exactly), for MLPs that are not plain `*MLP` modules (MoE blocks return router logits
too), or when the decoder has no `layers`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("rlhf_rows", default=None)
_APPLIED: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("rlhf_rows_applied", default=None)
_MARK = "_rlhf_ops_rows"
_LAYER = "_rlhf_ops_rows_layer"


def _last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last decoder layer of a Hugging Face model (under DeepSpeed / PEFT wrappers), if it has `layers`."""
    from rlhf_ops.models.forward import unwrap

    hf = unwrap(model)
    layers = getattr(hf.get_decoder(), "layers", None) if hasattr(hf, "get_decoder") else None
    return layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def last_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The last decoder layer's plain MLP (`*MLP`), or None when the model has none."""
    mlp = getattr(_last_layer(model), "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP") else None


def install(model: torch.nn.Module) -> bool:
    """Hook the last layer's MLP (idempotent); True when `only_rows` now applies to `model`."""
    mlp = last_mlp(model)
    if mlp is None:
        return False
    if not getattr(mlp, _MARK, False):
        # the layer (whose gradient_checkpointing flag the pre-hook reads), kept outside the module tree; a
        # deepcopy of the model copies this reference to the copied layer
        mlp.__dict__[_LAYER] = _last_layer(model)
        mlp.register_forward_pre_hook(_keep_rows)
        mlp.register_forward_hook(_scatter_back)
        setattr(mlp, _MARK, True)
    return True


@contextlib.contextmanager
def only_rows(rows_BT: torch.Tensor | None) -> Iterator[None]:
    """Within this block, hooked MLPs compute only the positions where `rows_BT` ([B, T] bool) is set."""
    token = _ROWS.set(rows_BT)
    try:
        yield
    finally:
        _ROWS.reset(token)


def rows_at(index_N: torch.Tensor, shape_BT: torch.Size) -> torch.Tensor:
    """[B, T] bool, set at the flat positions `index_N` (an index list, repeats allowed)."""
    rows = torch.zeros(shape_BT[0] * shape_BT[1], dtype=torch.bool, device=index_N.device)
    rows[index_N] = True
    return rows.view(shape_BT[0], shape_BT[1])


def _keep_rows(mlp: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the input at the rows `only_rows` names (unless checkpointed or of another shape)."""
    _APPLIED.set(None)
    rows = _ROWS.get()
    if rows is None or not args:
        return None
    x, layer = args[0], mlp.__dict__.get(_LAYER, mlp)
    if x.shape[:-1] != rows.shape or (layer.training and getattr(layer, "gradient_checkpointing", False)):
        return None
    rows = rows.to(x.device)
    _APPLIED.set(rows)
    return (x[rows], *args[1:])


def _scatter_back(_mlp: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the kept rows' output in place, zeros elsewhere."""
    rows = _APPLIED.get()
    if rows is None:
        return None
    _APPLIED.set(None)
    return out.new_zeros(*rows.shape, out.shape[-1]).index_put((rows,), out)
