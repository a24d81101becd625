"""The supervised training loop shared by SFT, reward-model, PRM and DPO training.

A stage supplies a `step_fn(model, batch) -> (loss, metrics)` and a `make_batch(indices)`;
this loop owns everything else: data order per rank, gradient accumulation through the
DeepSpeed engine, metrics, evaluation, resumable checkpoints and the final save.

Metrics are `{name: (sum, weight)}` pairs so that means are exact across micro-batches and
ranks (e.g. SFT loss = sum of token NLL / number of target tokens). A sum may be a tensor on the
device: it is added there and read once per logging step, so that no micro-batch waits for the
device to report a number. The one host sync per optimizer step is the non-finite loss check,
before the step is taken.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf_ops.data.batching import epoch_micro_batches, eval_micro_batches
from rlhf_ops.utils import checkpoint as ckpt
from rlhf_ops.utils.profiling import StepProfiler
from rlhf_ops.utils.tracking import MetricsLogger

logger = logging.getLogger(__name__)
Metrics = dict[str, tuple["float | torch.Tensor", float]]
StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Metrics]]


class MetricSums:
    """Accumulates (sum, weight) pairs; `reduce()` all-reduces across ranks and returns means.

    Sums given as tensors (0-d, on any device) stay tensors, summed in float64 where they live, until
    `reduce()` copies them all to the host at once."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, metrics: Metrics) -> None:
        for k, (s, w) in metrics.items():
            acc = self.sums[k]
            acc[0] = acc[0] + (s.detach().double() if isinstance(s, torch.Tensor) else float(s))
            acc[1] += float(w)

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        flat = [v for k in keys for v in self.sums[k]]
        on_device = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        multi = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and bool(keys)
        device = flat[on_device[0]].device if on_device else torch.device("cpu")
        if multi:
            from rlhf_ops.distributed.engine import on_gpu  # NCCL all-reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
        t = torch.tensor([0.0 if isinstance(v, torch.Tensor) else v for v in flat], dtype=torch.float64).to(device)
        if on_device:
            t[on_device] = torch.stack([flat[i].reshape(()).to(device) for i in on_device])
        if multi:
            torch.distributed.all_reduce(t)
        v = t.tolist()  # the one read from the device
        return {k: v[2 * i] / v[2 * i + 1] if v[2 * i + 1] > 0 else float("nan") for i, k in enumerate(keys)}


@dataclass
class LoopData:
    num_train: int
    make_batch: Callable[[list[int]], Any]
    num_eval: int = 0
    make_eval_batch: Callable[[list[int]], Any] | None = None


def steps_per_epoch(num_rows: int, train_batch_size: int, what: str = "dataset") -> int:
    steps = num_rows // train_batch_size
    if steps == 0:
        from rlhf_ops.config import ConfigError
        raise ConfigError(f"--train_batch_size {train_batch_size} is larger than the {what} ({num_rows} rows): "
                          "no full optimizer step fits; lower --train_batch_size")
    return steps


