"""Invariants of the RL loop's parts (rlhf_ops.rl) on a very small Llama, on CPU, in fp32.

* `train_on` gives the same weights for any --micro_train_batch_size (DeepSpeed accumulation);
* nothing at a masked position of an Experience, no prompt or padding position of the batch,
  and no pad id reaches a loss or a gradient; only response tokens are actions;
* packed and padded forwards agree (policy logprobs, critic values, reward-model scores);
* on real rollouts, dr_grpo's advantages are group_norm's without the std division, and its loss
  uses the constant normaliser --generate_max_len where group_norm's is the token mean.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhf_ops.rl.experience import Experience
from rlhf_ops.rl.forward import action_logprobs, action_mask, action_values, response_batch, to_BT
from rlhf_ops.rl.update import actor_step, critic_step, train_on

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
PAD = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("rl_parts") / "model", seed=0, **TINY)


@pytest.fixture(scope="module")
def cfg(model_dir, tmp_path_factory):
    from rlhf_ops.rl.config import RLConfig
    fn = tmp_path_factory.mktemp("rl_reward") / "length.py"
    fn.write_text("def reward_func(queries, prompts, labels):\n"
                  "    return [(len(q) - len(p)) % 7 / 7.0 for q, p in zip(queries, prompts)]\n")
    return RLConfig(pretrain=str(model_dir), prompt_data="unused", reward_func=str(fn), zero_stage=0, max_norm=0.0,
                    lr_scheduler="constant", lr_warmup_ratio=0.0, n_samples_per_prompt=4, rollout_batch_size=2,
                    train_batch_size=8, micro_train_batch_size=8, micro_rollout_batch_size=8, generate_max_len=16,
                    use_kl_loss=True, kl_estimator="k3", init_kl_coef=0.05, entropy_loss_coef=0.01,
                    actor_learning_rate=1e-2, critic_learning_rate=1e-2, advantage_estimator="group_norm")


def lm(model_dir):
    from rlhf_ops.models.loading import load_causal_lm
    return load_causal_lm(str(model_dir))


def value_model(model_dir):
    from rlhf_ops.models.reward import load_value_model
    torch.manual_seed(1)  # the new head's draw
    return load_value_model(str(model_dir), pad_token_id=PAD)


def make_exp(model, prompt_lens, resp_lens, seed=0) -> Experience:
    """Random token sequences with near-on-policy old logprobs (some ratios clip) and random targets."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(6, 500, (p + r,), generator=g).tolist() for p, r in zip(prompt_lens, resp_lens)]
    with torch.no_grad():
        logp = to_BT(action_logprobs(model, response_batch(seqs, prompt_lens, PAD))[0], resp_lens)
    mask = action_mask(resp_lens)
    noise = lambda s: torch.where(mask, s * torch.randn(mask.shape, generator=g), 0.0)  # noqa: E731
    return Experience(seqs, list(prompt_lens), list(resp_lens), mask, torch.where(mask, logp, 0.0) + noise(0.3),
                      torch.where(mask, logp, 0.0) + noise(0.2), noise(0.5), noise(1.0), noise(1.0),
                      torch.randn(len(seqs), generator=g))


class FakeEngine:
    """What actor_step/critic_step need of an engine: `.module` and `backward_step` (here: backward only)."""

    def __init__(self, model):
        self.module = model

    def backward_step(self, loss):
        loss.backward()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- micro-batches


