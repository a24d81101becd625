"""Fixtures shared by the integration tests (files may override them with their own)."""
from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import TINY_SIZES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("sft_tiny") / "model", seed=0, **TINY_SIZES)


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir) -> Path:
    return builtin_data_dir
