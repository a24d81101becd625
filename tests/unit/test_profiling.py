"""--profile_steps: which steps torch.profiler records, what it writes, and the option's checks."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.utils.profiling import StepProfiler, parse_steps


@pytest.mark.parametrize("spec,expected", [("3-4", (3, 4)), ("5", (5, 5)), (7, (7, 7)), (" 1-1 ", (1, 1))])
def test_parse_steps(spec, expected):
    assert parse_steps(spec) == expected


@pytest.mark.parametrize("spec", ["0", "0-2", "4-3", "a-b", "1-2-3", "", "-1"])
def test_bad_specs_name_the_option_and_the_format(spec):
    with pytest.raises(ConfigError, match=r"--profile_steps: expected 'A-B' or 'A' with 1 <= A <= B"):
        parse_steps(spec)


def _loop(prof: StepProfiler, steps: int, x: torch.Tensor, start: int = 1) -> None:
    """A loop shaped like the trainers': begin(step) before a step's work, end(step) after it."""
    for step in range(start, steps + 1):
        prof.begin(step)
        for _ in range(3):
            x @ x
        if step in (1, 4):  # outside the recorded range: must not appear
            torch.cumsum(x, 0)
        prof.end(step)
    prof.close()


def test_records_exactly_the_steps_asked_for(tmp_path):
    _loop(StepProfiler("2-3", tmp_path, rank=0, total_steps=4), 4, torch.randn(16, 16))
    summary = json.loads((tmp_path / "ops.json").read_text())
    assert summary["steps"] == 2 and summary["first_step"] == 2
    ops = {r["op"]: r for r in summary["ops"]}
    assert ops["aten::mm"]["calls"] == 6  # 3 matmuls in each of steps 2 and 3
    assert "aten::cumsum" not in ops
    assert summary["host_syncs_per_step"] == 0  # no CUDA here
    assert "| `aten::mm` | 3 |" in (tmp_path / "ops.md").read_text()
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_a_run_resumed_inside_the_range_records_the_rest(tmp_path):
    _loop(StepProfiler("2-4", tmp_path), 5, torch.randn(8, 8), start=3)
    summary = json.loads((tmp_path / "ops.json").read_text())
    assert (summary["steps"], summary["first_step"]) == (2, 3)
    assert "2 optimizer step(s) from step 3" in (tmp_path / "ops.md").read_text()


def test_other_ranks_write_their_trace_only(tmp_path):
    _loop(StepProfiler("1", tmp_path, rank=1), 2, torch.randn(8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace_rank1.json"]


def test_a_loop_that_ends_inside_the_range_still_writes(tmp_path):
    _loop(StepProfiler("2-9", tmp_path), 3, torch.randn(8, 8))
    assert json.loads((tmp_path / "ops.json").read_text())["steps"] == 2


def test_no_spec_records_nothing(tmp_path):
    _loop(StepProfiler(None, tmp_path), 2, torch.randn(8, 8))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_range_past_the_run_warns(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        StepProfiler("5-6", tmp_path, total_steps=4)
    assert "this run has 4 optimizer steps; nothing will be recorded" in caplog.text


def test_the_option_is_checked_when_the_config_is_built(capsys):
    from rlhf_ops.config import parse_config
    from rlhf_ops.trainers.sft import SFTConfig

    with pytest.raises(SystemExit):
        parse_config(SFTConfig, ["--pretrain", "org/name", "--dataset", "d", "--output_key", "o", "--profile_steps", "3-1"])
    assert "--profile_steps: expected 'A-B' or 'A' with 1 <= A <= B (optimizer steps, 1-based), got '3-1'" in capsys.readouterr().err
    cfg = parse_config(SFTConfig, ["--pretrain", "org/name", "--dataset", "d", "--output_key", "o", "--profile_steps", "2-3"])
    assert cfg.profile_steps == "2-3"
