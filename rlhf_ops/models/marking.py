"""Fast paths for some modules of a model, behind one wrapper of their class's forward (`models.mlp`, `models.norm`).

Each matching module of the model is *marked* (a flag in the instance's `__dict__`, so it survives
`deepcopy` and leaves the state dict alone) and its class's forward is wrapped once, process-wide. The
wrapper takes the fast path for marked instances only: other models of the same class (a reference
model a test builds without the loader) keep Hugging Face's forward, and unmarking restores it.
A module "matches" by its forward's bytecode (`same_code`), so a model class that copies Llama's code
(Mistral, Qwen2/3, ...) qualifies and one that changes it does not.
"""
from __future__ import annotations

from typing import Callable

import torch


def same_code(fn: Callable, reference: Callable) -> bool:
    """Whether two functions (under any `__wrapped__` layer) run the same bytecode with the same names."""
    keys = []
    for f in (fn, reference):
        code = getattr(getattr(f, "__wrapped__", f), "__code__", None)
        keys.append(None if code is None else (code.co_code, code.co_names))
    return keys[0] is not None and keys[0] == keys[1]


def is_marked(module: torch.nn.Module, flag: str) -> bool:
    return bool(module.__dict__.get(flag))


def mark(model: torch.nn.Module, flag: str, matches: Callable[[torch.nn.Module], bool],
         wrap: Callable[[Callable], Callable]) -> int:
    """Mark the modules of `model` that `matches`; wrap each one's class forward with `wrap(original)`
    unless it already is. Returns how many modules were marked."""
    n = 0
    for module in model.modules():
        if matches(module):
            cls = type(module)
            if not getattr(cls.forward, flag, False):
                forward = wrap(cls.forward)
                forward.__wrapped__ = cls.forward
                setattr(forward, flag, True)
                cls.forward = forward
            module.__dict__[flag] = True
            n += 1
    return n


def unmark(model: torch.nn.Module, flag: str) -> None:
    """Unmark `model`'s modules: they run their class's original forward again."""
    for module in model.modules():
        module.__dict__.pop(flag, None)