def _train(cfg, model_dir, exp, micro, monkeypatch, with_critic):
    """One `train_on` pass with plain SGD, lr 1: the update is the accumulated gradient itself, so a wrong scale
    or a dropped micro-batch shows. (Adam's first update, lr * g / (|g| + eps), is blind to the gradient's scale
    and turns rounding noise on near-zero gradients into whole-lr differences: no use for this check.)"""
    from rlhf_ops.distributed import engine as eng_mod
    monkeypatch.setattr(eng_mod, "make_optimizer", lambda m, lr, *a, **k: torch.optim.SGD(m.parameters(), lr=lr))
    c = dataclasses.replace(cfg, micro_train_batch_size=micro, actor_learning_rate=1.0, critic_learning_rate=1.0)
    actor = eng_mod.create_engine(lm(model_dir), c, 1, lr=c.actor_learning_rate)
    critic = eng_mod.create_engine(value_model(model_dir), c, 1, lr=c.critic_learning_rate) if with_critic else None
    train_on(exp, actor, critic, c, 0.05, PAD, True, seed=3)
    return [{n: p.detach().clone() for n, p in e.module.module.named_parameters()} for e in (actor, critic) if e]


@pytest.mark.parametrize("estimator,equal_lengths", [("group_norm", True), ("gae", True), ("dr_grpo", False)])
def test_train_on_is_micro_batch_invariant(cfg, model_dir, monkeypatch, estimator, equal_lengths):
    # One optimizer step over 8 samples as 1 x 8, 4 x 2 or 8 x 1 micro-batches (DeepSpeed accumulation); the token
    # mean is taken over the whole step (train_on rescales each micro-batch), dr_grpo's normaliser is a constant.
    from rlhf_ops.distributed.engine import init_distributed
    init_distributed()
    c = dataclasses.replace(cfg, advantage_estimator=estimator)
    resp = [6] * 8 if equal_lengths else [6, 2, 5, 1, 6, 3, 4, 6]
    exp = make_exp(lm(model_dir), [3, 5, 4, 2, 3, 5, 4, 2], resp)
    init = [dict(m.named_parameters()) for m in (lm(model_dir), value_model(model_dir))]
    runs = {m: _train(c, model_dir, exp, m, monkeypatch, estimator == "gae") for m in (8, 2, 1)}
    for start, ref in zip(init, runs[8]):  # every run moved: the actor (and the critic) by a real step
        assert max((ref[n] - p).abs().max().item() for n, p in start.items()) > 1e-3
    for m in (2, 1):
        for ref, got in zip(runs[8], runs[m]):
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=lambda s: f"micro {m} {n}: {s}")


def test_token_mean_with_unequal_lengths_is_micro_batch_invariant(cfg, model_dir, monkeypatch):
    from rlhf_ops.distributed.engine import init_distributed
    init_distributed()
    exp = make_exp(lm(model_dir), [3] * 8, [6, 2, 5, 1, 6, 3, 4, 6])
    a, b = (_train(cfg, model_dir, exp, m, monkeypatch, False)[0] for m in (8, 1))
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- masks


def _losses_and_grads(cfg, model, critic, exp, pad_id=PAD, hook=None):
    for m in (model, critic):
        m.zero_grad(set_to_none=True)
    handles = [m.model.norm.register_forward_hook(hook) for m in (model, critic)] if hook else []
    try:
        idx = list(range(len(exp)))
        out = {**actor_step(FakeEngine(model), exp, idx, cfg, 0.05, pad_id),
               **critic_step(FakeEngine(critic), exp, idx, cfg, pad_id)}
    finally:
        for h in handles:
            h.remove()
    return out, {**grads(model), **{f"critic.{n}": g for n, g in grads(critic).items()}}


