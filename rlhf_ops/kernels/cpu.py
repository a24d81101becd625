"""Build, cache and load the fused fp32 CPU kernels in `cpu_fused.c`.

The kernels are plain C over raw pointers (no torch headers), so a build takes about a second: `cc -O3
-march=native -fopenmp -shared`, at first use, into a cache keyed by the source, the flags, the compiler
and the CPU (`-march=native` code must not run on another CPU model sharing the cache, e.g. over NFS).
The library is written to a temporary name and renamed into place, so concurrent first uses (Ray
workers, torchrun ranks) never load a half-written file. `-fopenmp` binds to the libgomp that
`import torch` already loaded, so there is one OpenMP runtime in the process.

`lib()` returns None, once logging why, where the kernels cannot be used: `RLHF_OPS_CPU_KERNELS=0`,
not Linux, no C compiler, or a build that fails. Every caller then keeps its PyTorch ops.
`RLHF_OPS_KERNEL_CACHE` moves the cache (default `~/.cache/rlhf_ops/kernels`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "RLHF_OPS_CPU_KERNELS"
CACHE_ENV = "RLHF_OPS_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("cpu_fused.c")
# torch's own math flags (-fno-trapping-math lets the exp's float-to-int conversion vectorize); 512-bit
# vectors where the CPU has them (gcc picks 256 by default on x86, which halves the exp's throughput)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared",
         "-std=gnu11") + (("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())

_P, _I64, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "swiglu_fwd": (_P, _P, _P, _I64, _I),
    "swiglu_bwd": (_P, _P, _P, _P, _P, _P, _I64, _I),
    "rmsnorm_fwd": (_P, _P, _P, _P, _I64, _I64, _F, _I),
    "rmsnorm_bwd": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I),
    "rope": (_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I, _I),
}
_lib: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _cpu_id() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlhf_ops" / "kernels"


def build(cc: str | None = None) -> Path:
    """Compile `cpu_fused.c` unless the cache has it; returns the shared library's path."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    out = _cache_dir() / f"cpu_fused-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(path: Path) -> ctypes.CDLL:
    import torch  # noqa: F401 - torch's libgomp first, so the kernels' OpenMP binds to it

    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used (see the module docstring)."""
    global _lib
    if _lib is None:
        _lib = False
        if os.environ.get(ENV, "1") == "0":
            return None
        if not sys.platform.startswith("linux"):
            logger.info("fused CPU kernels: only built on Linux; using PyTorch ops")
            return None
        try:
            _lib = _load(build())
        except Exception as e:  # no compiler, a failed build, a library that does not load
            logger.warning("fused CPU kernels unavailable, using PyTorch ops: %s", e)
    return _lib or None
