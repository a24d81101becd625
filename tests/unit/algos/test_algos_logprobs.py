"""rlhf_ops.algos.logprobs: against log_softmax + gather, -100 handling, chunk invariance."""

import math

import pytest
import torch

from rlhf_ops.algos.logprobs import sequence_logprob_sums, token_entropy, token_logprobs


def _inputs(seed=0, B=3, T=5, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    labels[2, 3:] = -100
    return logits, labels


def _reference_logprobs(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(picked), picked)


def test_token_logprobs_hand_value():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4), label 0 -> ln(1/4), -100 -> 0
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3], dtype=torch.float64)
    labels = torch.tensor([[1, 0, -100]])
    out = token_logprobs(logits, labels)
    torch.testing.assert_close(
        out, torch.tensor([[math.log(0.75), math.log(0.25), 0.0]], dtype=torch.float64), atol=1e-15, rtol=0
    )
    # temperature 2: logits [0, ln3 / 2] -> softmax [1 / (1 + sqrt3), sqrt3 / (1 + sqrt3)]
    out_t = token_logprobs(logits, labels, temperature=2.0)
    want = math.log(math.sqrt(3.0) / (1.0 + math.sqrt(3.0)))
    assert out_t[0, 0].item() == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_log_softmax_gather(temperature):
    logits, labels = _inputs()
    out = token_logprobs(logits, labels, temperature=temperature)
    torch.testing.assert_close(out, _reference_logprobs(logits, labels, temperature), atol=1e-12, rtol=0)
    assert torch.all(out[labels == -100] == 0)


def test_token_logprobs_gradient_matches_reference():
    logits, labels = _inputs(seed=1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    w = torch.randn(labels.shape, dtype=torch.float64)
    (token_logprobs(a, labels, chunk_rows=4) * w).sum().backward()
    (_reference_logprobs(b, labels) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    assert torch.all(a.grad[labels == -100] == 0)


@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 7, 15, 10_000])
def test_chunking_is_identical_to_one_chunk(chunk_rows):
    logits, labels = _inputs(seed=2, dtype=torch.float32)
    one = token_logprobs(logits, labels, chunk_rows=10_000)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk_rows=chunk_rows), one, atol=0, rtol=0)
    ent_one = token_entropy(logits, chunk_rows=10_000)
    torch.testing.assert_close(token_entropy(logits, chunk_rows=chunk_rows), ent_one, atol=0, rtol=0)


def test_token_entropy_matches_reference_and_hand_value():
    logits, _ = _inputs(seed=3)
    p = torch.softmax(logits / 0.5, dim=-1)
    ref = -(p * torch.log_softmax(logits / 0.5, dim=-1)).sum(-1)
    torch.testing.assert_close(token_entropy(logits, temperature=0.5, chunk_rows=2), ref, atol=1e-12, rtol=0)
    # uniform over 4 -> ln 4; a banned (-inf) token adds 0: uniform over the 3 others -> ln 3
    hand = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, -math.inf]]], dtype=torch.float64)
    torch.testing.assert_close(
        token_entropy(hand), torch.tensor([[math.log(4.0), math.log(3.0)]], dtype=torch.float64), atol=1e-15, rtol=0
    )


def test_half_precision_logits_are_upcast_to_float32():
    logits, labels = _inputs(seed=4, dtype=torch.bfloat16)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference_logprobs(logits.float(), labels), atol=1e-6, rtol=0)
    assert token_entropy(logits).dtype == torch.float32


def test_sequence_logprob_sums_hand_values():
    logprobs = torch.tensor([[-1.0, -2.0, -50.0], [-0.5, -9.0, -9.0], [-3.0, -3.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(sequence_logprob_sums(logprobs, mask), torch.tensor([-3.0, -0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        sequence_logprob_sums(logprobs, mask, average=True), torch.tensor([-1.5, -0.5, 0.0], dtype=torch.float64)
    )


def test_invalid_arguments_raise():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_entropy(logits, chunk_rows=0)
