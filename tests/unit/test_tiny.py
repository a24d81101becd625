"""The tiny offline model/tokenizer: loadable with Auto* classes, deterministic, and with the
tokenizer properties the data layers rely on (one token per digit, "ки", prefix-stable chat)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ops.cli.make_tiny import main
from rlhf_ops.models.tiny import build_model, build_tokenizer, make_tiny, train_bpe

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
TEXTS = ["What is 12 + 34? Answer: 46", "Шаг 1: 2 - 3 = -1 ки\nШаг 2: готово ки", "naïve café 🙂\t\n  x",
         "<|user|>\nhi<|end|>\n", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "7 + 5 = 12 ки\nAnswer: 12"}]


def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_auto_classes_load_it(tiny_dir, tok):
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {f.name for f in tiny_dir.iterdir()}
    tok_cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())  # loadable by transformers 4.x too
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tok_cfg
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    cfg = model.config
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.config._attn_implementation == "sdpa"


def test_reloaded_logits_equal_in_memory(tiny_dir, tok):
    ids = torch.tensor([tok.encode("What is 12 + 34? ки", add_special_tokens=False)])
    in_memory = build_model(build_tokenizer(), seed=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        a, b = in_memory(ids).logits, reloaded(ids).logits
    assert a.shape == (1, ids.shape[1], len(tok))
    assert torch.equal(a, b)
    out = reloaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 3


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a, b, c = (make_tiny(tmp_path / n, seed=s, **SMALL) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert _digests(a) == _digests(b)
    da, dc = _digests(a), _digests(c)
    assert da["tokenizer.json"] == dc["tokenizer.json"] and da["model.safetensors"] != dc["model.safetensors"]
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wc = AutoModelForCausalLM.from_pretrained(c).state_dict()
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_deterministic_across_processes(tiny_dir):
    """The BPE trainer runs in Rust (threads, per-process hash seeds): a fresh process must agree.
    Only the tokenizer is checked there; the weights come from torch.manual_seed."""
    code = "import sys; from rlhf_ops.models.tiny import train_bpe; sys.stdout.write(train_bpe().to_str())"
    env = {**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2"}
    fresh = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True,
                           timeout=60).stdout
    assert fresh == train_bpe().to_str()
    assert json.loads(fresh)["model"] == json.loads((tiny_dir / "tokenizer.json").read_text())["model"]


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(build_tokenizer(), seed=9, **SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_round_trip_and_pieces(tok):
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert tok.padding_side == "right" and tok.model_max_length == 1024
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for piece in ["ки", "+", "-", *"0123456789"]:
        assert len(tok.encode(piece, add_special_tokens=False)) == 1, piece
    ids = tok.encode("1234567890 + -98 ки", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip()] == [*"1234567890", "+", "-", "9", "8", "ки"]
    assert tok.encode("step ки", add_special_tokens=False)[-1] == tok.convert_tokens_to_ids("ки")
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_special_tokens(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for t in ["<|user|>", "<|assistant|>", "<|system|>"]:
        assert t in tok.all_special_tokens and len(tok.encode(t, add_special_tokens=False)) == 1
    placeholder = tok.convert_tokens_to_ids("ки")
    assert "ки" not in tok.all_special_tokens
    assert tok.decode([placeholder, tok.eos_token_id], skip_special_tokens=True) == "ки"
    assert len(tok) == len(build_tokenizer()) == 512


def test_chat_template_prefix_property_and_masks(tok):
    for msgs in (CHAT[1:], CHAT):
        full = tok.apply_chat_template(msgs, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        assert full == prompt + msgs[-1]["content"] + "<|end|>\n"
        full_ids = tok.encode(full, add_special_tokens=False)
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        assert full_ids[:len(prompt_ids)] == prompt_ids
    turns = CHAT + [{"role": "user", "content": "And 2 - 9?"}, {"role": "assistant", "content": "-7"}]
    for i in range(1, len(turns)):  # multi-turn: each earlier conversation renders as a prefix
        assert tok.apply_chat_template(turns[:i + 1], tokenize=False).startswith(
            tok.apply_chat_template(turns[:i], tokenize=False))
    assert tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|user|>\nWhat is 7 + 5?<|end|>\n<|assistant|>\n")
    enc = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids[0] == tok.bos_token_id and ids == tok.encode(tok.apply_chat_template(CHAT, tokenize=False),
                                                            add_special_tokens=False)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == CHAT[-1]["content"] + "<|end|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--output_dir", str(out), "--hidden_size", "32", "--num_layers", "1", "--intermediate_size", "64"]
    assert main(argv) == str(out.absolute())
    assert "parameters" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    with pytest.raises(SystemExit, match="not empty"):  # refuses a non-empty dir
        main(argv)
    main(argv + ["--overwrite", "--seed", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temp dirs left behind


@pytest.mark.parametrize("argv, flag", [(["--hidden_size", "100", "--num_heads", "3"], "--hidden_size"),
                                        (["--num_heads", "4", "--num_kv_heads", "3"], "--num_kv_heads"),
                                        (["--num_layers", "0"], "--num_layers"), ([], "--output_dir")])
def test_cli_bad_values_name_the_option(tmp_path, capsys, argv, flag):
    out = [] if flag == "--output_dir" else ["--output_dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as e:
        main(out + argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_make_tiny_refuses_non_empty_dir_and_accepts_empty(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    make_tiny(target, **SMALL)  # an empty directory is fine
    before = _digests(target)
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny(target, seed=1, **SMALL)
    assert _digests(target) == before  # untouched
    make_tiny(target, seed=1, overwrite=True, **SMALL)
    assert _digests(target)["model.safetensors"] != before["model.safetensors"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny(tmp_path / "f", overwrite=True, **SMALL)
