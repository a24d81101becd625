"""The SFT CLI's bad-input and YAML behaviour: every error names what is wrong (file, line, key,
option, allowed values); `--config` YAML loads and flags override it. Mostly in-process and fast."""
from __future__ import annotations

from pathlib import Path

import pytest

from _helpers import LOG_TAIL, _finish, _start

TEMPLATE = "User: {}\nAssistant: "
PROG = "python -m rlhf_ops.cli.train_sft"


# ---------------------------------------------------------------------------------------------- 5. bad input


def main_error(argv: list[str], capsys) -> str:
    """Run the CLI's main() in this process on options that must be refused; return its stderr."""
    from rlhf_ops.cli.train_sft import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def good(model_dir, data_dir, tmp_path) -> list:
    return ["--pretrain", model_dir, "--dataset", data_dir / "sft", "--input_key", "input", "--output_key", "output",
            "--save_path", tmp_path / "out", "--ckpt_path", tmp_path / "ckpt"]


def test_batch_size_not_divisible_by_micro_batch(good, capsys):
    err = main_error(good + ["--train_batch_size", "30", "--micro_train_batch_size", "8"], capsys)
    assert "--train_batch_size" in err and "30" in err and "--micro_train_batch_size 8" in err, err


def test_pretrain_path_that_does_not_exist(good, tmp_path, capsys):
    missing = tmp_path / "no" / "such_model"
    err = main_error(good + ["--pretrain", missing], capsys)
    assert "--pretrain" in err and str(missing) in err and "does not exist" in err, err


