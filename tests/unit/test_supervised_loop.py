"""The supervised loop's own duties, with a recording engine in place of a model: the non-finite loss check
(before the optimizer step, naming the micro-batch) and how often it reads numbers back from the device."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlhf_ops.trainers.loop import LoopData, MetricSums, SupervisedLoop
from rlhf_ops.utils.tracking import MetricsLogger


class RecordingEngine:
    """Engine's interface as the loop uses it: counts backward passes and the optimizer steps they take."""

    def __init__(self, grad_accum: int):
        self.module = torch.nn.Linear(2, 2)
        self.rank, self.world_size, self.grad_accum, self.lr = 0, 1, grad_accum, 1e-3
        self.backwards, self.optimizer_steps = [], 0

    def backward_step(self, loss: torch.Tensor) -> None:
        self.backwards.append(float(loss))
        if len(self.backwards) % self.grad_accum == 0:
            self.optimizer_steps += 1


def make_loop(tmp_path, losses: list[float], grad_accum: int = 2, logging_steps: int = 1):
    """8 rows, 4 per step in micro-batches of 2: 2 optimizer steps per epoch, micro-batch i has loss losses[i]."""
    cfg = SimpleNamespace(train_batch_size=4, micro_train_batch_size=2, max_epochs=len(losses) // 4, seed=0,
                          logging_steps=logging_steps, eval_steps=-1, save_steps=-1, max_ckpt_num=1,
                          ckpt_path=str(tmp_path / "ckpt"), save_path=str(tmp_path / "model"),
                          load_checkpoint=False, profile_steps=None)
    eng = RecordingEngine(grad_accum)
    seen = iter(range(len(losses)))

    def step_fn(model, batch):
        loss = torch.tensor(losses[next(seen)])
        return loss, {"loss": (loss * 2, 2)}

    loop = SupervisedLoop(cfg, eng, None, LoopData(8, lambda idx: idx), step_fn,
                          MetricsLogger(tmp_path / "ckpt" / "metrics.jsonl"), "sft")
    loop.save_model = lambda: None
    return loop, eng


@pytest.mark.parametrize("bad", [1, 2, 3])
def test_a_non_finite_loss_stops_before_its_optimizer_step(tmp_path, bad):
    losses = [1.0] * 8
    losses[bad] = float("nan") if bad != 2 else float("inf")
    loop, eng = make_loop(tmp_path, losses)
    with pytest.raises(FloatingPointError) as exc:
        loop.fit()
    step = bad // 2 + 1
    assert str(exc.value).startswith(f"sft: non-finite loss ({losses[bad]}) at optimizer step {step} "
                                     f"(epoch 0, micro-batch {bad}); last good checkpoint: none in {tmp_path / 'ckpt'}")
    # the optimizer steps before the bad one were taken, the bad one never; the check runs once per step, at its
    # last micro-batch, so the step's first micro-batch was backpropagated (its gradients are never applied)
    assert eng.optimizer_steps == step - 1
    assert len(eng.backwards) == 2 * (step - 1) + 1


def test_logged_means_are_exact_with_sums_kept_on_the_device(tmp_path):
    loop, _ = make_loop(tmp_path, [1.0, 2.0, 3.0, 5.0, 0.5, 0.25, 4.0, 8.0], logging_steps=1)
    loop.fit()
    rows = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 4.0), (3, 0.375), (4, 6.0)]


def test_the_device_is_read_once_per_optimizer_step_plus_once_per_log(tmp_path, monkeypatch):
    # On a GPU every read of a tensor's value (.item(), .tolist(), bool()) makes the host wait for the device.
    reads = []
    for name in ("item", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    loop, _ = make_loop(tmp_path, [1.0] * 8, logging_steps=2)
    loop.fit()
    monkeypatch.undo()
    # 4 optimizer steps: 4 finiteness checks (bool) and 2 logs (one tolist each), plus each epoch's
    # shuffle (a tolist of a host tensor); the recording engine's float(loss) is not a read the loop makes
    assert sorted(reads) == ["__bool__"] * 4 + ["tolist"] * (2 + 2)


def test_metric_sums_mix_host_numbers_and_device_tensors():
    sums = MetricSums()
    sums.add({"loss": (torch.tensor(3.0), 2), "acc": (1.0, 2)})
    sums.add({"loss": (torch.tensor(1.0, dtype=torch.float32), 2), "acc": (torch.tensor(2, dtype=torch.long), 2)})
    assert sums.reduce() == {"acc": 0.75, "loss": 1.0}