@pytest.mark.parametrize("estimator", ["group_norm", "dr_grpo", "gae"])
def test_masked_positions_padding_and_prompts_never_reach_a_loss_or_gradient(cfg, model_dir, estimator):
    c = dataclasses.replace(cfg, advantage_estimator=estimator)
    model, critic = lm(model_dir), value_model(model_dir)
    exp = make_exp(model, [3, 7, 2, 5], [6, 2, 4, 1])
    base, g0 = _losses_and_grads(c, model, critic, exp)
    assert all(torch.isfinite(torch.tensor(v)) for v in base.values()) and base["policy_loss"] != 0

    # 1. garbage (huge, NaN, inf) at the masked positions of every per-action tensor of the Experience
    bad = copy.deepcopy(exp)
    junk = torch.tensor([1e4, float("nan"), -float("inf"), -1e4])
    for name in ("old_logp_BT", "ref_logp_BT", "values_BT", "advantages_BT", "returns_BT"):
        t = getattr(bad, name)
        t[~bad.mask_BT] = junk.repeat(t.numel())[: int((~bad.mask_BT).sum())]
    # 2. another pad id; 3. the last hidden state perturbed at every position that predicts no action
    #    (prompt tokens, the last response token, padding), before the LM head and the value head
    def perturb(_mod, inp, out):
        batch = response_batch(exp.sequences, exp.prompt_lens, PAD)
        return out + 100.0 * (batch.targets_BT == -100)[..., None] * torch.randn_like(out)

    for label, args in [("masked garbage", (bad, PAD, None)), ("pad id", (exp, 77, None)), ("hidden", (exp, PAD, perturb))]:
        got, g = _losses_and_grads(c, model, critic, *args)
        assert got == base, label
        assert g.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=0, atol=1e-7, msg=lambda s: f"{label} {n}: {s}")


def test_only_response_tokens_are_actions_and_logprobs_match_a_full_forward(model_dir):
    model = lm(model_dir).eval()
    plens, resp = [3, 7, 2], [6, 2, 4]
    exp = make_exp(model, plens, resp)
    seen = []
    h = model.lm_head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[-2]))
    with torch.no_grad():
        logp_N, ent_N = action_logprobs(model, response_batch(exp.sequences, plens, PAD), with_entropy=True)
    h.remove()
    assert seen == [sum(resp)] and logp_N.shape == ent_N.shape == (sum(resp),)
    with torch.no_grad():
        for i, (s, p, r) in enumerate(zip(exp.sequences, plens, resp)):
            full = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            want = full[torch.arange(p - 1, p + r - 1), torch.tensor(s[p:])]
            torch.testing.assert_close(to_BT(logp_N, resp)[i, :r], want, rtol=0, atol=1e-5)


def test_packed_and_padded_forwards_agree(model_dir):
    from rlhf_ops.data.batching import collate
    from rlhf_ops.models.reward import sequence_rewards, token_values
    model, critic = lm(model_dir).eval(), value_model(model_dir).eval()
    plens, resp = [3, 7, 2, 4], [6, 2, 4, 1]
    exp = make_exp(model, plens, resp)
    with torch.no_grad():
        for fn in (lambda b: action_logprobs(model, b)[0], lambda b: action_values(critic, b)):
            pad, packed = (fn(response_batch(exp.sequences, plens, PAD, packed=k)) for k in (False, True))
            torch.testing.assert_close(packed, pad, rtol=0, atol=1e-5)
        scores = [sequence_rewards(token_values(critic, b), b) for b in
                  (collate(exp.sequences, [[1] * len(s) for s in exp.sequences], PAD, packed=k) for k in (False, True))]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- estimators on rollouts


