"""Tests for rlhf_ops.data.sources: every source form, mixing, and every error message."""

import json
import logging
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from rlhf_ops.data import sources  # noqa: E402
from rlhf_ops.data.sources import DataError, load_mixture, load_source, require_keys  # noqa: E402

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(n, tag, **extra):
    return [{"text": f"{tag}{i}", "src": tag, **extra} for i in range(n)]


@pytest.fixture
def no_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"load_dataset must not be called: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", fail)


# --- formats -------------------------------------------------------------------------------


def test_jsonl(tmp_path, no_hub):
    ds = load_source(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert len(ds) == 5 and ds[2] == ROWS[2]


def test_jsonl_union_of_keys_blank_lines_and_unicode_separators(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, "b": "x\u2028y"}\n', encoding="utf-8")
    ds = load_source(str(path))
    assert ds.column_names == ["a", "b"] and ds["b"] == [None, "x\u2028y"]


def test_json_list_and_json_lines_in_dot_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=2))
    assert load_source(str(tmp_path / "list.json"))["prompt"] == [r["prompt"] for r in ROWS]
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert len(load_source(str(tmp_path / "lines.json"))) == 5


def test_parquet_and_csv(tmp_path):
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    assert load_source(str(tmp_path / "d.parquet"))[4] == ROWS[4]
    (tmp_path / "d.csv").write_text("input,label\nhello,1\nworld,0\n")
    ds = load_source(str(tmp_path / "d.csv"))
    assert ds["input"] == ["hello", "world"] and ds["label"] == [1, 0]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(load_source(str(tmp_path / "one"), split="anything")) == 5
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:2])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_source(str(tmp_path / "dd"))) == 5
    assert len(load_source(str(tmp_path / "dd"), split="test")) == 2
    assert len(load_source(str(tmp_path / "dd"), split="eval")) == 2  # alias
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: test, train\)"):
        load_source(str(tmp_path / "dd"), split="dev")


def test_directory_of_split_files_with_aliases(tmp_path):
    d = tmp_path / "sft"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS)
    write_jsonl(d / "eval.jsonl", ROWS[:3])
    assert len(load_source(str(d))) == 5
    assert len(load_source(str(d), split="eval")) == 3
    assert len(load_source(str(d), split="test")) == 3
    assert len(load_source(str(d), split="validation")) == 3
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: eval, train\)"):
        load_source(str(d), split="dev")
    p = tmp_path / "pq"
    p.mkdir()
    datasets.Dataset.from_list(ROWS[:4]).to_parquet(str(p / "test.parquet"))
    assert len(load_source(str(p), split="eval")) == 4
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_source(str(tmp_path / "empty_dir"))


def test_logs_one_line_per_source_and_prints_nothing(tmp_path, caplog, capfd):
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "dd"))
    write_jsonl(tmp_path / "a.jsonl", ROWS[:3])
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        load_mixture(f"{tmp_path / 'dd'},{tmp_path / 'a.jsonl'}", "0.5,0.5")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    assert loaded == [f"loaded {tmp_path / 'dd'}: 5 rows", f"loaded {tmp_path / 'a.jsonl'}: 3 rows"]


def test_100k_short_jsonl_rows_are_fast(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "label": {i % 2}}}\n' for i in range(100_000)))
    start = time.perf_counter()
    ds = load_source(str(path))
    assert len(ds) == 100_000 and ds[99_999] == {"prompt": "q99999", "label": 1}
    assert time.perf_counter() - start < 10  # ~0.5 s on one core


# --- hub -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, split, expected",
    [
        ("org/name", "train", ("org/name", None, "train")),
        ("squad", "validation", ("squad", None, "validation")),
        ("org/name:cfg", "train", ("org/name", "cfg", "train")),
        ("org/name@test", "train", ("org/name", None, "test")),
        ("org/name:cfg@test", "train", ("org/name", "cfg", "test")),
    ],
)
def test_hub_name_config_split(monkeypatch, spec, split, expected):
    calls = []

    def fake(name, config=None, *, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_source(spec, split)) == 5
    assert calls == [expected]


def test_hub_failure_is_a_data_error(monkeypatch):
    def fake(name, config=None, *, split=None):
        raise ConnectionError("Couldn't reach 'org/nope' on the Hub (OfflineModeIsEnabled)\ndetails")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(DataError) as info:
        load_source("org/nope")
    msg = str(info.value)
    assert "no such file or directory locally" in msg and "could not be loaded" in msg
    assert "Couldn't reach 'org/nope' on the Hub" in msg and "details" not in msg


def test_empty_hub_split_is_an_error(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"a": []}))
    with pytest.raises(DataError, match=r"org/empty: no rows"):
        load_source("org/empty")


@pytest.mark.parametrize("spec", ["data/missing.jsonl", "missing.csv", "./nope", "/abs/nope", "a/b/c", "dir/"])
def test_missing_local_path_does_not_try_the_hub(no_hub, spec):
    with pytest.raises(DataError, match="no such file or directory") as info:
        load_source(spec)
    assert spec in str(info.value) and "Hub" not in str(info.value)


# --- errors in local data ------------------------------------------------------------------


def test_malformed_json_line_names_file_line_and_snippet(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,, oops}\n{"a": 4}\n')
    with pytest.raises(DataError) as info:
        load_source(str(path))
    msg = str(info.value)
    assert f"{path}:3:" in msg and "invalid JSON" in msg and '{"a": 3,, oops}' in msg


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        load_source(str(path))


def test_json_list_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_source(str(path))
    path.write_text('[{"a": 1}, "x"]')
    with pytest.raises(DataError, match=r"item 1 of the JSON list is str, expected an object"):
        load_source(str(path))


