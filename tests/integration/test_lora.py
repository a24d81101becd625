"""LoRA end to end: adapters train alone, save alone, and merge back exactly.

* SFT with --lora_rank 4 trains only the lora_ weights (the base weights stay bit-identical) and
  saves an adapter directory, not a full model; PRM with --lora_rank does the same;
* `lora_combiner` folds an adapter into its base: the merged causal LM's logits and the merged
  reward model's scores equal those of the PEFT model (base + adapter) to 1e-5 in fp32;
* a reward-model head saved under another `--value_head_prefix` reloads with that prefix;
* a mismatched base, an existing output without --overwrite, missing paths and a reward-model
  adapter without --is_rm are refused with a message naming what is wrong.

The model is a very small Llama (hidden 32, 2 layers); training runs in-process (world size 1).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_ops.cli.lora_combiner import main as combiner
from rlhf_ops.options import LoRAOptions

TINY_SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
IDS = torch.tensor([[1, 275, 264, 226, 22, 226, 16, 226, 26, 25, 36, 204, 511],
                    [1, 275, 264, 226, 23, 36, 0, 0, 0, 0, 0, 0, 0]])  # two rows, the second right-padded
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rlhf_ops.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("lora_model") / "tiny", seed=0, **TINY_SIZES)


@pytest.fixture(scope="module")
def sft_lora(model_dir, builtin_data_dir, tmp_path_factory):
    """An SFT LoRA run: (the in-process PEFT model, its weights before training, the saved dir)."""
    from rlhf_ops.distributed import engine as engine_mod
    from rlhf_ops.trainers.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft_lora")
    cfg = SFTConfig(pretrain=str(model_dir), dataset=str(builtin_data_dir / "sft"), input_key="input",
                    output_key="output", input_template="User: {}\nAssistant: ", max_samples=64, max_len=96,
                    train_batch_size=16, micro_train_batch_size=16, learning_rate=1e-2, zero_stage=0,
                    packing_samples=True, lora_rank=4, save_path=str(out / "adapter"), ckpt_path=str(out / "ckpt"))
    seen, create = {}, engine_mod.create_engine

    def spy(model, *args, **kwargs):  # capture the PEFT model and its weights as training starts
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return create(model, *args, **kwargs)

    saved_env = dict(os.environ)
    engine_mod.create_engine = spy
    try:
        train_sft(cfg)
    finally:
        engine_mod.create_engine = create
        os.environ.clear()
        os.environ.update(saved_env)
    return seen["model"], seen["before"], Path(cfg.save_path)


@pytest.mark.slow
def test_sft_lora_trains_only_adapter_weights(sft_lora):
    model, before, _ = sft_lora
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(not torch.equal(params[n], before[n]) for n in trainable)  # every adapter matrix moved
    assert all(torch.equal(p, before[n]) for n, p in params.items() if n not in trainable)


@pytest.mark.slow
def test_sft_lora_saves_an_adapter_not_a_model(sft_lora):
    _, _, saved = sft_lora
    names = {p.name for p in saved.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl"} <= names
    assert "model.safetensors" not in names and "config.json" not in names


def _peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.slow
def test_merged_causal_lm_matches_the_adapter_model(sft_lora, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, adapter = sft_lora
    combiner(["--model_path", str(model_dir), "--lora_path", str(adapter), "--output_path", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not hasattr(merged, "peft_config") and (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        logits = merged(input_ids=IDS, attention_mask=MASK).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=IDS, attention_mask=MASK).logits
    ref = _peft_logits(model_dir, adapter)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the model, so the comparison means something
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_existing_output_is_refused_without_overwrite(sft_lora, model_dir, tmp_path, capsys):
    _, _, adapter = sft_lora
    argv = ["--model_path", str(model_dir), "--lora_path", str(adapter), "--output_path", str(tmp_path / "out")]
    combiner(argv)
    stamp = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit) as e:
        combiner(argv)
    assert e.value.code == 2 and "--output_path" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == stamp
    combiner(argv + ["--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary dir left behind


@pytest.mark.slow
def test_mismatched_base_is_refused_with_both_paths(sft_lora, tmp_path, capsys):
    from rlhf_ops.models.tiny import make_tiny

    _, _, adapter = sft_lora
    other = make_tiny(tmp_path / "wide", seed=0, **{**TINY_SIZES, "hidden_size": 64})
    with pytest.raises(SystemExit):  # the adapter records its (existing, local) base: a different dir is refused
        combiner(["--model_path", str(other), "--lora_path", str(adapter), "--output_path", str(tmp_path / "o1")])
    assert f"was trained on base {json.loads((adapter / 'adapter_config.json').read_text())['base_model_name_or_path']}" \
           f", but --model_path is {other}" in capsys.readouterr().err
    moved = tmp_path / "moved_adapter"  # base recorded as a path that no longer exists: the shapes decide
    shutil.copytree(adapter, moved)
    conf = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "/gone/base"}))
    with pytest.raises(SystemExit):
        combiner(["--model_path", str(other), "--lora_path", str(moved), "--output_path", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert f"--lora_path {moved} does not fit --model_path {other}" in err and "size mismatch" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--model_path", "{tmp}/nope", "--lora_path", "{adapter}"], "--model_path: {tmp}/nope does not exist"),
    (["--model_path", "{base}", "--lora_path", "{tmp}/nope"], "--lora_path {tmp}/nope: no such directory"),
    (["--model_path", "{base}", "--lora_path", "{base}"], "holds a full model (config.json), not an adapter"),
])
def test_missing_or_wrong_paths_are_named(model_dir, tmp_path, capsys, argv, needle):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    fill = lambda s: s.format(tmp=tmp_path, adapter=adapter, base=model_dir)  # noqa: E731
    with pytest.raises(SystemExit):
        combiner([fill(a) for a in argv] + ["--output_path", str(tmp_path / "out")])
    assert fill(needle) in capsys.readouterr().err


@pytest.fixture(scope="module")
def rm_adapter(model_dir, tmp_path_factory) -> Path:
    """A reward model's LoRA adapter with its `score` head, perturbed so that merging is not a no-op."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_ops.models.lora import apply_lora

    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    peft = apply_lora(rm, LoRAOptions(lora_rank=4), task_type="SEQ_CLS", modules_to_save=["score"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in peft.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("rm_lora") / "adapter"
    peft.save_pretrained(out)
    return out


def _rm_scores(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=MASK).logits.squeeze(-1)


@pytest.mark.slow
def test_merged_reward_model_matches_the_adapter_model(rm_adapter, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rlhf_ops.models.reward import load_value_model

    ref = _rm_scores(PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1), str(rm_adapter)))
    combiner(["--model_path", str(model_dir), "--lora_path", str(rm_adapter), "--output_path", str(tmp_path / "rm"),
              "--is_rm"])
    torch.testing.assert_close(_rm_scores(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")), ref,
                               rtol=0, atol=1e-5)
    combiner(["--model_path", str(model_dir), "--lora_path", str(rm_adapter), "--output_path", str(tmp_path / "vh"),
              "--is_rm", "--value_head_prefix", "value_head"])
    torch.testing.assert_close(_rm_scores(load_value_model(str(tmp_path / "vh"), value_head_prefix="value_head")), ref,
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_reward_model_adapter_needs_is_rm(rm_adapter, model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        combiner(["--model_path", str(model_dir), "--lora_path", str(rm_adapter), "--output_path", str(tmp_path / "o")])
    assert "is a reward model's adapter (task_type SEQ_CLS); add --is_rm" in capsys.readouterr().err


@pytest.mark.slow
def test_prm_lora_saves_an_adapter_that_merges(model_dir, builtin_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_ops.trainers.prm import PRMConfig, train_prm

    cfg = PRMConfig(pretrain=str(model_dir), dataset=str(builtin_data_dir / "prm"), max_samples=32, max_len=96,
                    train_batch_size=16, micro_train_batch_size=16, learning_rate=1e-2, zero_stage=0,
                    lora_rank=4, save_path=str(tmp_path / "adapter"), ckpt_path=str(tmp_path / "ckpt"))
    saved_env = dict(os.environ)
    try:
        train_prm(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    combiner(["--model_path", str(model_dir), "--lora_path", cfg.save_path, "--output_path", str(tmp_path / "merged")])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=IDS, attention_mask=MASK)
    torch.testing.assert_close(merged.logits, _peft_logits(model_dir, cfg.save_path), rtol=0, atol=1e-5)
