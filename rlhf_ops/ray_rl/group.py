"""RoleGroup: the Ray actors (one per rank) of one worker group, and calls that gather their results.

A group forms its own torch.distributed process group (gloo on CPU, nccl on GPU): rank 0 picks
its node's address and a free port, then every rank gets MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE and LOCAL_RANK before it builds its DeepSpeed engines. LOCAL_RANK is 0: Ray gives each
GPU actor its own CUDA_VISIBLE_DEVICES, in which its GPU is device 0.

A dead rank surfaces as `RoleDied("actor rank 1 died during train: ...")`. An error raised inside
a rank that the CLI reports in one line (bad config, data or rewards, a non-finite loss) is
re-raised as itself; anything else keeps Ray's remote traceback.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from rlhf_ops.ray_rl.placement import GroupSpec

# environment the workers inherit from the driver (threads, offline switches, accelerator, trackers)
PASS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
            "TRANSFORMERS_OFFLINE", "HF_HOME", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR")


class RoleDied(RuntimeError):
    """A rank's process died (killed, out of memory, crashed); the message names the group and rank."""


def get_or_died(ref: Any, who: str, method: str) -> Any:
    """ray.get(ref); if the actor behind it died, RoleDied("{who} died during {method}: <Ray's reason>")."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

    try:
        return ray.get(ref)
    except (RayActorError, ActorUnavailableError, WorkerCrashedError) as e:
        raise RoleDied(f"{who} died during {method}: {' '.join(str(e).split())[:400]}") from None


def await_all(pending: dict[Any, Callable[[Any], Any]], grace: float = 10.0) -> dict[Any, Any]:
    """{ref: getter(ref)} for every Ray reference in `pending`, each got as soon as it is ready.

    On a failure the other calls get `grace` seconds to report, and a dead actor (`RoleDied`) is
    blamed first: its peers' collectives fail as a consequence (gloo: "connection closed by peer").
    """
    import ray

    pending, out = dict(pending), {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        try:
            out[ready[0]] = pending.pop(ready[0])(ready[0])
        except RoleDied:
            raise
        except BaseException:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace)
            for ref in done:
                try:
                    pending[ref](ref)
                except RoleDied:
                    raise
                except BaseException:
                    pass
            raise
    return out


def shares(n: int, world: int) -> list[range]:
    """Split range(n) into `world` contiguous, balanced, in-order parts (the first n % world get one more)."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (r < extra)
        out.append(range(start, stop))
        start = stop
    return out


def worker_env(gpu: bool, cpus_per_rank: float) -> dict[str, str]:
    import os

    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus_per_rank))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpu:
        env.pop("DS_ACCELERATOR", None)  # a CPU-only driver's setting must not pin GPU workers to the CPU
    else:
        env["DS_ACCELERATOR"] = "cpu"
    return env


class RoleGroup:
    """`spec.ranks` Ray actors of `worker_cls` (default `worker.RoleWorker`) on bundles `first_bundle`... of `pg`,
    each taking `share` of its bundle (below 1 when vLLM engines share the bundles: --colocate_all)."""

    def __init__(self, spec: GroupSpec, pg: Any, first_bundle: int, gpu: bool, cpus_per_rank: float,
                 worker_cls: type | None = None, share: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rlhf_ops.ray_rl.worker import RoleWorker

        self.spec, self.name = spec, spec.name
        cls = ray.remote(worker_cls or RoleWorker)
        env = worker_env(gpu, cpus_per_rank)
        self.workers = [
            cls.options(num_cpus=cpus_per_rank * share, num_gpus=share if gpu else 0, runtime_env={"env_vars": env},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + r))
            .remote() for r in range(spec.ranks)]

    @property
    def world(self) -> int:
        return len(self.workers)

    def start(self, cfg: Any, steps: int) -> dict[int, Any]:
        """Form the group's process group and load its models on every rank; returns the pending calls
        (`gather(..., "setup")` them), so that several groups start at the same time."""
        addr, port = self.call_ranks("rendezvous", {0: ()})[0]
        envs = [{"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": str(self.world),
                 "LOCAL_RANK": "0"} for r in range(self.world)]
        return self.submit("setup", {r: (envs[r], cfg, self.spec.roles, steps) for r in range(self.world)})

    def run(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every rank; results in rank order."""
        return self.call_ranks(method, {r: args for r in range(self.world)})

    def call_ranks(self, method: str, args: dict[int, Sequence[Any]]) -> list[Any]:
        """Call `method` on the ranks in `args` (rank -> arguments); results in rank order."""
        return self.gather(self.submit(method, args), method)

    def submit(self, method: str, args: dict[int, Sequence[Any]]) -> dict[int, Any]:
        return {r: getattr(self.workers[r], method).remote(*a) for r, a in args.items()}

    def gather(self, refs: dict[int, Any], method: str, grace: float = 10.0) -> list[Any]:
        """Wait for every rank (`await_all`: a dead rank is blamed before its peers' failures)."""
        got = await_all({ref: (lambda x, r=r: self._get(x, r, method)) for r, ref in refs.items()}, grace)
        return [got[refs[r]] for r in sorted(refs)]

    def _get(self, ref: Any, rank: int, method: str) -> Any:
        from ray.exceptions import RayTaskError

        from rlhf_ops.config import ConfigError
        from rlhf_ops.data.sources import DataError
        from rlhf_ops.rl.rewards import RewardError

        try:
            return get_or_died(ref, f"{self.name} rank {rank}", method)
        except RayTaskError as e:
            if isinstance(e.cause, (ConfigError, DataError, RewardError, FloatingPointError)):
                raise e.cause from None
            raise

    def kill(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
