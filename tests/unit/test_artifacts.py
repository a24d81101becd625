"""Content hashes and stage stamps (rlhf_ops.artifacts): what makes a cache hit trustworthy."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ops import artifacts


def _tree(root: Path) -> Path:
    (root / "m" / "sub").mkdir(parents=True)
    (root / "m" / "config.json").write_text("{}")
    (root / "m" / "sub" / "w.bin").write_bytes(b"\x00\x01")
    return root / "m"


def test_tree_hash_follows_content_and_names_but_not_write_temporaries(tmp_path):
    m = _tree(tmp_path)
    h = artifacts.tree_sha256(m)
    (m / ".config.json.abc.tmp").write_text("half-written")
    (m / "__pycache__").mkdir()
    assert artifacts.tree_sha256(m) == h
    (m / "sub" / "w.bin").write_bytes(b"\x00\x02")
    assert artifacts.tree_sha256(m) != h
    (m / "sub" / "w.bin").write_bytes(b"\x00\x01")
    (m / "sub" / "w.bin").rename(m / "sub" / "v.bin")
    assert artifacts.tree_sha256(m) != h
    assert artifacts.tree_sha256(tmp_path / "absent") is None


def test_stamp_is_valid_only_for_its_key_and_unchanged_outputs(tmp_path):
    m = _tree(tmp_path)
    stamp = artifacts.write_stamp(tmp_path, "sft", "k1", [m], extra={"work_s": 1.5})
    assert stamp["work_s"] == 1.5 and stamp["hash_s"] >= 0.0
    assert artifacts.read_stamp(tmp_path, "sft") == stamp
    assert artifacts.stamp_is_valid(tmp_path, "sft", "k1")
    assert not artifacts.stamp_is_valid(tmp_path, "sft", "k2")  # other params, inputs or code
    (m / "config.json").write_text('{"changed": true}')
    assert not artifacts.stamp_is_valid(tmp_path, "sft", "k1")  # altered output
    artifacts.write_stamp(tmp_path, "sft", "k1", [m])
    (m / "config.json").unlink()
    (m / "sub" / "w.bin").unlink()
    (m / "sub").rmdir()
    m.rmdir()
    assert not artifacts.stamp_is_valid(tmp_path, "sft", "k1")  # deleted output (dvc repro -f)
    with pytest.raises(FileNotFoundError, match="did not write"):
        artifacts.write_stamp(tmp_path, "sft", "k1", [m])


def test_stage_key_changes_with_argv_inputs_and_code_but_not_the_interpreter(tmp_path):
    inp = _tree(tmp_path)
    key = artifacts.stage_key("sft", [["/usr/bin/python", "-m", "x", "--lr", "1"]], [inp], "code1")
    assert key == artifacts.stage_key("sft", [["/other/python", "-m", "x", "--lr", "1"]], [inp], "code1")
    assert key != artifacts.stage_key("sft", [["/usr/bin/python", "-m", "x", "--lr", "2"]], [inp], "code1")
    assert key != artifacts.stage_key("sft", [["/usr/bin/python", "-m", "x", "--lr", "1"]], [inp], "code2")
    (inp / "config.json").write_text("[]")
    assert key != artifacts.stage_key("sft", [["/usr/bin/python", "-m", "x", "--lr", "1"]], [inp], "code1")
    assert len(artifacts.code_version()) == 64
