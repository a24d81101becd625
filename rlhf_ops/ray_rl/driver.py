"""The driver of `train_ppo_ray`: the single-process loop (`trainers.rl.run_rl`) over Ray role groups.

The driver holds the prompts, the reward function, the KL controller and the metrics; the models
live in worker groups (`placement.plan_groups`). `RemoteModels` and `RemoteGenerator` stand in for
local modules: rows are cut into --micro_rollout_batch_size chunks, exactly the chunks one process
would use, each rank of the holding group gets a contiguous run of chunks, and results are
concatenated back in order. Sampling seeds follow the chunk, not the rank (`HFGenerator.generate(..., chunks=)`),
so N actor ranks produce the rollout one process would. Under ZeRO-3 every forward of a trained
model gathers its partitioned weights collectively, so those groups run in lockstep (`lockstep`):
all ranks are called, and a rank with fewer chunks runs filler forwards.

Training is data parallel: every optimizer step of `plan_updates` has M = world x accumulation
micro-batches, rank r of a trained group takes its contiguous M / world of them, and the loss
scales are computed once over all M (`token_mean_scales`), so after DeepSpeed's all-reduce the
gradient is the step's token mean, as in one process.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf_ops.generation.base import SamplingParams
from rlhf_ops.ray_rl.group import RoleGroup, shares
from rlhf_ops.rl.experience import Models
from rlhf_ops.rl.setup import RLSetup

logger = logging.getLogger(__name__)


def chunk_shares(n_rows: int, chunk: int, world: int) -> list[range]:
    """Row ranges per rank: contiguous runs of whole `chunk`-row chunks, balanced, in order."""
    return [range(min(c.start * chunk, n_rows), min(c.stop * chunk, n_rows))
            for c in shares(-(-n_rows // chunk), world)]


def lockstep(cfg: Any, group: RoleGroup) -> bool:
    """ZeRO-3 engines gather their partitioned weights collectively at every forward, so each rank of a
    trained group must then run as many forwards as its peers (and be called even with no rows)."""
    return cfg.zero_stage == 3 and group.world > 1 and bool({"actor", "critic"} & set(group.spec.roles))


class RemoteGenerator:
    """`Generator` over the actor group: rank r samples its chunks of the prompts."""

    def __init__(self, group: RoleGroup, micro_batch_size: int, lockstep: bool = False):
        self.group, self.micro, self.lockstep = group, micro_batch_size, lockstep

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        chunks = shares(-(-len(prompts) // self.micro), self.group.world)
        prompts = [list(p) for p in prompts]
        out = self.group.call_ranks("generate", {r: (prompts[:c.stop * self.micro], params, c)
                                                 for r, c in enumerate(chunks) if len(c) or self.lockstep})
        return [x for part in out for x in part]

    def sync_weights(self, model: Any) -> None:
        """Nothing to copy: the actor ranks generate on their live training weights."""


class RemoteModels(Models):
    """`Models` whose forwards run on the groups holding each role (`holder`: role -> group)."""

    def __init__(self, holder: dict[str, RoleGroup], generator: RemoteGenerator, score: Any, pad_id: int):
        super().__init__(None, None, None, generator, score, pad_id)  # type: ignore[arg-type]
        self.holder = holder

    def _remote(self, role: str, seqs: list[list[int]], plens: list[int], cfg: Any) -> torch.Tensor | None:
        group = self.holder.get(role)
        if group is None:
            return None
        micro = cfg.micro_rollout_batch_size
        parts = chunk_shares(len(seqs), micro, group.world)
        lock = lockstep(cfg, group) and role in ("actor", "critic")
        pad = (max(-(-len(p) // micro) for p in parts), (seqs[:1], plens[:1])) if lock else (0, None)
        out = group.call_ranks("forward", {r: (role, seqs[p.start:p.stop], plens[p.start:p.stop], *pad)
                                           for r, p in enumerate(parts) if len(p) or lock})
        return torch.cat(out)

    def old_logprobs(self, sequences, prompt_lens, cfg):
        return self._remote("actor", sequences, prompt_lens, cfg)

    def ref_logprobs(self, sequences, prompt_lens, cfg):
        return self._remote("ref", sequences, prompt_lens, cfg)

    def values(self, sequences, prompt_lens, cfg):
        return self._remote("critic", sequences, prompt_lens, cfg)


def remote_reward_scores(group: RoleGroup, micro: int):
    def rm_scores(seqs: list[list[int]]) -> torch.Tensor:
        parts = chunk_shares(len(seqs), micro, group.world)
        return torch.cat(group.call_ranks("reward_scores", {r: (seqs[p.start:p.stop],) for r, p in enumerate(parts) if len(p)}))
    return rm_scores


@dataclass
class RaySetup(RLSetup):
    """`RLSetup` whose engines live in Ray groups (`actor`/`critic` fields are None)."""
    groups: dict[str, RoleGroup]   # group name -> group
    holder: dict[str, RoleGroup]   # role -> the group whose processes hold it
    pg: Any

    def train(self, exp: Any, train_actor: bool, kl_coef: float, seed: int) -> dict[str, float]:
        import ray

        from rlhf_ops.rl.update import plan_updates

        steps = plan_updates(exp.response_lens, self.cfg, seed)
        ref = ray.put(exp)
        trained = {g for role, g in self.holder.items() if role == "critic" or (role == "actor" and train_actor)}
        pending = []
        for g in trained:  # every trained group at once; each rank takes its contiguous share of each step
            mine = lambda r, w=g.world: [s[len(s) * r // w:len(s) * (r + 1) // w] for s in steps]  # noqa: E731
            pending.append((g, g.submit("train", {r: (ref, mine(r), kl_coef, train_actor) for r in range(g.world)})))
        sums: dict[str, float] = {}
        n = sum(len(s) for s in steps)  # micro-batches of the whole pass, every trained role saw each once
        for g, refs in pending:
            for part, _ in g.gather(refs, "train"):
                for k, v in part.items():
                    sums[k] = sums.get(k, 0.0) + v
        return {k: v / n for k, v in sums.items()}

    def sync_weights(self) -> None:
        self.generator.sync_weights(None)

    def lr(self) -> float:
        return self.holder["actor"].call_ranks("lr", {0: ()})[0]

    def load_checkpoint(self) -> dict | None:
        states = {name: g.run("load_checkpoint", self.cfg.ckpt_path)[0] for name, g in self.trained_groups().items()}
        return states.get("actor")

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Every trained group writes its engines into global_step{step}/; then, and only then, the pointer moves."""
        from rlhf_ops.utils.atomic import write_text
        from rlhf_ops.utils.checkpoint import POINTER, list_checkpoints

        root, tag = Path(self.cfg.ckpt_path), f"global_step{step}"
        if (root / tag).exists():  # a stale, possibly partial, save of the same step
            shutil.rmtree(root / tag)
        groups = self.trained_groups()
        pending = [(g, g.submit("save_checkpoint", {r: (str(root / tag), state if name == "actor" else {})
                                                    for r in range(g.world)})) for name, g in groups.items()]
        for g, refs in pending:
            g.gather(refs, "save_checkpoint")
        write_text(root / POINTER, tag + "\n")
        for old in list_checkpoints(root)[:-self.cfg.max_ckpt_num]:
            shutil.rmtree(root / old, ignore_errors=True)
        logger.info("saved checkpoint %s", root / tag)

    def trained_groups(self) -> dict[str, RoleGroup]:
        return {name: g for name, g in self.groups.items() if {"actor", "critic"} & set(g.spec.roles)}

    def save(self) -> None:
        self.holder["actor"].run("save_model", "actor", self.cfg.save_path, {"metrics.jsonl": str(self.metrics.path)})
        if "critic" in self.holder and self.cfg.save_value_network:
            self.holder["critic"].run("save_model", "critic", self.cfg.save_path.rstrip("/") + "_critic", {})

    def close(self) -> None:
        """Stop this run's workers, its vLLM engine and free its bundles (the Ray cluster itself is left alone)."""
        from ray.util.placement_group import remove_placement_group

        if hasattr(self.generator, "close"):
            self.generator.close()

        for g in self.groups.values():
            g.kill()
        remove_placement_group(self.pg)