def test_mixed_types_in_a_column_names_the_column(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"a": 1}, {"a": "x"}])
    with pytest.raises(DataError, match=r"column 'a' mixes value types \(int, str\)"):
        load_source(str(path))


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("w.jsonl", "\n \n"), ("e.json", "[]"), ("e.csv", "")])
def test_empty_file_has_no_rows(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{tmp_path / name}: no rows"):
        load_source(str(tmp_path / name))


def test_empty_saved_dataset_and_header_only_csv(tmp_path):
    datasets.Dataset.from_dict({"a": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no rows"):
        load_source(str(tmp_path / "empty"))
    # datasets 5.2 writes an empty split with 0 shards and load_from_disk crashes on it (IndexError):
    # only the requested split of a DatasetDict is opened, and an empty one is reported as "no rows".
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_dict({"prompt": []}))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_source(str(tmp_path / "dd"))) == 5
    with pytest.raises(DataError, match=r"dd/test: no rows"):
        load_source(str(tmp_path / "dd"), split="eval")
    (tmp_path / "h.csv").write_text("input,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_source(str(tmp_path / "h.csv"))


def test_unsupported_extension_and_bad_parquet(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_source(str(tmp_path / "d.txt"))
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read parquet file"):
        load_source(str(tmp_path / "d.parquet"))


def test_require_keys():
    ds = datasets.Dataset.from_dict({"input": ["a"], "label": [1]})
    require_keys(ds, ["input", "label"], "x")
    with pytest.raises(DataError) as info:
        require_keys(ds, ["input", "output"], "SOURCE")
    assert str(info.value) == "missing key 'output' in SOURCE (keys present: input, label)"


# --- mixtures ------------------------------------------------------------------------------


def test_single_source_is_not_interleaved_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(10, "a"))
    assert load_mixture(str(path))["text"] == [f"a{i}" for i in range(10)]
    assert load_mixture(str(path), "1.0", max_samples=3)["text"] == ["a0", "a1", "a2"]
    assert len(load_mixture(str(path), max_samples=100)) == 10
    with pytest.raises(DataError, match="--max_samples must be >= 1"):
        load_mixture(str(path), max_samples=0)


def test_mixture_shares_match_probabilities_and_are_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(3000, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows_of(3000, "b"))
    spec = f"{a},{b}"
    ds = load_mixture(spec, "0.8,0.2", max_samples=2000, seed=7)
    assert len(ds) == 2000
    share_a = ds["src"].count("a") / 2000
    # Each row comes from source a with probability 0.8, independently: the count is
    # Binomial(2000, 0.8), sd = sqrt(0.8 * 0.2 / 2000) = 0.0089 in share; 4 sd = 0.036 < 0.05.
    assert abs(share_a - 0.8) < 0.05
    assert ds["text"] == load_mixture(spec, "0.8,0.2", max_samples=2000, seed=7)["text"]
    assert ds["text"] != load_mixture(spec, "0.8,0.2", max_samples=2000, seed=8)["text"]


def test_mixture_all_exhausted_sees_every_row(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(50, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows_of(20, "b"))
    ds = load_mixture(f"{a},{b}", "0.5, 0.5")
    assert set(ds["text"]) == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(20)}
    uniform = load_mixture(f"{a},{b}")  # probs=None: uniform mixing
    assert set(uniform["src"]) == {"a", "b"}


def test_zero_probability_source_is_skipped(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(5, "a"))
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        ds = load_mixture(f"{a},{tmp_path / 'never_loaded.jsonl'}", "1,0")
    assert ds["src"] == ["a"] * 5
    assert any("probability 0" in r.getMessage() for r in caplog.records)


def test_mixture_keeps_common_columns(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(5, "a", extra_a=1))
    b = write_jsonl(tmp_path / "b.jsonl", [{"src": "b", "extra_b": "x", "text": f"b{i}"} for i in range(5)])
    with caplog.at_level(logging.INFO, logger=sources.__name__):
        ds = load_mixture(f"{a},{b}", "0.5,0.5")
    assert ds.column_names == ["text", "src"]
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert any("extra_a" in m for m in dropped) and any("extra_b" in m for m in dropped)


def test_mixture_casts_or_aligns_column_types(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": 1.5, "sys": None}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b", "label": 2, "sys": "s"}] * 3)
    ds = load_mixture(f"{a},{b}", "0.5,0.5")
    assert set(ds["label"]) == {1.5, 2.0} and set(ds["sys"]) == {None, "s"}
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "c", "label": [1, 2]}] * 3)
    with pytest.raises(DataError, match=r"column 'label' is .* in .*c.jsonl but .* in .*a.jsonl, and cannot be cast"):
        load_mixture(f"{a},{c}", "0.5,0.5")


def test_mixture_without_common_columns(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"y": 2}])
    with pytest.raises(DataError, match=r"no column in common \(.*a.jsonl: x; .*b.jsonl: y\)"):
        load_mixture(f"{a},{b}", "0.5,0.5")


@pytest.mark.parametrize("probs", ["0.5", "0.5,0.6", "1.2,-0.2", "a,b", "nan,1", "0.5,0.5,0"])
def test_bad_probs_name_the_flag_and_values(tmp_path, probs, no_hub):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError) as info:
        load_mixture(f"{a},{a}", probs)
    assert str(info.value).startswith(f"--dataset_probs {probs!r}")
    with pytest.raises(DataError, match="--prompt_data_probs"):
        load_mixture(f"{a},{a}", probs, probs_flag="--prompt_data_probs")


def test_probs_within_tolerance_are_accepted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert len(load_mixture(f"{a},{a},{a}", "0.3333333,0.3333333,0.3333334")) >= 15


def test_empty_entry_in_dataset_list(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match="empty source"):
        load_mixture(f"{a},")
