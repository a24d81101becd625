"""Shared by the integration tests: subprocess environment, option dicts -> argv, tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's bin/, which holds torchrun and deepspeed
LOG_TAIL = 6000
TEMPLATE = "User: {}\nAssistant: "
# a dense, cheap reward for RL loop tests: any policy change moves it
LENGTH_REWARD = "def reward_func(queries, prompts, labels):\n    return [len(q) % 7 / 7.0 for q in queries]\n"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """This process's environment minus torch.distributed variables, offline, one thread, CPU."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return env


def to_argv(opts: dict) -> list[str]:
    """{"flag": value} -> ["--flag", "value"]; True -> bare flag; None/False -> left out."""
    argv: list[str] = []
    for k, v in opts.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "rlhf_ops.cli.train_sft"]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "rlhf_ops.cli.train_sft"]


def _start(argv: list[str], nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(_launcher(nproc) + argv, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, proc.args))}\n{out[-LOG_TAIL:]}")
    return proc.returncode, out


def run_sft(argv: list[str], nproc: int = 1, timeout: float = 420) -> str:
    """Run the SFT CLI to completion; fail the test with the output's tail if it fails."""
    rc, out = _finish(_start(argv, nproc), timeout)
    assert rc == 0, f"exit code {rc}: {' '.join(_launcher(nproc) + argv)}\n{out[-LOG_TAIL:]}"
    return out


def save_test_reward_model(model_dir: Path, out: Path) -> Path:
    """A reward model for tests: the tiny LM with a fresh value head (seed 7) scaled by 30, so that
    rewards are of order 1 rather than 1/(hidden + 1); saved with its tokenizer."""
    import torch

    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.models.reward import load_value_model
    torch.manual_seed(7)
    rm = load_value_model(str(model_dir))
    with torch.no_grad():
        rm.score.weight.mul_(30.0)
    rm.save_pretrained(out)
    load_tokenizer(str(model_dir)).save_pretrained(out)
    return out



def tiny_policy(tmp_path_factory, tag: str) -> Path:
    """The RL tests' very small Llama (TINY_SIZES, seed 0), saved with its tokenizer."""
    from rlhf_ops.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp(f"{tag}_tiny") / "model", seed=0, **TINY_SIZES)


def forget_ray_auth() -> None:
    """Clear Ray's process-wide auth state before a test starts a local Ray in-process.

    A job client used earlier in this pytest process under a token-auth head (tasks/ray_jobs.py)
    leaves Ray's cached auth mode and token behind. A later local `ray.init()` then fails with
    "Failed to start GCS ... InvalidAuthToken". A fresh CLI process never has this state."""
    import os

    from ray._private.authentication_test_utils import reset_auth_token_state

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(k, None)
    reset_auth_token_state()
