"""utils.malloc: glibc keeps freed activation-sized blocks for reuse instead of unmapping them (run in subprocesses:
the setting is process-wide)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

PROBE = """
import ctypes, torch
from rlhf_ops.utils import malloc
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
tuned = malloc.tune()
x = torch.ones(24 << 18)  # 24 MB: mapped on its own by default, from the heap once tuned
before = anon()
del x
print(tuned, malloc.tune(), round(before - anon()))
"""


def _probe(**env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RLHF_OPS_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**full, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_freed_blocks_stay_with_the_process_once_tuned():
    tuned, again, returned_mb = _probe()
    assert (tuned, again) == ("True", "True")
    assert int(returned_mb) <= 1  # kept for the next step's tensors
    tuned, _, returned_mb = _probe(RLHF_OPS_MALLOC_TUNING="0")
    assert tuned == "False" and int(returned_mb) >= 20  # glibc's default: unmapped at once


def test_the_users_glibc_settings_win():
    assert _probe(MALLOC_MMAP_THRESHOLD_="65536")[0] == "False"
    assert _probe(MALLOC_TRIM_THRESHOLD_="0")[0] == "False"
