"""vLLM engines as Ray actors placed with the role groups (`train_ppo_ray --vllm_num_engines N`).

Each engine is an `EngineActor` on its own bundle of the run's placement group (after the role
groups' bundles: `placement.bundles`), sized for --vllm_tensor_parallel_size worker processes. The
actor starts `VLLMGenerator`, whose vLLM process (and its TP workers) therefore runs on the actor's
node with the actor's GPUs (Ray's CUDA_VISIBLE_DEVICES is inherited) or, on a machine without
GPUs, its share of the node's cores (`engine_cpu_binds`, per node, one range per TP worker). Every
node that holds an engine needs the engine's interpreter (`.venv-vllm`, or $RLHF_VLLM_PYTHON,
which is passed on to the actors).

`RayEngines` is the RL loop's `Generator` over them: a call's prompts are cut into one contiguous
share of micro-batches per engine, sampled concurrently; prompt i's seed is the same whichever
engine gets it, so N engines return what one engine would. `sync_weights` runs before the first
rollout too, so a resumed run samples from its checkpoint. How the weights travel
(`weight_sync.sync_backend`):
  * gloo / nccl: actor rank 0 and the engines' vLLM processes form a process group on the first sync;
    each sync is one broadcast from rank 0 (gathered under ZeRO-3) that every engine reloads; with
    nccl the buffers stay on the GPUs (not run on a GPU yet; with --colocate_all it takes "ray");
  * ray (--vllm_sync_with_ray): rank 0 returns the packed weights from a Ray task, each engine
    actor fetches them from the object store and passes them to its vLLM process on the loopback.
With --vllm_enable_sleep (GPUs only; vLLM's sleep mode is CUDA-only, so this path has not run here)
the engines sleep after each rollout, their weights in host memory and their KV cache freed, and
wake before the next sync. A dead engine actor fails the run with
`RoleDied("vLLM engine 1 died during generate: ...")`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from rlhf_ops.generation.base import SamplingParams
from rlhf_ops.ray_rl.group import RoleGroup, await_all, get_or_died, shares, worker_env

logger = logging.getLogger(__name__)


def engine_cpu_binds(n: int, cores: Sequence[int], tp: int = 1) -> list[str | None]:
    """VLLM_CPU_OMP_THREADS_BIND for n engines of `tp` worker processes on one node: `cores` cut into
    n x tp contiguous shares, so they do not all pin themselves to CPU 0; an engine's TP workers get
    "|"-separated ranges ("0-1|2-3"). With fewer cores than processes, or a single process, None
    (vLLM's own default)."""
    cores = sorted(cores)
    if n * tp <= 1 or len(cores) < n * tp:
        return [None] * n
    per = len(cores) // (n * tp)
    share = lambda i: f"{cores[i * per]}-{cores[(i + 1) * per - 1]}"  # noqa: E731
    return ["|".join(share(e * tp + w) for w in range(tp)) for e in range(n)]


def binds_per_node(nodes: Sequence[tuple[str, Sequence[int]]], tp: int = 1) -> list[str | None]:
    """Engine e's bind, given each engine's (node id, usable cores): the engines of a node share its cores."""
    out: list[str | None] = [None] * len(nodes)
    for node in dict.fromkeys(n for n, _ in nodes):
        mine = [e for e, (n, _) in enumerate(nodes) if n == node]
        for e, bind in zip(mine, engine_cpu_binds(len(mine), nodes[mine[0]][1], tp)):
            out[e] = bind
    return out


class EngineActor:
    """One vLLM engine (a `VLLMGenerator`) inside a Ray actor; plain Python otherwise."""

    def __init__(self) -> None:
        self.gen: Any = None

    def where(self) -> tuple[str, list[int]]:
        """(node id, the cores this process may run on)."""
        import ray

        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def start(self, model_dir: str, tokenizer: Any, kwargs: dict) -> float:
        """Start the vLLM process; returns its start-up seconds."""
        from rlhf_ops.generation.vllm_engine import VLLMGenerator

        self.gen = VLLMGenerator(model_dir, tokenizer, **kwargs)
        return self.gen.start_s

    def generate(self, prompts: list[list[int]], params: SamplingParams, chunks: range) -> list[list[int]]:
        return self.gen.generate(prompts, params, chunks=chunks) if len(chunks) else []

    def join(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        """Join actor rank 0's `backend` weight-sync group (returns once every member has joined)."""
        self.gen.request_join(host, port, rank, world, backend)
        self.gen.finish()

    def receive(self) -> dict:
        """Receive one broadcast of the weights from the group `join` joined, and reload them."""
        self.gen.request_receive()
        return self.gen.finish()

    def load_packed(self, packed: tuple[dict, list]) -> dict:
        """Reload from weights that actor rank 0 packed (`weight_sync.pack`, `to_bytes`), fetched by Ray."""
        from rlhf_ops.generation.weight_sync import from_bytes

        header, arrays = packed
        return self.gen.load_packed(header, from_bytes(header, arrays))

    def call(self, op: str) -> dict:
        """A request without arguments ("sleep", "wake_up"): the engine's reply."""
        return self.gen.request(op)

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()


class RayEngines:
    """`Generator` over `cfg.vllm_num_engines` `EngineActor`s on bundles `first_bundle`... of `pg`, fed by the actor
    group, each taking `share` of its bundle (--colocate_all: the actor ranks' bundles, half each)."""

    def __init__(self, cfg: Any, tokenizer: Any, actor_group: RoleGroup, pg: Any, first_bundle: int, gpu: bool,
                 share: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rlhf_ops.generation.weight_sync import sync_backend

        self.group, self.micro = actor_group, cfg.micro_rollout_batch_size
        self.sleep, self.asleep = cfg.vllm_enable_sleep, False
        self.backend = sync_backend(cfg.vllm_sync_backend, gpu, cfg.vllm_sync_with_ray, shares_gpu=share < 1)
        self.joined = False
        env = worker_env(gpu, cfg.ray_cpus_per_rank)
        if os.environ.get("RLHF_VLLM_PYTHON"):
            env["RLHF_VLLM_PYTHON"] = os.environ["RLHF_VLLM_PYTHON"]
        cls, tp = ray.remote(EngineActor), cfg.vllm_tensor_parallel_size
        self.actors = [
            cls.options(num_cpus=cfg.ray_cpus_per_rank * tp * share, num_gpus=tp * share if gpu else 0,
                        runtime_env={"env_vars": env},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + e))
            .remote() for e in range(cfg.vllm_num_engines)]
        try:
            self._start(cfg, tokenizer, gpu)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Any, tokenizer: Any, gpu: bool) -> None:
        """Engines on different nodes start at once, engines sharing a node one after another (on a small
        machine concurrent start-ups only contend)."""
        where = self._get([a.where.remote() for a in self.actors], "start")
        binds = binds_per_node(where, cfg.vllm_tensor_parallel_size)
        kw = dict(enforce_eager=cfg.enforce_eager, enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
                  micro_batch_size=self.micro, sync_backend="gloo", tensor_parallel_size=cfg.vllm_tensor_parallel_size)
        if gpu:  # vLLM on CPU sizes its KV cache by VLLM_CPU_KVCACHE_SPACE instead
            kw.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_enable_sleep)
        per_node = {n: [e for e, (m, _) in enumerate(where) if m == n] for n, _ in where}
        start_s = [0.0] * len(self.actors)
        for wave in range(max(len(v) for v in per_node.values())):
            es = [v[wave] for v in per_node.values() if wave < len(v)]
            secs = self._get([self.actors[e].start.remote(cfg.pretrain, tokenizer, {**kw, "omp_threads_bind": binds[e]})
                              for e in es], "start", es)
            for e, s in zip(es, secs):
                start_s[e] = s
        logger.info("%d vLLM engine(s) of TP %d started as Ray actors on %d node(s) in %s s (CPU binds %s; weights "
                    "sync over %s)", len(self.actors), cfg.vllm_tensor_parallel_size, len(per_node),
                    ", ".join(f"{s:.1f}" for s in start_s), binds, self.backend)

    def _get(self, refs: list, method: str, engines: Sequence[int] | None = None) -> list:
        """ray.get of every engine's call, in the order they finish, so the first failure is reported at once
        (a dead engine named; a VLLMError raised inside an engine re-raised with its number)."""
        nums = list(engines if engines is not None else range(len(refs)))
        got = await_all({ref: (lambda r, e=e: self._get_one(r, e, method)) for e, ref in zip(nums, refs)})
        return [got[ref] for ref in refs]

    @staticmethod
    def _get_one(ref: Any, e: int, method: str) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return get_or_died(ref, f"vLLM engine {e}", method)
        except RayTaskError as err:
            from rlhf_ops.generation.vllm_engine import VLLMError

            if isinstance(err.cause, VLLMError):
                raise VLLMError(f"vLLM engine {e}, {method}: {err.cause}") from None
            raise

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        parts = shares(-(-len(prompts) // self.micro), len(self.actors))
        prompts = [list(p) for p in prompts]
        self._wake()
        out = self._get([a.generate.remote(prompts, params, c) for a, c in zip(self.actors, parts)], "generate")
        if self.sleep:  # --vllm_enable_sleep: the GPU memory goes back to training until the next sync
            self._get([a.call.remote("sleep") for a in self.actors], "sleep")
            self.asleep = True
        return [x for part in out for x in part]

    def _wake(self) -> None:
        if self.asleep:
            self._get([a.call.remote("wake_up") for a in self.actors], "wake_up")
            self.asleep = False

    def sync_weights(self, model: Any = None) -> None:
        t0 = time.perf_counter()
        self._wake()
        if self.backend == "ray":
            packed = self.group.run("put_actor_weights")[0][0]  # a reference: the bytes stay in rank 0's object store
            replies = self._get([a.load_packed.remote(packed) for a in self.actors], "load_packed")
            del packed
        else:
            if not self.joined:
                world = len(self.actors) + 1
                host, port = self.group.call_ranks("open_weight_sync", {0: (world, self.backend)})[0]
                joins = [a.join.remote(host, port, rank, world, self.backend) for rank, a in enumerate(self.actors, 1)]
                self.group.call_ranks("connect_weight_sync", {0: ()})
                self._get(joins, "join")
                self.joined = True
            receives = [a.receive.remote() for a in self.actors]
            sends = self.group.submit("broadcast_actor_weights", {r: () for r in range(self.group.world)})
            # engines and senders watched together: an engine that dies mid-broadcast fails the sync by name at
            # once, not after the sync group's timeout (its sender stays blocked until the run's cleanup)
            got = await_all({**{ref: (lambda r, e=e: self._get_one(r, e, "receive")) for e, ref in enumerate(receives)},
                             **{ref: (lambda r, k=k: self.group.gather({k: r}, "broadcast_actor_weights"))
                                for k, ref in sends.items()}})
            replies = [got[ref] for ref in receives]
        logger.debug("weights synced to %d engine(s) over %s in %.2f s (engine reloads %s s)", len(self.actors),
                     self.backend, time.perf_counter() - t0,
                     ", ".join(f"{r.get('engine_reload_s', 0.0):.2f}" for r in replies))

    def close(self) -> None:
        """Stop every engine's vLLM process, then its actor."""
        import ray

        ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=90)
        for a in self.actors:
            ray.kill(a, no_restart=True)
