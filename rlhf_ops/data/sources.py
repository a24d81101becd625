"""Dataset sources: turn ``--dataset``/``--dataset_probs``/``--max_samples`` into one ``Dataset``.

Every stage (SFT, reward model, RL prompts, eval) reads data as the reference CLI does: local files,
``save_to_disk`` directories, directories of split files or Hub names, mixed by probability. Bad input
must fail *here*, naming the file, line and what was expected, not later as a KeyError in a collator.
Local files are parsed here (``json.loads`` line by line for JSON lines; pyarrow for parquet and CSV)
into in-memory datasets: exact line numbers, no cache directory, no progress bars.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.exceptions import DatasetsError
from datasets.table import InMemoryTable

logger = logging.getLogger(__name__)

DATA_EXTS = (".jsonl", ".json", ".parquet", ".csv")  # also the preference order in a split directory
SPLIT_ALIASES = {"eval": ("test", "validation"), "test": ("eval", "validation"), "validation": ("eval", "test")}
_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError)
_NULL = datasets.Value("null")  # an all-null column; datasets aligns it with any type when concatenating


class DataError(ValueError):
    """Bad input data; the message names the file, row/line and what was expected."""


def load_source(spec: str, split: str = "train") -> datasets.Dataset:
    """Load one source: a data file, a dataset directory, or a Hub ``name[:config][@split]``."""
    spec = spec.strip()
    if not spec:
        raise DataError("empty dataset spec")
    path = Path(spec).expanduser()
    if path.is_file():
        ds = _load_file(path)
    elif path.is_dir():
        ds = _load_dir(path, split)
    elif _looks_local(spec):
        raise DataError(f"{spec}: no such file or directory")
    else:
        ds = _load_hub(spec, split)
    if len(ds) == 0:
        raise DataError(f"{spec}: no rows" + ("" if path.is_file() else f" (split {split!r})"))
    logger.info("loaded %s: %d rows", spec, len(ds))
    return ds


def load_mixture(dataset: str, probs: str | None = None, split: str = "train", max_samples: int | None = None,
                 seed: int = 42, *, probs_flag: str = "--dataset_probs") -> datasets.Dataset:
    """Load comma-separated sources and interleave them with the given probabilities.

    ``probs=None`` mixes uniformly; probability-0 sources are not loaded. Several sources are cut to
    their common columns and interleaved deterministically for ``seed`` until each was seen in full
    ("all_exhausted"), then the first ``max_samples`` rows are kept. ``probs_flag`` names the flag in errors.
    """
    specs = [s.strip() for s in dataset.split(",")]
    if not all(specs):
        raise DataError(f"--dataset {dataset!r}: empty source in the comma-separated list")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max_samples must be >= 1, got {max_samples}")
    weights = _parse_probs(probs, len(specs), probs_flag)
    for spec in (s for s, p in zip(specs, weights) if p == 0):
        logger.info("skipping %s: probability 0", spec)
    chosen = [(s, p) for s, p in zip(specs, weights) if p > 0]
    names = [s for s, _ in chosen]
    sources = [load_source(s, split) for s in names]
    if len(sources) == 1:
        ds = sources[0]
    else:
        total = math.fsum(p for _, p in chosen)  # numpy's choice() wants an exact sum of 1
        ds = datasets.interleave_datasets(_align_columns(sources, names), [p / total for _, p in chosen],
                                          seed=seed, stopping_strategy="all_exhausted")
        logger.info("mixed %d sources: %d rows", len(sources), len(ds))
    if max_samples is not None:
        ds = ds.select(range(min(len(ds), int(max_samples))))
    return ds


def require_keys(ds: datasets.Dataset, keys: Sequence[str], source: str) -> None:
    """Raise DataError unless every key in ``keys`` is a column of ``ds``."""
    for key in keys:
        if key not in ds.column_names:
            raise DataError(f"missing key {key!r} in {source} (keys present: {', '.join(ds.column_names)})")


def _looks_local(spec: str) -> bool:
    """True for path-shaped specs; a Hub id is ``name`` or ``org/name`` (at most one slash)."""
    name = spec.split("@", 1)[0]
    return (name.lower().endswith(DATA_EXTS) or name.startswith(("/", ".", "~")) or name.endswith("/")
            or name.count("/") > 1 or "\\" in name)


def _load_file(path: Path) -> datasets.Dataset:
    ext = path.suffix.lower()
    if ext not in DATA_EXTS:
        raise DataError(f"{path}: unsupported file type {ext!r}; expected {', '.join(DATA_EXTS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: no rows (empty file)")
    if ext in (".json", ".jsonl"):
        return _from_rows(_read_json(path), path)
    try:
        table = pq.read_table(path) if ext == ".parquet" else pa_csv.read_csv(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read {ext[1:]} file: {_first_line(e)}") from e
    return datasets.Dataset(InMemoryTable(table))


def _read_json(path: Path) -> list[dict]:
    """Rows of a JSON list of objects, or of JSON lines (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i} of the JSON list is {type(row).__name__}, expected an object")
        return rows
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or other line breaks.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}): {line[:80]!r}") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}: {line[:80]!r}")
        rows.append(row)
    return rows


