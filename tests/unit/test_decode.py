"""rlhf_ops.generation.decode: the KV-cached sampler against transformers' generate and a teacher-forced forward."""
import pytest
import torch

from rlhf_ops.generation import decode
from rlhf_ops.generation.base import HFGenerator, SamplingParams

PAD = 0


def _prompts(n_unique=6, repeat=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(3, 500, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
          for _ in range(n_unique)]
    return [p for p in ps for _ in range(repeat)]  # groups of identical prompts, as --n_samples_per_prompt makes


def _llama(tiny_tokenizer):
    from rlhf_ops.models.tiny import build_model

    torch.manual_seed(0)
    return build_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128).eval()


def _llama_with_biases():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every projection has a (random) bias; rope scaled the llama3 way
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, mlp_bias=True, pad_token_id=PAD, initializer_range=0.2,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)  # q/k/v biases (random, so they matter), GQA 4 -> 1, tied embeddings
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=PAD,
                      initializer_range=0.2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return model


def _hf_generate(model, prompts, max_new, eos):
    """transformers' greedy generate on left-padded prompts, cut after the first EOS."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], att[r, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=max_new, pad_token_id=PAD,
                         eos_token_id=eos, use_cache=True)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


def _frequent_token(model, prompts, max_new):
    """A token that, as the EOS, ends rows at the most different steps (some rows never emit it)."""
    rows = _hf_generate(model, prompts, max_new, eos=-1)
    first = lambda tok: {row.index(tok) if tok in row else max_new for row in rows}  # noqa: E731
    return max({t for row in rows for t in row}, key=lambda tok: (len(first(tok)), max_new in first(tok)))


@pytest.mark.parametrize("arch", ["llama", "llama_biases", "qwen2"])
def test_greedy_equals_generate(tiny_tokenizer, arch):
    model = {"llama": lambda: _llama(tiny_tokenizer),
             "llama_biases": _llama_with_biases, "qwen2": _qwen2}[arch]()
    prompts = _prompts()
    assert decode.unsupported(model, 64) is None
    eos = _frequent_token(model, prompts, 12)
    want = _hf_generate(model, prompts, 12, eos)
    got, _ = decode.sample(model, prompts, 12, temperature=0.0, top_p=1.0, seed=0, eos_id=eos, pad_id=PAD)
    assert got == want
    lens = {len(c) for c in got}
    assert len(lens) > 2 and min(lens) < 12  # rows stopped at different steps: finished rows were dropped


def _teacher_forced_logp(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_recorded_logprobs_equal_a_forward_and_seed_repeats(tiny_tokenizer):
    model = _llama(tiny_tokenizer)
    prompts = _prompts()
    eos = _frequent_token(model, prompts, 10)
    got, logps = decode.sample(model, prompts, 10, temperature=0.7, top_p=1.0, seed=3, eos_id=eos, pad_id=PAD,
                               record_logprobs=True)
    assert [len(x) for x in logps] == [len(c) for c in got]
    for p, c, lp in zip(prompts, got, logps):
        assert torch.allclose(torch.tensor(lp), _teacher_forced_logp(model, p, c, 0.7), atol=2e-5)
    again, _ = decode.sample(model, prompts, 10, temperature=0.7, top_p=1.0, seed=3, eos_id=eos, pad_id=PAD)
    other, _ = decode.sample(model, prompts, 10, temperature=0.7, top_p=1.0, seed=4, eos_id=eos, pad_id=PAD)
    assert again == got and other != got
    assert len({tuple(c) for c in got[:3]}) > 1  # one prompt's group holds different samples


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_first_token_frequencies_follow_the_distribution(tiny_tokenizer, top_p):
    model = _llama_with_biases()  # larger weights than the tiny preset's: a peaked next-token distribution
    prompt, n, T = [5, 17, 42, 99], 6000, 0.3
    got, _ = decode.sample(model, [prompt] * n, 1, temperature=T, top_p=top_p, seed=0, eos_id=None, pad_id=PAD)
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / T
    p = torch.softmax(z, -1)
    if top_p < 1:  # generate's nucleus: the most likely tokens whose mass reaches top_p, renormalised
        sp, order = p.sort(descending=True)
        keep = order[:int((sp.cumsum(0) < top_p).sum()) + 1]
        p = torch.zeros_like(p).index_fill(0, keep, 1.0) * p
        p = p / p.sum()
    freq = torch.bincount(torch.tensor([c[0] for c in got]), minlength=p.numel()).float() / n
    assert freq[p == 0].sum() == 0  # nothing outside the nucleus
    top = p.topk(5).indices
    assert p[top].sum() > 0.3  # the check below is about tokens that carry the mass
    sigma = (p[top] * (1 - p[top]) / n).sqrt()
    assert ((freq[top] - p[top]).abs() <= 4 * sigma).all(), (freq[top], p[top])


def test_hf_generator_uses_it_and_records_rollout_logprobs(tiny_tokenizer):
    model = _llama(tiny_tokenizer)
    prompts = _prompts(4, 2)
    gen = HFGenerator(model, tiny_tokenizer, micro_batch_size=5, record_logprobs=True)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=11)
    got = gen.generate(prompts, params)
    assert gen.generate(prompts, params) == got
    for p, c in zip(prompts, got):
        lp = gen.rollout_logprobs[tuple(p) + tuple(c)]
        assert torch.allclose(torch.tensor(lp), _teacher_forced_logp(model, p, c, 1.0), atol=2e-5)
    greedy = gen.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert greedy == _hf_generate(model, prompts, 6, tiny_tokenizer.eos_token_id)


def test_unsupported_models_name_the_reason(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = _llama(tiny_tokenizer)
    assert decode.unsupported(model, 100) is None
    lora = get_peft_model(_llama(tiny_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "not a plain Linear" in decode.unsupported(lora.get_base_model(), 100)
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out)  # a hook the sampler would skip
    assert decode.unsupported(model, 100) == "forward hooks on lm_head"
    handle.remove()
    model.register_forward_pre_hook(lambda m, args: None)  # on the root only (DeepSpeed ZeRO 0-2): never called
    assert decode.unsupported(model, 100) is None
    model.config.sliding_window = 32
    assert "sliding window 32" in decode.unsupported(model, 100)
    assert decode.unsupported(model, 32) is None  # a window the sequence never exceeds changes nothing


def test_a_loaded_model_takes_the_sampler(tiny_model_dir):
    """load_causal_lm hooks the last MLP (models.rows); those hooks must not send it to `generate`."""
    from rlhf_ops.models.loading import load_causal_lm
    from rlhf_ops.models.rows import last_mlp

    model = load_causal_lm(str(tiny_model_dir))
    assert last_mlp(model)._forward_pre_hooks and last_mlp(model)._forward_hooks
    assert decode.unsupported(model, 100) is None


def test_unsupported_model_falls_back_to_generate(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _llama(tiny_tokenizer)
    prompts = _prompts(3, 1)
    want = _hf_generate(base, prompts, 5, tiny_tokenizer.eos_token_id)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: same outputs
    got = HFGenerator(lora, tiny_tokenizer, micro_batch_size=8).generate(prompts, SamplingParams(0.0, 5))
    assert got == want


def test_no_module_is_called(tiny_tokenizer):
    """Under ZeRO-3 a module call runs DeepSpeed's fetch/release hooks, whose all-gathers need every rank in
    step; ranks sample different numbers of steps, so the sampler must only read weights (it once deadlocked)."""
    model = _llama(tiny_tokenizer)
    called = []
    for name, mod in model.named_modules():
        mod.register_forward_pre_hook(lambda m, args, name=name: called.append(name))
    decode.sample(model, _prompts(2, 2), 4, temperature=1.0, top_p=0.9, seed=0, eos_id=None, pad_id=PAD)
    assert called == []


def test_generate_ignores_the_checkpoints_generation_config(tiny_tokenizer):
    """The RL loss scores softmax(logits / T), so a checkpoint's repetition penalty, n-gram ban, top_k or min_p
    must not shape rollouts on the `generate` path (GPUs, other architectures) either; the KV sampler never
    reads them."""
    model = _llama(tiny_tokenizer)
    prompts, eos = _prompts(4, 1), tiny_tokenizer.eos_token_id
    plain = HFGenerator(model, tiny_tokenizer, 8).generate(prompts, SamplingParams(0.0, 12))
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=1, min_p=0.9, typical_p=0.2)
    assert _hf_generate(model, prompts, 12, eos) != plain, "the settings should change plain generate's output"
    hf = HFGenerator(model, tiny_tokenizer, 8, kv_sampler=False)
    assert hf.generate(prompts, SamplingParams(0.0, 12)) == plain
    # with top_k 1 or min_p 0.9 applied, every seed would draw the same (near-argmax) tokens
    draws = [hf.generate(prompts, SamplingParams(1.0, 12, seed=s)) for s in (1, 2)]
    assert draws[0] != draws[1]
