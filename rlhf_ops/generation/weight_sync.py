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

Backends: "gloo" (CPU tensors; the only one built and tested here). "nccl" needs CUDA tensors on
both sides and the CUDA vLLM; it is not built, so `sync_backend` maps it to gloo on a CPU machine
and to the file backend on a GPU one, and says so in the log.
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


def sync_backend(requested: str, on_gpu: bool) -> str:
    """The backend that will carry the weights: "gloo" or "file" (see the module docstring)."""
    if requested == "gloo":
        return "gloo"
    if requested == "nccl" and not on_gpu:
        logger.info("--vllm_sync_backend nccl needs CUDA GPUs; this machine has none, so the weights go over gloo")
        return "gloo"
    logger.warning("--vllm_sync_backend %s is not built yet; the weights go through a safetensors file", requested)
    return "file"


def _broadcast(pg: Any, t: torch.Tensor) -> None:
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


class WeightSender:
    """Rank 0 of a weight-sync group of `world` processes: `send(state_dict)` broadcasts it to ranks 1..N.

    The constructor opens the group's store on `host`:`port` (0: a free port, then in `.port`);
    ask every engine to join there, then `connect()`, which returns once all have joined.
    """

    def __init__(self, host: str, port: int = 0, world: int = 2, timeout: datetime.timedelta = TIMEOUT):
        import torch.distributed as dist

        self.store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        self.host, self.port, self.world, self.timeout = host, self.store.port, world, timeout
        self.pg: Any = None

    def connect(self) -> None:
        import torch.distributed as dist

        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(PREFIX, self.store), 0, self.world, self.timeout)

    def send(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Broadcast `state_dict` (CPU tensors); returns the bytes sent per engine."""
        dtype = {k: str(t.dtype).removeprefix("torch.") for k, t in state_dict.items()}  # "float32", "bfloat16", ...
        header = {"tensors": [[k, dtype[k], list(t.shape)] for k, t in state_dict.items()], "flat": []}
        flats = []
        for dt in sorted(set(dtype.values())):
            parts = [t.detach().reshape(-1) for k, t in state_dict.items() if dtype[k] == dt]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            header["flat"].append([dt, flat.numel()])
            flats.append(flat)
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        _broadcast(self.pg, torch.tensor([raw.numel()], dtype=torch.int64))
        _broadcast(self.pg, raw)
        for flat in flats:
            _broadcast(self.pg, flat)
        return raw.numel() + sum(f.numel() * f.element_size() for f in flats)
