"""Shared, session-scoped fixtures: everything here is built once per test run, fully offline.

* `tiny_tokenizer`: the deterministic byte-level BPE tokenizer with the chat template
  (`rlhf_ops.models.tiny.build_tokenizer()`), built in memory. Treat it as read-only.
* `tiny_model_dir`: a directory holding the tiny Llama + tokenizer written by
  `rlhf_ops.models.tiny.make_tiny(..., seed=0)` with its DEFAULT sizes (hidden 128, 4 layers,
  4 heads / 2 kv heads, intermediate 512: the model the `tiny` preset and the CLIs use), so any
  stage can load it with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`. Writing it takes
  about a second. Tests that only need *some* model for numerics and want speed should call
  `build_model(tiny_tokenizer, hidden_size=64, num_layers=2, ...)` in memory instead.
* `builtin_data_dir`: the built-in arithmetic data (`rlhf_ops.data.prepare.write_dataset`,
  preset "tiny", seed 42), laid out as in docs/data_layout.md: `<dir>/<name>/{train,eval}.jsonl`
  plus `manifest.json`. Treat it as read-only.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The loader's oneDNN Linear (models.onednn) on every CPU, Intel included, where it is off by default: the
# tests then run the same kernels on any CI machine (tests/unit/test_onednn.py checks the default's rule)
os.environ.setdefault("RLHF_OPS_ONEDNN_LINEAR", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_MODEL_SEED = 0
BUILTIN_DATA_PRESET = "tiny"
BUILTIN_DATA_SEED = 42


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf_ops.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf_ops.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_model") / "model", seed=TINY_MODEL_SEED)


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory) -> Path:
    from rlhf_ops.data.prepare import write_dataset

    out = tmp_path_factory.mktemp("builtin_data") / "data"
    write_dataset(out, preset=BUILTIN_DATA_PRESET, seed=BUILTIN_DATA_SEED)
    return out


def _keep_root_logging():
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """In-process CLI runs configure the root logger; give every test the logging it started with."""
    yield from _keep_root_logging()


@pytest.fixture(autouse=True, scope="module")
def _restore_root_logging_per_module():
    """The same for module-scoped fixtures that run a CLI in-process (autouse fixtures of a scope
    are set up before the other fixtures of that scope, so this snapshot comes first)."""
    yield from _keep_root_logging()


@pytest.fixture
def no_cpu_kernels(monkeypatch):
    """The fused CPU kernels (rlhf_ops.kernels) off for one test: its PyTorch-op paths, e.g. to compare
    them bit for bit with Hugging Face's."""
    from rlhf_ops.kernels import cpu

    monkeypatch.setattr(cpu, "_lib", False)
