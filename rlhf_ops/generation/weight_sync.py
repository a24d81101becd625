"""Actor -> vLLM engine weight sync over a torch.distributed broadcast (--vllm_sync_backend).

The sender (the actor's rank 0, or the process that owns a single engine) and every engine form
a process group of their own, apart from DeepSpeed's: its own TCPStore on a free port, rank 0 the
sender, ranks 1..N the engines. Each sync is three broadcasts from rank 0, whatever the model:

1. an int64 [1]: the byte length of a JSON header;
2. a uint8 [length]: the header, {"tensors": [[name, dtype, shape], ...], "flat": [[dtype, numel], ...]};
3. one flat buffer per dtype (in the header's "flat" order), the tensors laid end to end.

The engine side (`vllm_server.WeightReceiver`, which imports nothing from this package because it
runs under vLLM's own interpreter) mirrors these steps and hands the tensors to vLLM's
`reload_weights`. Compared with the safetensors file the file backend writes and reloads, no
bytes touch the disk, and N engines receive one broadcast instead of N file reads.

Backends (`sync_backend`):
  * "gloo": the broadcast above, rank 0 and the engines in one group (CPU tensors; any machine).
  * "nccl": the same broadcast in a `ProcessGroupNCCL`, every buffer a CUDA tensor on the sender's
    and each engine's current GPU: no copy through host memory. NCCL puts one rank per GPU, so an
    engine that shares the sender's GPU (--colocate_all) cannot join; `sync_backend` then takes
    "ray". On a machine without CUDA it takes "gloo", and a sender or receiver asked for "nccl"
    there raises. Written for the CUDA vLLM; **it has not run on a GPU yet** (no GPU was lent to
    the sessions that built it): tests here cover the shared protocol over gloo and the choice.
  * "ray" (--vllm_sync_with_ray): the same packed buffers (`pack`) go through Ray's object store:
    actor rank 0 returns them from a task, every engine's Ray actor (`ray_rl.engines`) fetches
    them, zero-copy on rank 0's node, and hands them to its own vLLM process over a two-process
    gloo group on the loopback. Only Ray's own connections cross machines. Why not
    `ray.util.collective`: its gloo group initialises torch's default process group, which
    DeepSpeed already owns in the actor's processes, and its NCCL group needs CUDA.
"""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)
PREFIX = "rlhf_weight_sync"
TIMEOUT = datetime.timedelta(minutes=10)


BACKENDS = ("gloo", "nccl")


def sync_backend(requested: str, on_gpu: bool, with_ray: bool = False, shares_gpu: bool = False) -> str:
    """The backend that will carry the weights: "gloo", "nccl" or "ray" (see the module docstring).
    `shares_gpu`: an engine runs on the sender's GPU (--colocate_all), which NCCL cannot group."""
    if with_ray:
        return "ray"
    if requested == "gloo":
        return "gloo"
    if requested != "nccl":
        raise ValueError(f"--vllm_sync_backend must be one of {BACKENDS}, got {requested!r}")
    if not on_gpu:
        logger.info("--vllm_sync_backend nccl needs CUDA GPUs; this machine has none, so the weights go over gloo")
        return "gloo"
    if shares_gpu:
        logger.info("--vllm_sync_backend nccl: the engines share the actor's GPUs (--colocate_all) and NCCL takes one "
                    "rank per GPU, so the weights go through Ray's object store")
        return "ray"
    return "nccl"


def check_backend(backend: str) -> None:
    """Raise unless this process can take part in a `backend` weight-sync group."""
    if backend not in BACKENDS:
        raise ValueError(f"weight-sync backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        raise RuntimeError("weight sync over nccl needs a CUDA GPU and a torch built with NCCL; this process has "
                           f"CUDA {torch.cuda.is_available()}, NCCL {torch.distributed.is_nccl_available()} "
                           "(use --vllm_sync_backend gloo)")


def process_group(backend: str, store: Any, rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """A `backend` process group of its own over `store` (apart from the default group DeepSpeed owns)."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore(PREFIX, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world, opts)
    return dist.ProcessGroupGloo(prefixed, rank, world, timeout)


def sync_device(backend: str) -> torch.device:
    """Where the broadcast buffers live: the current GPU for nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def pack(state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
    """(header, flat buffers): what one sync sends, whatever the transport (module docstring)."""
    dtype = {k: str(t.dtype).removeprefix("torch.") for k, t in state_dict.items()}  # "float32", "bfloat16", ...
    header: dict = {"tensors": [[k, dtype[k], list(t.shape)] for k, t in state_dict.items()], "flat": []}
    flats = []
    for dt in sorted(set(dtype.values())):
        parts = [t.detach().reshape(-1) for k, t in state_dict.items() if dtype[k] == dt]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        header["flat"].append([dt, flat.numel()])
        flats.append(flat)
    return header, flats


def to_bytes(flats: list[torch.Tensor]) -> list:
    """Flat buffers as uint8 numpy arrays (no copy): Ray stores and reads numpy without pickling."""
    return [f.contiguous().view(torch.uint8).numpy() for f in flats]


def from_bytes(header: dict, arrays: list) -> list[torch.Tensor]:
    """`to_bytes` undone: the flat buffers with their dtypes (views of `arrays`, which Ray may hand over read-only)."""
    import warnings

    with warnings.catch_warnings():  # read-only numpy -> tensor: the buffers are only ever read
        warnings.simplefilter("ignore", UserWarning)
        return [torch.from_numpy(a).view(getattr(torch, dt)) for a, (dt, _) in zip(arrays, header["flat"])]


def _broadcast(pg: Any, t: torch.Tensor) -> None:
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


class WeightSender:
    """Rank 0 of a weight-sync group of `world` processes: `send(state_dict)` broadcasts it to ranks 1..N.

    The constructor opens the group's store on `host`:`port` (0: a free port, then in `.port`);
    ask every engine to join there (with the same `backend`), then `connect()`, which returns once
    all have joined. `.device` is where the buffers go (the current GPU for nccl): hand `send`
    tensors there and nothing is copied on the way.
    """

    def __init__(self, host: str, port: int = 0, world: int = 2, timeout: datetime.timedelta = TIMEOUT,
                 backend: str = "gloo"):
        import torch.distributed as dist

        check_backend(backend)
        self.backend, self.device = backend, sync_device(backend)
        self.store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        self.host, self.port, self.world, self.timeout = host, self.store.port, world, timeout
        self.pg: Any = None

    def connect(self) -> None:
        self.pg = process_group(self.backend, self.store, 0, self.world, self.timeout)

    def send(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Broadcast `state_dict`; returns the bytes sent per engine."""
        return self.send_packed(*pack(state_dict))

    def send_packed(self, header: dict, flats: list[torch.Tensor]) -> int:
        """Broadcast what `pack` made; returns the bytes sent per engine."""
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        _broadcast(self.pg, torch.tensor([raw.numel()], dtype=torch.int64).to(self.device))
        _broadcast(self.pg, raw.to(self.device))
        for flat in flats:
            _broadcast(self.pg, flat.to(self.device))
        if self.device.type == "cuda":  # the broadcasts are queued on the GPU: done before the buffers are freed
            torch.cuda.current_stream(self.device).synchronize()
        return raw.numel() + sum(f.numel() * f.element_size() for f in flats)
