"""The dataset layout written by rlhf_ops.data.prepare and `python -m rlhf_ops.cli.prepare`."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest

from rlhf_ops.cli.prepare import PrepareConfig, main
from rlhf_ops.data.arith import extract_answer, is_correct
from rlhf_ops.data.prepare import (INPUT_TEMPLATE, PRESETS, PRM_PLACEHOLDER, REJECTED_KINDS, PresetName, build_files,
                                   write_dataset)

KEYS = {
    "sft": {"input", "output"},
    "sft_chat": {"messages"},
    "sft_multiturn": {"messages"},
    "preference": {"prompt", "chosen", "rejected", "margin", "error"},
    "preference_chat": {"chosen", "rejected"},
    "prm": {"input", "label", "value"},
    "prompts": {"input", "label"},
    "prompts_chat": {"context_messages", "label"},
}


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prep") / "data"
    write_dataset(d, preset="tiny", seed=42)
    return d


def _rows(d: Path, rel: str) -> list[dict]:
    return [json.loads(line) for line in (d / rel).read_text(encoding="utf-8").splitlines()]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _question(name: str, row: dict) -> str:
    if name in ("sft", "prompts"):
        return row["input"]
    if name == "preference":
        return row["prompt"]
    if name == "prm":
        return row["input"].split("\n")[0]
    msgs = row.get("messages") or row.get("context_messages") or row["chosen"]
    return msgs[0]["content"]


def test_layout_keys_counts_and_manifest(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["seed"] == 42 and manifest["task"] == "arith"
    assert manifest["input_template"] == INPUT_TEMPLATE == "User: {}\nAssistant: "
    assert set(manifest["files"]) == {f"{n}/{s}.jsonl" for n in KEYS for s in ("train", "eval")}
    assert {str(p.relative_to(out)) for p in out.rglob("*.jsonl")} == set(manifest["files"])
    for rel, info in manifest["files"].items():
        rows = _rows(out, rel)
        assert len(rows) == info["rows"] > 0
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == info["sha256"]
        assert all(set(r) == KEYS[rel.split("/")[0]] for r in rows), rel
    sizes = PRESETS["tiny"]
    assert manifest["files"]["sft/train.jsonl"]["rows"] == sizes["sft"][0] == 4000
    assert manifest["files"]["prompts/eval.jsonl"]["rows"] == sizes["prompts"][1] == 200
    assert "ки" in (out / "prm/train.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False


def test_presets_match_the_cli_literal():
    assert set(get_args(PresetName)) == set(PRESETS)
    assert PRESETS["small"]["sft"] == (40000, 2000)


def test_no_question_is_both_trained_and_evaluated(out):
    qs = {"train": set(), "eval": set()}
    for rel in json.loads((out / "manifest.json").read_text())["files"]:
        name, split = rel.removesuffix(".jsonl").split("/")
        qs[split] |= {_question(name, r) for r in _rows(out, rel)}
    assert qs["train"] and qs["eval"] and not qs["train"] & qs["eval"]


def test_rl_prompts_keep_the_eval_difficulty_mix(out):
    def easy_share(rel):  # "What is a + b?": one operation
        rows = _rows(out, rel)
        return sum(r["input"].count(" ") == 4 for r in rows) / len(rows)
    assert abs(easy_share("prompts/train.jsonl") - easy_share("prompts/eval.jsonl")) < 0.08
    assert easy_share("prompts/train.jsonl") > easy_share("sft/train.jsonl") - 0.02


def test_rerun_is_byte_identical_and_replaces_an_earlier_output(out, tmp_path):
    again = tmp_path / "again"
    write_dataset(again, preset="tiny", seed=42)
    assert _tree(again) == _tree(out)
    write_dataset(again, preset="tiny", seed=42)  # over an earlier output: allowed
    assert _tree(again) == _tree(out)
    write_dataset(again, preset="tiny", seed=1)
    assert _tree(again) != _tree(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp dirs left


def test_sft_and_prompt_rows_are_correct(out):
    for r in _rows(out, "sft/train.jsonl"):
        assert is_correct(r["output"], extract_answer(r["output"]))
    for r, s in zip(_rows(out, "sft_multiturn/eval.jsonl"), _rows(out, "sft/eval.jsonl")):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
        assert r["messages"][1]["content"] == s["output"] and r["messages"][2]["content"].startswith("Now ")
        assert r["messages"][3]["content"].startswith(extract_answer(s["output"]) + " ")
    for r in _rows(out, "prompts_chat/train.jsonl"):
        assert r["context_messages"][0]["role"] == "user" and r["label"].lstrip("-").isdigit()


def test_preference_rows(out):
    for split in ("train", "eval"):
        for r, c in zip(_rows(out, f"preference/{split}.jsonl"), _rows(out, f"preference_chat/{split}.jsonl")):
            assert r["chosen"] != r["rejected"] and 0.0 < r["margin"] <= 1.0
            assert extract_answer(r["chosen"]) != extract_answer(r["rejected"])
            assert r["error"] in REJECTED_KINDS and (extract_answer(r["rejected"]) is None) == (r["error"] == "truncated")
            assert c["chosen"][1]["content"] == r["chosen"] and c["rejected"][1]["content"] == r["rejected"]
            assert c["chosen"][0] == c["rejected"][0] == {"role": "user", "content": r["prompt"]}
    counts = Counter(r["error"] for r in _rows(out, "preference/train.jsonl"))
    assert set(counts) == set(REJECTED_KINDS) and min(counts.values()) > 400  # about 2000 / 4 each


def test_prm_labels_match_placeholders(out):
    rows = _rows(out, "prm/train.jsonl")
    for r in rows:
        n = r["input"].count(PRM_PLACEHOLDER)
        assert n == len(r["value"]) >= 2
        marks = [line[-1] for line in r["label"].split("\n")[1:]]
        assert r["label"].count(PRM_PLACEHOLDER) == 0 and len(marks) == n
        filled = r["input"].split(PRM_PLACEHOLDER)
        assert "".join(part + mark for part, mark in zip(filled, marks + [""])) == r["label"]
        assert [1.0 if m == "+" else 0.0 for m in marks] == r["value"]
        assert r["value"] == sorted(r["value"], reverse=True)  # "-" from the first wrong step on
    correct = sum(all(r["value"]) for r in rows)
    assert 0.3 < correct / len(rows) < 0.7


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        write_dataset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_dataset(target)


def test_refuses_an_earlier_output_with_extra_files(tmp_path):
    d = tmp_path / "d"
    write_dataset(d)
    (d / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_dataset(d)
    assert (d / "mine.txt").read_text() == "keep me"


def test_empty_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty")
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import rlhf_ops.data.prepare as prep

    write_dataset(tmp_path / "d")
    before = _tree(tmp_path / "d")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(prep, "_jsonl_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "d", seed=3)
    assert _tree(tmp_path / "d") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_build_files_rejects_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        build_files("huge")


def test_cli_main(tmp_path, capsys):
    manifest = main(["--output_dir", str(tmp_path / "cli"), "--preset", "tiny", "--seed", "5"])
    printed = capsys.readouterr().out
    assert "sft/train.jsonl" in printed and "4000" in printed
    assert manifest["seed"] == 5 and (tmp_path / "cli" / "prm" / "eval.jsonl").is_file()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--output_dir", str(tmp_path / "x"), "--preset", "huge"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "huge" in err and "tiny" in err and "small" in err
    with pytest.raises(SystemExit):
        main([])
    assert "--output_dir" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("a")
    with pytest.raises(SystemExit) as e:
        main(["--output_dir", str(tmp_path / "foreign")])
    assert e.value.code == 2 and "refusing" in capsys.readouterr().err


def test_config_is_frozen():
    cfg = PrepareConfig(output_dir="x")
    assert cfg.preset == "tiny" and cfg.seed == 42
    with pytest.raises(Exception):
        cfg.seed = 1  # type: ignore[misc]


def test_sft_noise_misreports_only_the_answer_of_that_share_of_train_demonstrations():
    clean, noisy = build_files("tiny", 42), build_files("tiny", 42, sft_noise=0.3)
    assert {k: v for k, v in noisy.items() if not k.startswith(("sft/", "sft_chat/"))} == \
        {k: v for k, v in clean.items() if not k.startswith(("sft/", "sft_chat/"))}  # nothing else changes
    assert noisy["sft/eval.jsonl"] == clean["sft/eval.jsonl"]  # the eval split stays clean
    changed = 0
    for c, n, chat in zip(clean["sft/train.jsonl"], noisy["sft/train.jsonl"], noisy["sft_chat/train.jsonl"]):
        assert c["input"] == n["input"] and chat["messages"][1]["content"] == n["output"]
        if c["output"] != n["output"]:
            changed += 1
            steps_c, ans_c = c["output"].rsplit("\n", 1)
            steps_n, ans_n = n["output"].rsplit("\n", 1)
            assert steps_n == steps_c and ans_n != ans_c and ans_n.startswith("Answer: ")  # every step is right
            assert not is_correct(n["output"], extract_answer(c["output"]))
    assert 0.27 < changed / len(clean["sft/train.jsonl"]) < 0.33, changed  # 4000 rows: 0.3 +- 4.5 sigma
    assert build_files("tiny", 42, sft_noise=0.3) == noisy  # deterministic
    with pytest.raises(ValueError, match="sft_noise"):
        build_files("tiny", 42, sft_noise=1.0)


def test_cli_records_the_sft_noise_in_the_manifest(tmp_path, capsys):
    manifest = main(["--output_dir", str(tmp_path / "n"), "--sft_noise", "0.3"])
    assert manifest["sft_noise"] == 0.3 and "SFT noise 0.3" in capsys.readouterr().out
    saved = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert saved["sft_noise"] == 0.3
    with pytest.raises(SystemExit) as e:
        main(["--output_dir", str(tmp_path / "m"), "--sft_noise", "-0.1"])
    assert e.value.code == 2 and "--sft_noise" in capsys.readouterr().err