def _from_rows(rows: list[dict], path: Path) -> datasets.Dataset:
    keys = list(dict.fromkeys(k for row in rows for k in row))  # union of keys (from_list keeps row 0's only)
    columns = {k: [row.get(k) for row in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except _ARROW_ERRORS as e:
        for k in keys:  # find the column arrow cannot type, to name it
            try:
                pa.array(columns[k])
            except _ARROW_ERRORS:
                types = ", ".join(sorted({type(v).__name__ for v in columns[k] if v is not None}))
                raise DataError(f"{path}: column {k!r} mixes value types ({types}): {_first_line(e)}") from e
        raise DataError(f"{path}: rows do not form a table: {_first_line(e)}") from e


def _load_dir(path: Path, split: str) -> datasets.Dataset:
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: a sub-directory per split
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        path = path / _pick_split(split, splits, path)
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        if not json.loads((path / "state.json").read_text()).get("_data_files"):
            raise DataError(f"{path}: no rows (saved dataset is empty)")  # load_from_disk would crash
        with _quiet():
            return datasets.load_from_disk(str(path))
    # {split: file}; reversed so that the first extension in DATA_EXTS wins for a split.
    files = {f.name[: -len(ext)]: f for ext in reversed(DATA_EXTS) for f in sorted(path.glob(f"*{ext}"))}
    if not files:
        raise DataError(f"{path}: not a save_to_disk directory and no data files in it "
                        f"(expected {split}.jsonl, {split}.json, {split}.parquet or {split}.csv)")
    return _load_file(files[_pick_split(split, list(files), path)])


def _pick_split(split: str, available: list[str], where: Path) -> str:
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in available:
            if name != split:
                logger.info("%s: no split %r, using %r", where, split, name)
            return name
    raise DataError(f"{where}: no split {split!r} (splits: {', '.join(sorted(available))})")


def _load_hub(spec: str, split: str) -> datasets.Dataset:
    name, _, at_split = spec.partition("@")
    name, _, config = name.partition(":")
    split = at_split or split
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError, DatasetsError) as e:
        raise DataError(f"{spec}: no such file or directory locally, and the Hub dataset {name!r} "
                        f"(config {config or None}, split {split!r}) could not be loaded: {_first_line(e)}") from e


def _parse_probs(probs: str | None, n: int, flag: str) -> list[float]:
    if probs is None or not probs.strip():
        return [1.0 / n] * n
    try:
        values = [float(x) for x in probs.split(",")]
    except ValueError:
        raise DataError(f"{flag} {probs!r}: expected comma-separated numbers") from None
    if len(values) != n:
        raise DataError(f"{flag} {probs!r}: {len(values)} values for {n} sources")
    if not all(v >= 0 for v in values) or not abs(math.fsum(values) - 1) <= 1e-6:  # NaN fails both tests
        raise DataError(f"{flag} {probs!r}: values must be >= 0 and sum to 1 (sum {math.fsum(values):.6g})")
    return values


def _align_columns(sources: list[datasets.Dataset], names: list[str]) -> list[datasets.Dataset]:
    """Keep the columns common to all sources, cast to the first source's types where they differ."""
    common = [c for c in sources[0].column_names if all(c in d.column_names for d in sources[1:])]
    if not common:
        listing = "; ".join(f"{n}: {', '.join(d.column_names)}" for n, d in zip(names, sources))
        raise DataError(f"sources have no column in common ({listing})")
    first, out = sources[0].features, []
    for name, d in zip(names, sources):
        if dropped := [c for c in d.column_names if c not in common]:
            logger.info("%s: dropping columns not in every source: %s", name, ", ".join(dropped))
        d = d.select_columns(common)
        bad = [c for c in common if d.features[c] != first[c] and _NULL not in (d.features[c], first[c])]
        if bad:
            try:
                with _quiet():
                    d = d.cast(datasets.Features({c: first[c] if c in bad else d.features[c] for c in common}))
            except _ARROW_ERRORS as e:
                raise DataError(f"column {bad[0]!r} is {d.features[bad[0]]} in {name} but {first[bad[0]]} "
                                f"in {names[0]}, and cannot be cast: {_first_line(e)}") from e
        out.append(d)
    return out


@contextlib.contextmanager
def _quiet():  # hide datasets' progress bars for a local operation, then restore the setting
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