def test_save_path_that_is_a_file(good, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    err = main_error(good + ["--save_path", f], capsys)
    assert "--save_path" in err and str(f) in err and "existing file" in err, err


def test_unknown_option_is_named_with_a_suggestion(good, capsys):
    err = main_error(good + ["--learning_rat", "1e-5"], capsys)
    assert "--learning_rat" in err and "did you mean --learning_rate" in err, err


@pytest.mark.parametrize("flag,value,allowed", [
    ("--zero_stage", "5", ["0", "1", "2", "3"]),
    ("--lr_scheduler", "foo", ["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup",
                               "polynomial", "inverse_sqrt", "warmup_stable_decay"]),
])
def test_bad_choice_names_the_allowed_values(good, capsys, flag, value, allowed):
    err = main_error(good + [flag, value], capsys)
    assert flag in err and value in err and all(a in err for a in allowed), err


def test_help_documents_every_option(capsys):
    import dataclasses

    from rlhf_ops.cli.train_sft import main
    from rlhf_ops.trainers.sft import SFTConfig

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flat = "".join(text.split())  # argparse wraps lines at spaces and after hyphens
    fields = [f for f in dataclasses.fields(SFTConfig) if f.init]
    assert len(fields) > 40
    for f in fields:
        assert f"--{f.name}" in text, f"--{f.name} missing from --help"
        if f.type in (bool, "bool"):
            assert f"--no-{f.name}" in text
        helptext = f.metadata.get("help", "")
        assert helptext, f"--{f.name} has no help text"
        assert "".join(helptext.split()[:4]) in flat, f"--{f.name}: its help text is not in --help"
    assert "--config" in text and "--max_epoch" in text


@pytest.fixture
def no_dist(monkeypatch):
    """For main() in this process on bad data: the data is refused before DeepSpeed / the process
    group would start (and if it ever is not, the test says so instead of starting them here)."""
    import rlhf_ops.distributed.engine as engine
    import rlhf_ops.utils.logs as logs

    def refuse(*args, **kwargs):
        raise AssertionError("train_sft got past the data checks to init_distributed() on bad data")

    monkeypatch.setattr(engine, "init_distributed", refuse)
    monkeypatch.setattr(logs, "setup_logging", lambda *a, **k: None)  # leave pytest's logging alone


def _sft_dir(tmp: Path, text: str) -> Path:
    d = tmp / "data"
    d.mkdir()
    (d / "train.jsonl").write_text(text)
    return d / "train.jsonl"


def test_missing_key_names_the_key_and_the_keys_present(good, no_dist, capsys):
    err = main_error(good + ["--output_key", "answer"], capsys)
    assert "missing key 'answer'" in err and "keys present: input, output" in err, err


def test_empty_dataset_file(good, no_dist, tmp_path, capsys):
    path = _sft_dir(tmp_path, "")
    err = main_error(good + ["--dataset", path], capsys)
    assert f"{path}: no rows" in err, err


def test_malformed_json_line_names_file_and_line(good, no_dist, data_dir, tmp_path, capsys):
    lines = (data_dir / "sft" / "train.jsonl").read_text().splitlines()[:10]
    path = _sft_dir(tmp_path, "\n".join(lines[:2] + ['{"input": "What is 1 + 1?", "output": "2"'] + lines[2:]) + "\n")
    err = main_error(good + ["--dataset", path], capsys)
    assert f"{path}:3: invalid JSON" in err, err


def test_max_len_shorter_than_every_prompt(good, no_dist, capsys):
    err = main_error(good + ["--input_template", TEMPLATE, "--max_len", "6", "--max_samples", "64"], capsys)
    assert "--max_len 6 is shorter than the prompt of every row" in err, err


@pytest.mark.slow
def test_batch_size_not_divisible_by_micro_times_world_size(good):
    # two ranks under torchrun: --train_batch_size 24 passes the per-process check (24 % 8 == 0) and
    # is refused once the world size is known; each rank prints the error, torchrun adds its report
    rc, out = _finish(_start([str(a) for a in good] + ["--max_samples", "64", "--max_len", "64",
                                                     "--train_batch_size", "24", "--micro_train_batch_size", "8"],
                             nproc=2), timeout=300)
    assert rc != 0, out[-LOG_TAIL:]
    msg = "--train_batch_size 24 is not divisible by --micro_train_batch_size 8 x world size 2 = 16"
    assert f"{PROG}: error: {msg}" in out, out[-LOG_TAIL:]


# ---------------------------------------------------------------------------------------------- 6. YAML


def _parse(argv: list) -> object:
    from rlhf_ops.config import parse_config
    from rlhf_ops.trainers.sft import SFTConfig
    return parse_config(SFTConfig, [str(a) for a in argv], prog=PROG)


def test_yaml_config_loads_and_flags_override_it(model_dir, data_dir, tmp_path):
    import yaml

    values = {"pretrain": str(model_dir), "dataset": str(data_dir / "sft"), "eval_dataset": str(data_dir / "sft"),
              "input_key": "input", "output_key": "output", "input_template": TEMPLATE, "train_batch_size": 32,
              "micro_train_batch_size": 8, "max_len": 128, "learning_rate": 3e-3, "zero_stage": 3,
              "packing_samples": True, "adam_betas": [0.9, 0.99], "lr_scheduler": "constant",
              "save_path": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "ckpt"), "max_epoch": 2}
    cfg_file = tmp_path / "sft.yaml"
    cfg_file.write_text(yaml.safe_dump(values))
    flags = []
    for k, v in values.items():
        flags += [f"--{k}"] if v is True else [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    from_yaml, from_flags = _parse(["--config", cfg_file]), _parse(flags)
    assert from_yaml == from_flags
    assert from_yaml.input_template == TEMPLATE and from_yaml.max_epochs == 2 and from_yaml.adam_betas == (0.9, 0.99)

    over = _parse(["--config", cfg_file, "--max_len", "64", "--no-packing_samples", "--zero_stage", "2"])
    assert (over.max_len, over.packing_samples, over.zero_stage) == (64, False, 2)
    assert over.learning_rate == 3e-3  # the rest still from the file


@pytest.mark.parametrize("text,needles", [
    ("max_lenn: 64\n", ["unknown key 'max_lenn'", "did you mean max_len"]),
    ("max_len: sixty-four\n", ["key 'max_len'", "expected int", "sixty-four"]),
    ("packing_samples: 'yes'\n", ["key 'packing_samples'", "expected true or false"]),
    ("zero_stage: 5\n", ["key 'zero_stage'", "expected one of 0, 1, 2, 3", "5"]),
])
def test_bad_yaml_names_file_key_and_expected_type(good, tmp_path, capsys, text, needles):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    err = main_error(good + ["--config", cfg_file], capsys)
    assert str(cfg_file) in err, err
    for n in needles:
        assert n in err, err
