"""A tiny, fully offline Llama model and tokenizer for tests, CI and the `tiny` preset.

Nothing here touches the Hugging Face hub: the tokenizer is a byte-level BPE trained with the
`tokenizers` library on a fixed built-in corpus (so the same vocabulary comes out on every run
and machine), and the model is a randomly initialised `LlamaForCausalLM` seeded explicitly.
`make_tiny` writes both in Hugging Face format, so every stage of the pipeline can load them
with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir)` like a real checkpoint.

Tokenizer properties the pipeline relies on:
  * every string is encodable (byte-level) and `decode(encode(s)) == s`;
  * digits are one token each, "+", "-", "*", "/", "=" are always their own token (the
    built-in task is arithmetic, and the PRM scores steps with "+"/"-" labels);
  * the PRM step placeholder "ки" is one added, non-special token;
  * the chat template is prefix-stable: render([user]) with a generation prompt, plus the
    assistant content and "<|end|>\\n", equals render([user, assistant]); assistant turns are
    wrapped in `{% generation %}` so `return_assistant_tokens_mask=True` works.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # torch/transformers are imported where used: `train_bpe` needs neither
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5, in this order
PRM_PLACEHOLDER = "ки"
VOCAB_SIZE = 511  # BPE vocab incl. specials; + the placeholder = 512 tokens in all
MODEL_MAX_LENGTH = 1024

# BOS, then <|role|>\n{content}<|end|>\n per message (roles: system, user, assistant).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% elif message['role'] in ['user', 'system'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer simple questions.
You are a helpful assistant. Please answer the question and show your work step by step.
What is the sum of these numbers? What is the difference? What is the product of two numbers?
First, add the ones digit. Then carry the one and add the tens. So the answer is correct.
The reward model prefers the chosen response over the rejected response. The policy is
trained with reinforcement learning from human feedback, and the critic estimates the value.
Let me think about this problem. We need to compute the result, then check it again.
This is a good answer because it is correct, short and clear. That answer is wrong.
Here is an example: the number of apples in the basket was seven, then she ate three.
How many are left? There are four left. Thank you for your help, it was very useful.
Write a short story about a cat, a dog and a bird who are friends and live in a house.
The weather is nice today, the sun is shining and the children are playing outside.
Explain why the sky is blue in one sentence. Sunlight is scattered by the air in the sky.
I do not know the answer to that question, but I can try to find out with you.
Step 1: read the question. Step 2: solve it. Step 3: write the final answer.
"""


def _corpus() -> list[str]:
    """The fixed training text: English, the chat/QA scaffolding and arithmetic."""
    lines = _TEXT.splitlines() * 2  # twice: every word clears min_frequency
    for a in range(0, 20):
        for b in range(0, 20, 3):
            lines.append(f"User: What is {a} + {b}? Assistant: {a} + {b} = {a + b}. Answer: {a + b}")
            lines.append(f"Question: What is {a} - {b}?\nAnswer: The answer is {a - b}.")
            lines.append(f"Step 1: {a} * {b} = {a * b} ки\nStep 2: so the result is {a * b} ки")
    return lines


def train_bpe() -> Tokenizer:
    """The bare `tokenizers` backend: byte-level BPE trained on `_corpus()`, specials, "ки"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[+\-*/=]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(PRM_PLACEHOLDER, special=False, normalized=False)])
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The deterministic byte-level BPE tokenizer with the chat template (see module doc)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS), model_max_length=MODEL_MAX_LENGTH,
        padding_side="right", chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 512, max_position_embeddings: int = 1024,
                seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised float32 Llama whose weights depend only on the sizes and `seed`.

    The caller's global torch RNG state is left untouched (the init runs under `fork_rng`).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model.eval()


def make_tiny(output_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False, **sizes) -> Path:
    """Write tokenizer + model (safetensors) + generation config to `output_dir`, atomically.

    Everything is written to a temporary directory beside the target and renamed into place, so
    a crash never leaves a half-written model. A non-empty `output_dir` is refused unless
    `overwrite=True`. `sizes` are `build_model`'s size arguments.
    """
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    from transformers.utils import logging as hf_logging

    from rlhf_ops.utils.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed=seed, **sizes)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 4 MB file
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # the safetensors writer uses an owner-only mode
    return out



def _portable_tokenizer_config(path: Path) -> None:
    """Make the tokenizer loadable by transformers 4.x too (vLLM images often pin it).

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"` and a list-valued
    `extra_special_tokens`, neither of which 4.x understands; `PreTrainedTokenizerFast` and
    `additional_special_tokens` load identically in both (5.x converts them back on load).
    """
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
