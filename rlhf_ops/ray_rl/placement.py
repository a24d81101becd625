"""Placement: which roles share worker processes, and one Ray placement-group bundle per rank.

A *group* is a set of worker processes (one per rank) with its own torch.distributed process
group; colocated roles live in the same processes, so they share bundles, as the flags say:

    --colocate_all_models      one group "actor" holding every model (and --colocate_all)
    --colocate_actor_ref       the reference model in the actor's processes
    --colocate_critic_reward   the reward model in the critic's processes

On a cluster with GPUs a bundle is {GPU: 1, CPU: --ray_cpus_per_rank}. On a cluster without GPUs
each "GPU" of the `--<role>_num_gpus_per_node` options becomes one CPU process, a bundle
{CPU: --ray_cpus_per_rank}: a fraction (0.5) lets a 2-core CI machine place 3-4 tiny ranks,
at the price of oversubscribed cores. Each vLLM engine (--vllm_num_engines) gets one more bundle,
after the groups', as large as --vllm_tensor_parallel_size ranks ({GPU: tp, CPU: tp x cpus}): its
TP workers share one node (`ray_rl.engines`). Bundles are packed (strategy PACK): `num_nodes` counts
ranks here, it does not pin them to distinct machines.

The arithmetic (`plan_groups`, `bundles`, `check_fits`) is pure and tested without Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_ops.config import ConfigError


class PlacementError(ConfigError):
    """The cluster cannot hold the ranks asked for; the message gives the numbers."""


@dataclass(frozen=True)
class GroupSpec:
    name: str               # the group's own role, also its name in messages: "actor rank 1 died ..."
    roles: tuple[str, ...]  # the models each of its processes holds, e.g. ("actor", "ref")
    num_nodes: int
    gpus_per_node: int

    @property
    def ranks(self) -> int:
        return self.num_nodes * self.gpus_per_node


def plan_groups(cfg: Any) -> list[GroupSpec]:
    """The worker groups of a RayPPOConfig, actor first; every role the run needs is in exactly one."""
    need = cfg.roles()
    layout = lambda r: (getattr(cfg, f"{r}_num_nodes"), getattr(cfg, f"{r}_num_gpus_per_node"))  # noqa: E731
    if cfg.colocate_all_models or cfg.colocate_all:
        return [GroupSpec("actor", tuple(need), *layout("actor"))]
    owner = {r: r for r in need}
    if cfg.colocate_actor_ref and "ref" in need:
        owner["ref"] = "actor"
    if cfg.colocate_critic_reward and "reward" in need and "critic" in need:
        owner["reward"] = "critic"
    names = [r for r in ("actor", "critic", "ref", "reward") if owner.get(r) == r]
    return [GroupSpec(n, tuple(r for r in need if owner[r] == n), *layout(n)) for n in names]


def bundles(groups: list[GroupSpec], gpu: bool, cpus_per_rank: float, engines: int = 0,
            tp: int = 1) -> list[dict[str, float]]:
    """One bundle per rank, groups in order (group i's ranks start at the sum of the earlier groups' ranks),
    then one per vLLM engine of `tp` ranks."""
    def size(n: int) -> dict[str, float]:
        return {"GPU": float(n), "CPU": cpus_per_rank * n} if gpu else {"CPU": cpus_per_rank * n}
    return [size(1) for _ in range(sum(g.ranks for g in groups))] + [size(tp) for _ in range(engines)]


def describe(groups: list[GroupSpec], engines: int = 0, tp: int = 1) -> str:
    """"actor+ref (1 nodes x 2), critic+reward (1 nodes x 1), 2 vLLM engines x TP 2": each group, the roles it
    holds, its layout; then the engines."""
    parts = ["+".join([g.name, *(r for r in g.roles if r != g.name)]) + f" ({g.num_nodes} nodes x {g.gpus_per_node})"
             for g in groups]
    if engines:
        parts.append(f"{engines} vLLM engine{'s' * (engines > 1)}" + (f" x TP {tp}" if tp > 1 else ""))
    return ", ".join(parts)


def check_fits(groups: list[GroupSpec], gpu: bool, cpus_per_rank: float, cluster: dict[str, float],
               engines: int = 0, tp: int = 1) -> None:
    """Raise PlacementError with the numbers when the cluster's total resources cannot hold the bundles."""
    ranks = sum(g.ranks for g in groups) + engines * tp
    has_gpu, has_cpu = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if gpu and ranks > has_gpu:
        raise PlacementError(f"asked for {ranks} GPUs for {describe(groups, engines, tp)}, the cluster has {has_gpu:g}")
    need_cpu = ranks * cpus_per_rank
    if need_cpu > has_cpu + 1e-9:
        where = "" if gpu else " (no GPUs in the cluster: each GPU is one CPU process)"
        raise PlacementError(f"asked for {ranks} ranks x {cpus_per_rank:g} CPU = {need_cpu:g} CPUs{where} for "
                             f"{describe(groups, engines, tp)}, the cluster has {has_cpu:g} CPUs; lower the ranks or "
                             "--ray_cpus_per_rank")


def place(groups: list[GroupSpec], cpus_per_rank: float, timeout: float, engines: int = 0, tp: int = 1) -> tuple[Any, bool]:
    """Check, create and wait for the placement group: (placement group, gpu mode). Fails fast, never hangs."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cluster = ray.cluster_resources()
    gpu = cluster.get("GPU", 0.0) > 0
    check_fits(groups, gpu, cpus_per_rank, cluster, engines, tp)
    pg = placement_group(bundles(groups, gpu, cpus_per_rank, engines, tp), strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(f"the placement group for {describe(groups, engines, tp)} was not ready after {timeout:g} s "
                             f"(--placement_timeout); available now: {ray.available_resources()}") from None
    return pg, gpu
