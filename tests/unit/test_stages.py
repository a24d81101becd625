"""The stage table: params YAML + wired paths -> command lines, and clear errors on bad params."""
import sys
from pathlib import Path

import pytest

from rlhf_ops.config import ConfigError
from rlhf_ops.stages import ORDER, command_lines


def _preset(root: Path, **files: str) -> Path:
    d = root / "params" / "presets" / "p"
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    return root


def test_shipped_tiny_preset_builds_every_stage(tmp_path):
    for stage in ORDER:
        argvs = command_lines(stage, "tiny", tmp_path / "run")
        assert argvs and all(a[:2] == [sys.executable, "-m"] for a in argvs)


def test_paths_are_wired_from_the_run_dir(tmp_path):
    root = _preset(tmp_path, sft="learning_rate: 0.001\npacking_samples: true\nadam_betas: [0.9, 0.99]\n")
    (argv,) = command_lines("sft", "p", tmp_path / "run", root)
    flags = argv[3:]
    assert flags[:2] == ["--learning_rate", "0.001"] and "--packing_samples" in flags
    assert flags[flags.index("--adam_betas") + 1: flags.index("--adam_betas") + 3] == ["0.9", "0.99"]
    assert flags[flags.index("--pretrain") + 1] == str(tmp_path / "run" / "base_model")
    assert flags[flags.index("--save_path") + 1] == str(tmp_path / "run" / "sft")


def test_unknown_key_names_file_and_key(tmp_path):
    root = _preset(tmp_path, sft="learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml: unknown key 'learning_rat' \(did you mean learning_rate"):
        command_lines("sft", "p", tmp_path / "run", root)


def test_wrong_type_names_file_key_and_expected_type(tmp_path):
    root = _preset(tmp_path, sft="train_batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml: key 'train_batch_size': expected int"):
        command_lines("sft", "p", tmp_path / "run", root)


def test_missing_section_is_named(tmp_path):
    root = _preset(tmp_path, prep="data:\n  preset: tiny\n")
    with pytest.raises(ConfigError, match=r"missing section 'tiny_model'"):
        command_lines("prep", "p", tmp_path / "run", root)


def test_unknown_preset_and_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*known presets: ci, tiny"):
        command_lines("sft", "nope", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown stage 'rlx'"):
        command_lines("rlx", "tiny", tmp_path)


def test_overrides_replace_yaml_values_and_are_checked(tmp_path):
    argv = command_lines("sft", "tiny", tmp_path, overrides={"max_epochs": 1})[0]
    assert argv[argv.index("--max_epochs") + 1] == "1"
    prep = command_lines("prep", "tiny", tmp_path, overrides={"tiny_model": {"hidden_size": 32}})[1]
    assert prep[prep.index("--hidden_size") + 1] == "32" and "--num_layers" in prep  # the section is merged
    with pytest.raises(ConfigError, match=r"sft.yaml with overrides.*learning_rat"):
        command_lines("sft", "tiny", tmp_path, overrides={"learning_rat": 0.1})


def test_every_trainer_stage_resumes_and_declares_its_inputs(tmp_path):
    from rlhf_ops.stages import STAGES
    for name in ("sft", "rm", "prm", "rl"):
        assert "--load_checkpoint" in command_lines(name, "tiny", tmp_path)[0]
        assert STAGES[name].inputs(tmp_path) and all(str(p).startswith(str(tmp_path)) for p in STAGES[name].inputs(tmp_path))
