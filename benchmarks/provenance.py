"""Where and on what a benchmark ran: the machine, the load, the commit and a hash of the code it ran."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_for_load(threshold: float, max_s: float) -> list[float]:
    t0, seen = time.time(), []
    while True:
        l1 = os.getloadavg()[0]
        seen.append(round(l1, 2))
        if l1 < threshold or time.time() - t0 >= max_s:
            return seen
        print(f"  load {l1:.2f} >= {threshold}: waiting 30 s ({time.time() - t0:.0f}/{max_s:.0f} s)", flush=True)
        time.sleep(30)


def machine() -> str:
    name = platform.machine()
    try:
        name = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal")) / 2**20
        name += f", {mem:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return name


def git_head() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    d = subprocess.run(["git", "status", "--porcelain", "rlhf_ops", "params"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() + (" + uncommitted changes in rlhf_ops/ or params/" if d.stdout.strip() else "")


def code_hash() -> str:
    """sha256 of rlhf_ops/**/*.py and the tiny preset's YAML files: compared at start and end of a run."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(list((ROOT / "rlhf_ops").rglob("*.py")) + list((ROOT / "params" / "presets" / "tiny").glob("*.yaml"))):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write_results(out: Path, name: str, result: dict, md_lines: list[str]) -> None:
    """`<out>/<name>.json` and `<out>/<name>.md`, and the markdown printed."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(md_lines) + "\n")
    print("\n".join(md_lines))
