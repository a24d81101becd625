"""Content hashes of artifacts and per-stage stamps: what makes a cached stage trustworthy.

A stage's cache key is the hash of everything that determines its outputs: its resolved command
lines (params YAML + overrides + wired paths), the content of its input artifacts, and the
version of the code (`code_version`). After a stage finishes, a stamp in `<run>/.stamps/<stage>.json`
records that key and the content hash of every output. A cached result is used only when the
stamp matches the key *and* every output still hashes to what the stamp says: an output that was
deleted (`dvc repro -f`) or altered is rebuilt, never returned stale.

Pure file I/O and hashlib: no Prefect, no torch, so DVC-side tools and tests import it cheaply.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from rlhf_ops.utils.atomic import write_json

STAMPS = ".stamps"
_CHUNK = 1 << 20
_IGNORED = {"__pycache__"}


def tree_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file, or of a directory's relative paths and file contents (sorted); None when absent.

    Hidden temporaries of atomic writes (`.name.*.tmp`, `.name.old`) and `__pycache__` are skipped,
    so an interrupted write next to an artifact never changes its hash.
    """
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(_files(path)):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(_file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def _files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED and not _temporary(d)]
        for name in filenames:
            if not _temporary(name):
                yield Path(dirpath) / name


def _temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def code_version(root: str | os.PathLike | None = None) -> str:
    """sha256 over the package's Python sources: any code change invalidates every cached stage."""
    pkg = Path(root) if root else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        if "__pycache__" not in f.parts:
            h.update(str(f.relative_to(pkg)).encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def stage_key(stage: str, argvs: list[list[str]], inputs: list[Path], code: str) -> str:
    """The cache key of one stage run: its command lines (interpreter left out), input hashes, code."""
    doc = {"stage": stage, "argv": [a[1:] for a in argvs], "code": code,
           "inputs": {str(p): tree_sha256(p) for p in inputs}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def stamp_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / STAMPS / f"{stage}.json"


def write_stamp(run_dir: Path, stage: str, key: str, outputs: list[Path], extra: dict[str, Any] | None = None) -> dict:
    """Record (atomically) that `stage` produced `outputs` under `key`; returns the stamp.

    `extra` adds fields (the pipeline records the stage's work time); `hash_s` is the time spent
    hashing the outputs, so benchmarks can tell orchestration cost from work."""
    t0 = time.perf_counter()
    hashes = {str(p): tree_sha256(p) for p in outputs}
    stamp = {"stage": stage, "key": key, "outputs": hashes, **(extra or {}), "hash_s": round(time.perf_counter() - t0, 3)}
    missing = [p for p, h in stamp["outputs"].items() if h is None]
    if missing:
        raise FileNotFoundError(f"stage {stage} finished but did not write {', '.join(missing)}")
    write_json(stamp_path(run_dir, stage), stamp)
    return stamp


def read_stamp(run_dir: Path, stage: str) -> dict | None:
    try:
        return json.loads(stamp_path(run_dir, stage).read_text())
    except (OSError, ValueError):
        return None


def stamp_is_valid(run_dir: Path, stage: str, key: str) -> bool:
    """Whether the stage's outputs on disk are exactly what a run with `key` produced."""
    stamp = read_stamp(run_dir, stage)
    if not stamp or stamp.get("key") != key or not stamp.get("outputs"):
        return False
    return all(tree_sha256(p) == h for p, h in stamp["outputs"].items())