class SupervisedLoop:
    def __init__(self, cfg: Any, engine: Any, tokenizer: Any, data: LoopData, step_fn: StepFn,
                 metrics: MetricsLogger, name: str):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.data, self.step_fn, self.metrics, self.name = data, step_fn, metrics, name
        self.steps_per_epoch = steps_per_epoch(data.num_train, cfg.train_batch_size)
        self.total_steps = self.steps_per_epoch * cfg.max_epochs
        self.global_step = 0
        self._last_eval: tuple[int, dict[str, float]] | None = None  # (step, result) of the latest evaluate()

    def fit(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, eng = self.cfg, self.engine
        start_epoch, start_micro = self._resume()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.name, disable=eng.rank != 0)
        prof = StepProfiler(cfg.profile_steps, Path(cfg.ckpt_path) / "profile", eng.rank, self.total_steps)
        sums, t0 = MetricSums(), time.perf_counter()
        for epoch in range(start_epoch, cfg.max_epochs):
            mbs = epoch_micro_batches(self.data.num_train, cfg.train_batch_size, cfg.micro_train_batch_size,
                                      eng.world_size, eng.rank, epoch, cfg.seed)
            losses: list[torch.Tensor] = []  # this optimizer step's, checked before the step is taken
            for i in range(start_micro if epoch == start_epoch else 0, len(mbs)):
                if i % eng.grad_accum == 0:
                    prof.begin(self.global_step + 1)
                    losses = []
                loss, m = self.step_fn(eng.module, self.data.make_batch(mbs[i]))
                losses.append(loss.detach())
                if (i + 1) % eng.grad_accum == 0:
                    self._check_finite(losses, epoch, i + 1 - len(losses))
                eng.backward_step(loss)
                sums.add(m)
                if (i + 1) % eng.grad_accum:
                    continue
                self.global_step += 1
                prof.end(self.global_step)
                bar.update(1)
                if self.global_step % cfg.logging_steps == 0:
                    logs = self.derived_metrics(sums.reduce())
                    logs.update(lr=eng.lr, epoch=epoch, seconds=time.perf_counter() - t0)
                    self.metrics.log(self.global_step, logs)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "acc")})
                    sums = MetricSums()
                if cfg.eval_steps > 0 and self.global_step % cfg.eval_steps == 0:
                    self.evaluate()
                if cfg.save_steps > 0 and self.global_step % cfg.save_steps == 0:
                    ckpt.save_checkpoint({"model": eng.module}, cfg.ckpt_path, self.global_step,
                                         {"global_step": self.global_step, "epoch": epoch, "micro": i + 1},
                                         cfg.max_ckpt_num)
        prof.close()
        bar.close()
        # the end-of-training eval, unless --eval_steps just evaluated this very step (no duplicate row)
        final = self._last_eval[1] if self._last_eval and self._last_eval[0] == self.global_step else self.evaluate()
        self.save_model()
        return final

    def _check_finite(self, losses: list[torch.Tensor], epoch: int, first_micro: int) -> None:
        """Raise, naming the micro-batch and the last good checkpoint, if a loss of this optimizer step is
        not finite. Runs before the step's last backward_step, which takes the optimizer step: the
        earlier micro-batches' gradients are then lost with the run, never applied."""
        bad = ~torch.isfinite(torch.stack(losses))
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"{self.name}: non-finite loss ({losses[j].item()}) at optimizer step {self.global_step + 1} "
                f"(epoch {epoch}, micro-batch {first_micro + j}); last good checkpoint: "
                f"{ckpt.latest_checkpoint(self.cfg.ckpt_path) or 'none'} in {self.cfg.ckpt_path}")

    def save_model(self) -> None:
        """The final Hugging Face save; a stage that stores more (a reward model's head name) extends it."""
        ckpt.save_hf_model(self.engine.module, self.tokenizer, self.cfg.save_path,
                           {"metrics.jsonl": str(self.metrics.path)})

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the reduced means (e.g. a std from E[x] and E[x^2]); identity here."""
        return means

    def _resume(self) -> tuple[int, int]:
        state = ckpt.load_checkpoint({"model": self.engine.module}, self.cfg.ckpt_path) if self.cfg.load_checkpoint else None
        if state is None:
            self.metrics.truncate_after(0)
            return 0, 0
        self.global_step = int(state["global_step"])
        self.metrics.truncate_after(self.global_step)
        epoch, micro = int(state["epoch"]), int(state["micro"])
        n_micro = math.ceil(self.steps_per_epoch * self.cfg.train_batch_size
                            / (self.cfg.micro_train_batch_size * self.engine.world_size))
        return (epoch + 1, 0) if micro >= n_micro else (epoch, micro)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.data.num_eval or self.data.make_eval_batch is None:
            return {}
        eng = self.engine
        eng.module.eval()
        sums = MetricSums()
        chunks = eval_micro_batches(self.data.num_eval, self.cfg.micro_train_batch_size, 1, 0)
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively);
        # a rank out of rows repeats the first chunk and discards its metrics.
        for j in range(math.ceil(len(chunks) / eng.world_size)):
            c = j * eng.world_size + eng.rank
            _, m = self.step_fn(eng.module, self.data.make_eval_batch(chunks[c if c < len(chunks) else 0]))
            if c < len(chunks):
                sums.add(m)
        eng.module.train()
        result = self.derived_metrics(sums.reduce())
        self.metrics.log(self.global_step, result, split="eval")
        self._last_eval = (self.global_step, result)
        if eng.rank == 0:
            logger.info("%s eval @ step %d: %s", self.name, self.global_step,
                        ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result
