"""The value-head model: last-token rewards, padded == packed, HF-loadable saves, head names, LoRA.

The model is a small Llama (hidden 32, 2 layers) written to disk once, loaded the way the trainers
load it (`load_value_model`). Saves go through the trainers' `save_hf_model`, with a stand-in for
the DeepSpeed engine (`Unwrapped`), so what is checked is what training writes.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from rlhf_ops.data.batching import collate
from rlhf_ops.models.reward import (HEAD, head_key_prefixes, last_token_positions, load_value_model,
                                    sequence_rewards, set_reward_stats, token_values)
from rlhf_ops.utils.checkpoint import save_hf_model

SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
TEXTS = ["What is 1 + 2?\n1 + 2 = 3\nAnswer: 3", "Hi", "What is 47 + 38 - 19?\n47 + 38 = 85\n85 - 19 = 66\nAnswer: 66",
         "7 * 3 = 21"]


class Unwrapped:
    """What `save_hf_model` reads from a DeepSpeed engine, for a model that is not in one."""

    def __init__(self, module):
        self.module = module

    def zero_optimization_partition_weights(self) -> bool:
        return False


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("rm_unit") / "base", seed=0, **SIZES)


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    out = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id] for t in TEXTS]
    assert len({len(r) for r in out}) == len(out)  # varying lengths: padding really happens
    return out


def value_model(base_dir, tok, **kw):
    torch.manual_seed(0)
    return load_value_model(str(base_dir), pad_token_id=tok.pad_token_id, **kw).eval()


def rewards(model, rows, pad_id, packed=False):
    batch = collate(rows, [[1] * len(r) for r in rows], pad_id, packed=packed)
    with torch.no_grad():
        return sequence_rewards(token_values(model, batch), batch)


def test_sequence_rewards_pick_each_samples_last_token(rows):
    lens = [len(r) for r in rows]
    padded = collate(rows, [[1] * n for n in lens], pad_id=0)
    values = torch.arange(padded.input_ids_BT.numel(), dtype=torch.float32).view_as(padded.input_ids_BT)
    assert sequence_rewards(values, padded).tolist() == [values[i, n - 1].item() for i, n in enumerate(lens)]
    packed = collate(rows, [[1] * n for n in lens], pad_id=0, packed=True)
    ends = [sum(lens[:i + 1]) - 1 for i in range(len(lens))]
    assert last_token_positions(packed)[1].tolist() == ends
    flat = torch.arange(sum(lens), dtype=torch.float32)[None]
    assert sequence_rewards(flat, packed).tolist() == [float(e) for e in ends]


def test_fresh_head_is_drawn_with_std_one_over_hidden_plus_one(base_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_value_model(str(base_dir), init_head_std=0.5)
    w = getattr(model, HEAD).weight
    assert w.shape == (1, SIZES["hidden_size"]) and 0.3 < w.std().item() < 0.7
    model = value_model(base_dir, tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert getattr(model, HEAD).weight.abs().max().item() < 6 / (SIZES["hidden_size"] + 1)


def test_padded_and_packed_rewards_are_equal(base_dir, tiny_tokenizer, rows):
    model = value_model(base_dir, tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    alone = torch.cat([rewards(model, [r], pad) for r in rows])
    torch.testing.assert_close(rewards(model, rows, pad), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(rewards(model, rows, pad, packed=True), alone, rtol=0, atol=1e-5)


def test_saved_reward_model_scores_the_same_under_hf_sequence_classification(base_dir, tiny_tokenizer, rows, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = value_model(base_dir, tiny_tokenizer)
    torch.nn.init.normal_(getattr(model, HEAD).weight, std=1.0)  # a head far from its init
    set_reward_stats(model, mean=0.25, std=1.5)
    save_hf_model(Unwrapped(model), tiny_tokenizer, str(tmp_path / "rm"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), num_labels=1).eval()
    assert (hf.config.normalize_reward, hf.config.mean, hf.config.std) == (False, 0.25, 1.5)
    # HF's own input path: the saved tokenizer pads on the right with the config's pad id
    enc = hf_tokenizer(tmp_path / "rm")([TEXTS[i] + tiny_tokenizer.eos_token for i in range(len(TEXTS))],
                                        padding=True, return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"].tolist()[0][:len(rows[0])] == rows[0] and (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        theirs = hf(**enc).logits.squeeze(-1)
    ours = rewards(model, rows, tiny_tokenizer.pad_token_id)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0.1  # the comparison is not between near-constant scores


def hf_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.padding_side == "right"
    return tok


def test_non_default_value_head_prefix_round_trips(base_dir, tiny_tokenizer, rows, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = value_model(base_dir, tiny_tokenizer, value_head_prefix="value_head")
    torch.nn.init.normal_(getattr(model, HEAD).weight, std=1.0)
    save_hf_model(Unwrapped(model), tiny_tokenizer, str(tmp_path / "rm"), key_prefixes=head_key_prefixes("value_head"))
    with safe_open(str(tmp_path / "rm" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "value_head.weight" in keys and "score.weight" not in keys
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["value_head_prefix"] == "value_head"
    again = value_model(tmp_path / "rm", tiny_tokenizer, value_head_prefix="value_head")
    torch.testing.assert_close(getattr(again, HEAD).weight, getattr(model, HEAD).weight, rtol=0, atol=0)
    torch.testing.assert_close(rewards(again, rows, 0), rewards(model, rows, 0), rtol=0, atol=1e-6)
    # documented: HF's class looks for `score` only, so it starts a fresh head here
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), num_labels=1)
    assert not torch.equal(hf.score.weight, getattr(model, HEAD).weight)


def test_bad_value_head_prefix_is_refused(base_dir):
    from rlhf_ops.config import ConfigError
    with pytest.raises(ConfigError, match="--value_head_prefix"):
        load_value_model(str(base_dir), value_head_prefix="lm_head")


def test_reward_std_is_derived_exactly_from_first_and_second_moments():
    from rlhf_ops.trainers.rm import RewardLoop

    r = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    means = {"reward_mean": r.mean().item(), "reward_sq": (r ** 2).mean().item(), "acc": 0.5}
    out = RewardLoop.derived_metrics(None, means)
    assert set(out) == {"reward_mean", "reward_std", "acc"}
    assert math.isclose(out["reward_std"], r.std(unbiased=False).item(), rel_tol=1e-12)


def test_lora_trains_only_adapters_and_the_head_and_saves_the_head(base_dir, tiny_tokenizer, rows, tmp_path):
    from peft import PeftModel

    from rlhf_ops.models.lora import apply_lora
    from rlhf_ops.trainers.rm import RMConfig

    cfg = RMConfig(pretrain=str(base_dir), dataset="unused", lora_rank=4, lora_alpha=8)
    model = apply_lora(value_model(base_dir, tiny_tokenizer).train(), cfg, task_type="SEQ_CLS", modules_to_save=[HEAD])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or f".{HEAD}.modules_to_save." in n for n in trainable)
    assert any(f".{HEAD}." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = collate(rows, [[1] * len(r) for r in rows], tiny_tokenizer.pad_token_id)
    sequence_rewards(token_values(model, batch), batch).sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and any(f".{HEAD}." in n for n in changed)
    save_hf_model(Unwrapped(model), tiny_tokenizer, str(tmp_path / "adapter"))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith(f"{HEAD}.weight") for k in f.keys())
    model.eval()
    reloaded = PeftModel.from_pretrained(value_model(base_dir, tiny_tokenizer), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(rewards(reloaded, rows, 0), rewards(model, rows, 0), rtol=0, atol=1e-6)
