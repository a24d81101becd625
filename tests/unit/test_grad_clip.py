"""rlhf_ops.distributed.engine.clip_grad_norm: DeepSpeed's fp32 clipping arithmetic, in foreach kernels."""
import torch

from rlhf_ops.distributed.engine import clip_grad_norm


def _deepspeed_way(grads, max_norm):
    """deepspeed.runtime.utils.clip_grad_norm_ for one process: per-tensor norms, squared, summed, rooted."""
    total = torch.stack([g.float().norm(2) for g in grads]).pow(2.0).sum().float().pow(0.5)
    coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def _grads(scale):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * scale for s in [(64, 32), (32,), (7, 5, 3), (1,)]]


def test_clipping_equals_deepspeeds_bit_for_bit():
    for scale, max_norm in [(1.0, 1.0), (0.3, 2.5), (1e-3, 1.0)]:
        ours, theirs = _grads(scale), _grads(scale)
        n_ours, n_theirs = clip_grad_norm(ours, max_norm), _deepspeed_way(theirs, max_norm)
        assert torch.equal(n_ours, n_theirs.reshape(()))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        after = torch.stack([g.norm() for g in ours]).norm()
        assert after <= max_norm * (1 + 1e-5) and (n_ours < max_norm or after > 0.99 * max_norm)


def test_small_gradients_are_left_alone():
    grads, before = _grads(1e-3), _grads(1e-3)
    versions = [g._version for g in grads]
    clip_grad_norm(grads, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    assert [g._version for g in grads] == versions  # on CPU not even multiplied by 1.0 (a pass over every gradient)
    clip_grad_norm(grads, 1e-4)
    assert all(g._version == v + 1 for g, v in zip(grads, versions))  # clipped: scaled in place once
