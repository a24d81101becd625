"""A CPU process group is destroyed at exit, before interpreter teardown (`engine._destroy_gloo_group`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIST = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_the_gloo_group_is_destroyed_by_the_exit_handlers():
    code = ("import atexit, torch\n"
            "from rlhf_ops.distributed.engine import init_distributed\n"
            "print(init_distributed(), torch.distributed.get_backend())\n"
            "atexit._run_exitfuncs()\n"
            "print('after exit handlers:', torch.distributed.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k not in DIST} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(0, 1) gloo" in p.stdout and "after exit handlers: False" in p.stdout, p.stdout