def test_dr_grpo_is_group_norm_without_std_and_uses_the_constant_normaliser(cfg, model_dir):
    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.rl.experience import Models, PromptSet, make_experience, sample
    from rlhf_ops.rl.rewards import ScoringOptions
    from rlhf_ops.rl.setup import make_scorer

    tok = load_tokenizer(str(model_dir))
    actor = lm(model_dir)
    eos = tok.eos_token_id  # EOS made likely, so response lengths differ and the two normalisers do too
    actor.lm_head.register_forward_hook(lambda _m, _i, out: out + 4.0 * (torch.arange(out.shape[-1]) == eos))
    texts = [f"User: What is {a} + {b}?\nAssistant: " for a, b in [(3, 4), (12, 9)]]
    ps = PromptSet(tok(texts)["input_ids"], texts, ["7", "21"])
    G, B = cfg.n_samples_per_prompt, 2 * cfg.n_samples_per_prompt
    exps = {}
    for est in ("group_norm", "dr_grpo"):
        c = dataclasses.replace(cfg, advantage_estimator=est)
        models = Models(actor, None, None, HFGenerator(actor, tok, 8), make_scorer(ScoringOptions.of(c), tok, None), PAD)
        seqs, plens, rows = sample(models, ps, [0, 1], G, SamplingParams(1.0, c.generate_max_len, seed=5))
        exps[est] = (c, make_experience(models, c, seqs, plens, models.score(ps, seqs, rows, plens), 0.05))
    (cg, gn), (cd, dr) = exps["group_norm"], exps["dr_grpo"]
    assert gn.sequences == dr.sequences and len(set(dr.response_lens)) > 2, dr.response_lens
    r_PG = dr.rewards_B.view(-1, G)
    assert (r_PG.std(1) > 0).all(), r_PG
    centered_B = (r_PG - r_PG.mean(1, keepdim=True)).flatten()
    want_dr = torch.where(dr.mask_BT, centered_B[:, None], 0.0)
    torch.testing.assert_close(dr.advantages_BT, want_dr, rtol=0, atol=1e-6)
    std_B = r_PG.std(1).repeat_interleave(G)  # unbiased, per group; eps 1e-6 as in group_norm_PG
    torch.testing.assert_close(gn.advantages_BT, want_dr / (std_B[:, None] + 1e-6), rtol=1e-6, atol=1e-6)

    # ratio == 1 on the first pass, so the loss is -aggregate(A): token sum / (B x generate_max_len) for dr_grpo,
    # token mean for group_norm
    L = torch.tensor(dr.response_lens, dtype=torch.float32)
    for c, exp, denom in [(cd, dr, B * cd.generate_max_len), (cg, gn, L.sum())]:
        m = actor_step(FakeEngine(actor), exp, list(range(B)), c, 0.0, PAD)
        want = -(exp.advantages_BT[:, 0] * L).sum() / denom
        assert m["policy_loss"] == pytest.approx(want.item(), rel=1e-5, abs=1e-6), (c.advantage_estimator, m)
        assert m["clip_frac"] == 0.0 and abs(m["approx_kl"]) < 1e-6


def test_keep_groups_drops_flat_groups_and_means_outside_the_range():
    from rlhf_ops.rl.experience import keep_groups
    r = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0, 1.0, 1.0, 0.9, 1.0])
    assert keep_groups(r, 2, 0.0, 1.0).tolist() == [False, False, False, True, False, True]
    assert keep_groups(r, 4, 0.0, 1.0).tolist() == [True, True, True]
    assert keep_groups(r, 4, 0.3, 0.9).tolist() == [True, True, False]


def test_token_mean_scales_by_hand():
    from rlhf_ops.rl.update import token_mean_scales
    # responses of 6, 2, 1 and 3 tokens in micro-batches [0, 1] (8 tokens) and [2, 3] (4 tokens); 12 in the step:
    # scale = tokens * 2 micro-batches / 12 -> 16/12 and 8/12; mean of (mean_mb * scale) = sum of all / 12
    assert token_mean_scales([6, 2, 1, 3], [[0, 1], [2, 3]]) == pytest.approx([16 / 12, 8 / 12], abs=1e-12)


def test_rl_forwards_build_packed_batches_one_row_per_micro_batch():
    """--packing_samples: each micro-batch of the RL forwards is one row, position ids restarting per
    sample and no mask (the attention reads the samples from the position ids)."""
    from rlhf_ops.rl.experience import forward_all

    seen = []

    def fn(batch):
        seen.append(batch)
        return torch.zeros(int((batch.targets_BT != -100).sum()))

    seqs, plens = [[5, 6, 7, 8], [5, 6, 9], [5, 7]], [2, 2, 1]
    out = forward_all(fn, seqs, plens, pad_id=0, micro=2, packed=True)
    assert out.shape == (2 + 1 + 1,) and len(seen) == 2
    first = seen[0]
    assert first.position_ids_BT.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert first.attention_mask is None
