"""RoleWorker: one rank of a Ray worker group, holding the models of its roles.

The models are built exactly as `train_ppo` builds them (`rl.setup.load_models`), and every
method runs the single-process code on this rank's share of the rows: `Models.old_logprobs`,
`ref_logprobs` and `values` for experience making, `reward_model_scores` for the reward model,
`run_updates` for training, `utils.checkpoint` for saving. The driver (`ray_rl.driver`) decides
the shares so that each rank sees whole --micro_rollout_batch_size chunks of the rows and the
results concatenate back in order.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from rlhf_ops.generation.base import HFGenerator, SamplingParams


class RoleWorker:
    """Made a Ray actor by `RoleGroup` (ray.remote(RoleWorker)); plain Python otherwise."""

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the group's MASTER_ADDR/MASTER_PORT (rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, env: dict[str, str], cfg: Any, roles: Sequence[str], steps: int) -> None:
        """Join the group's process group (`env`: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) and load `roles`
        for a learning-rate schedule of `steps` optimizer steps."""
        from rlhf_ops.models.loading import load_tokenizer
        from rlhf_ops.rl.experience import Models
        from rlhf_ops.rl.setup import load_models
        from rlhf_ops.utils import malloc

        malloc.tune()

        os.environ.update(env)
        # as train_ppo's build. Loading pretrained weights draws nothing, so a new critic head draws what it draws
        # there, except after LoRA adapters that train_ppo initialises first (--lora_rank with a separate critic)
        torch.manual_seed(cfg.seed)
        self.cfg, self.roles = cfg, tuple(roles)
        self.tokenizer = load_tokenizer(cfg.pretrain, cfg.tokenizer_chat_template)
        self.m = load_models(cfg, self.tokenizer, list(roles), steps)
        actor, critic = self.m.get("actor"), self.m.get("critic")
        # under ZeRO-3 every rank must run the same forwards (collective weight gathers), so no rank may
        # skip its old-logprob forward on the strength of its own records
        record = cfg.use_rollout_logprobs and not (cfg.zero_stage == 3 and int(env.get("WORLD_SIZE", "1")) > 1)
        self.gen = HFGenerator(actor.module, self.tokenizer, cfg.micro_rollout_batch_size, record) if actor else None
        self.models = Models(actor.module if actor else None, self.m.get("ref"), critic.module if critic else None,
                             self.gen, None, self.tokenizer.pad_token_id)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------ experience

    def generate(self, prompts: list[list[int]], params: SamplingParams, keep: range) -> list[list[int]]:
        return self.gen.generate(prompts, params, chunks=keep)

    def open_weight_sync(self, world: int, backend: str = "gloo") -> tuple[str, int]:
        """Rank 0: open a `backend` weight-sync group for itself and `world` - 1 vLLM engines
        (`generation.weight_sync`); returns the address the engines join at."""
        import ray

        from rlhf_ops.generation.weight_sync import WeightSender

        self.sender = WeightSender(ray.util.get_node_ip_address(), 0, world, backend=backend)
        return self.sender.host, self.sender.port

    def connect_weight_sync(self) -> None:
        """Rank 0: returns once every engine has joined the group `open_weight_sync` opened."""
        self.sender.connect()

    def broadcast_actor_weights(self) -> None:
        """The actor's full HF-named weights to every engine of the weight-sync group (rank 0 sends;
        under ZeRO-3 every rank takes part in the gather)."""
        from rlhf_ops.generation.vllm_engine import full_hf_state_dict

        sender = getattr(self, "sender", None)  # rank 0's; the other ranks only join a ZeRO-3 gather
        sd = full_hf_state_dict(self.m["actor"].module, sender.device if sender else "cpu")  # nccl: stays on the GPU
        if sd is not None:
            sender.send(sd)

    def put_actor_weights(self) -> list | None:
        """Rank 0: [a Ray reference to the actor's packed weights] (`weight_sync.pack`, as uint8 arrays), for
        the engines to fetch (--vllm_sync_with_ray); None on the other ranks, which take part in the ZeRO-3 gather."""
        import ray

        from rlhf_ops.generation.vllm_engine import full_hf_state_dict
        from rlhf_ops.generation.weight_sync import pack, to_bytes

        sd = full_hf_state_dict(self.m["actor"].module)
        if sd is None:
            return None
        header, flats = pack(sd)
        return [ray.put((header, to_bytes(flats)))]

    def forward(self, role: str, seqs: list[list[int]], plens: list[int], rounds: int = 0,
                filler: tuple[list[list[int]], list[int]] | None = None) -> torch.Tensor:
        """Per-action values [N] of `role` (actor: old logprobs, ref: reference logprobs, critic: values).

        ZeRO-3 lockstep (`driver.lockstep`): a rank with fewer than `rounds` chunks runs the extra forwards
        on `filler` rows and drops their output, so its collective weight gathers match its peers'."""
        from rlhf_ops.rl.experience import rollout_logprobs

        if role == "actor" and seqs and self.gen is not None:
            # --use_rollout_logprobs: this rank sampled these rows (chunks and forward shares coincide) and
            # recorded their logprobs; the lookup also clears the record. Off under ZeRO-3 lockstep (above).
            recorded = rollout_logprobs(self.gen, seqs, plens)
            if recorded is not None:
                return recorded
        fn = {"actor": self.models.old_logprobs, "ref": self.models.ref_logprobs, "critic": self.models.values}[role]
        with self._resident(role):
            out = fn(seqs, plens, self.cfg) if seqs else torch.zeros(0)
            for _ in range(rounds - -(-len(seqs) // self.cfg.micro_rollout_batch_size)):
                fn(*filler, self.cfg)
        return out

    def reward_scores(self, seqs: list[list[int]]) -> torch.Tensor:
        from rlhf_ops.rl.rewards import ScoringOptions
        from rlhf_ops.rl.setup import reward_model_scores

        with self._resident("reward"):
            return reward_model_scores(self.m["reward"], ScoringOptions.of(self.cfg), self.tokenizer.pad_token_id, seqs)

    def _resident(self, role: str) -> Any:
        """--ref_reward_offload: the frozen model of `role` on the accelerator for this block only."""
        from contextlib import nullcontext

        from rlhf_ops.distributed.device import accelerator, resident

        if role in ("ref", "reward") and self.cfg.ref_reward_offload:
            return resident(self.m[role], accelerator())
        return nullcontext()

    # ------------------------------------------------------------------------------------ training

    def train(self, exp: Any, steps: list, kl_coef: float, train_actor: bool) -> tuple[dict[str, float], int]:
        """This rank's micro-batches of each optimizer step through its trained engines: (metric sums, count)."""
        from rlhf_ops.rl.update import run_updates

        actor = self.m.get("actor") if train_actor else None
        return run_updates(exp, actor, self.m.get("critic"), self.cfg, kl_coef, self.tokenizer.pad_token_id, steps)

    def lr(self) -> float:
        return self.m["actor"].lr

    # ------------------------------------------------------------------------------------ saving

    def engines(self) -> dict[str, Any]:
        return {name: self.m[name].module for name in ("actor", "critic") if name in self.m}

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        """Write this group's engines under `directory/<role>` (the driver moves the `latest_good` pointer)."""
        from rlhf_ops.utils.checkpoint import rng_state

        for i, (name, engine) in enumerate(self.engines().items()):
            state = dict(client_state, rng=rng_state()) if i == 0 else {}
            engine.save_checkpoint(directory, tag=name, client_state=state, save_latest=False)
        torch.distributed.barrier()

    def load_checkpoint(self, ckpt_path: str) -> dict | None:
        from rlhf_ops.utils.checkpoint import load_checkpoint

        return load_checkpoint(self.engines(), ckpt_path)

    def save_model(self, role: str, path: str, extra_files: dict[str, str]) -> None:
        from rlhf_ops.models.reward import head_key_prefixes
        from rlhf_ops.utils.checkpoint import save_hf_model

        prefixes = head_key_prefixes(self.cfg.value_head_prefix) if role == "critic" else None
        save_hf_model(self.m[role].module, self.tokenizer, path, extra_files, key_prefixes=prefixes)

    def ping(self) -> int:
        """This rank's process id (a liveness check)."""
        return os.getpid()
