"""rlhf_ops.data.tokenize (and SFT's build_sft_set): segments -> ids + exact loss masks.

Masks are checked against what they must mean for the loss: after `collate` shifts them into
targets, no prompt token is ever a target and every response token (plus EOS / the template's
end) is, exactly once.
"""
from __future__ import annotations

import json
from itertools import groupby

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from rlhf_ops.data.batching import collate
from rlhf_ops.data.sources import DataError
from rlhf_ops.data.templates import Segment
from rlhf_ops.data.tokenize import special_prefix, tokenize_rows
from rlhf_ops.models.tiny import BOS, EOS, PAD, train_bpe
from rlhf_ops.trainers.sft import SFTConfig, build_sft_set

TEMPLATE = "User: {}\nAssistant: "
N = 40  # rows of the built-in data per test


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def read_rows(d, name, split="train"):
    return [json.loads(x) for x in (d / name / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def sft_set(tok, data_dir, name, **kw):
    base = dict(pretrain="tiny-model", dataset=str(data_dir / name), input_key="input", output_key="output")
    cfg = SFTConfig(**{**base, **kw})
    return build_sft_set(cfg, tok, cfg.dataset, "train", max_samples=N)


def runs(mask):
    """[(flag, start, end)] of maximal constant runs of a 0/1 mask."""
    out, start = [], 0
    for flag, grp in groupby(mask):
        n = len(list(grp))
        out.append((flag, start, start + n))
        start += n
    return out


def target_values(ids, mask):
    """The token ids the loss is computed on, read back from the shifted targets of `collate`."""
    tgt = collate([ids], [mask], pad_id=0).targets_BT[0].tolist()
    return [t for t in tgt if t != -100]


def bos_tokenizer(also_eos: bool) -> PreTrainedTokenizerFast:
    """The tiny vocabulary with a post-processor that adds BOS (and EOS) by itself, like Llama's."""
    backend = train_bpe()
    single = f"{BOS} $A {EOS}" if also_eos else f"{BOS} $A"
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(BOS, 1), (EOS, 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)


# --- loss masks on the built-in data -------------------------------------------------------------


def test_plain_prompt_tokens_are_never_targets_and_response_plus_eos_always_are(tiny_tokenizer, builtin_data_dir):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    rows = read_rows(builtin_data_dir, "sft")
    ts = sft_set(tok, builtin_data_dir, "sft", input_template=TEMPLATE)
    assert ts.row_index == list(range(N)) and ts.stats["truncated"] == 0
    for ids, mask, i in zip(ts.input_ids, ts.loss_mask, ts.row_index):
        prompt_ids, response_ids = enc(tok, TEMPLATE.format(rows[i]["input"])), enc(tok, rows[i]["output"])
        assert ids == prompt_ids + response_ids + [eos]  # tiny adds no BOS by itself
        assert mask == [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)
        assert target_values(ids, mask) == response_ids + [eos]
        assert dec(tok, target_values(ids, mask)) == rows[i]["output"] + "<|end|>"


def test_pretrain_mode_trains_every_token(tiny_tokenizer, builtin_data_dir):
    tok = tiny_tokenizer
    rows = read_rows(builtin_data_dir, "sft")
    ts = sft_set(tok, builtin_data_dir, "sft", pretrain_mode=True)
    assert len(ts) == N
    for ids, mask, i in zip(ts.input_ids, ts.loss_mask, ts.row_index):
        assert ids == enc(tok, rows[i]["input"] + rows[i]["output"])  # no EOS appended in pretrain mode
        assert mask == [1] * len(ids)
        assert target_values(ids, mask) == ids[1:]  # every token that has a predecessor


def test_chat_template_masks_prompt_and_generation_prompt_and_trains_content_and_end(tiny_tokenizer,
                                                                                   builtin_data_dir):
    tok, bos = tiny_tokenizer, tiny_tokenizer.bos_token_id
    rows = read_rows(builtin_data_dir, "sft_chat")
    ts = sft_set(tok, builtin_data_dir, "sft_chat", input_key="messages", output_key=None,
                 apply_chat_template=True, input_template=TEMPLATE)
    assert len(ts) == N
    for ids, mask, i in zip(ts.input_ids, ts.loss_mask, ts.row_index):
        (user, assistant) = rows[i]["messages"]
        assert [r[0] for r in runs(mask)] == [0, 1]
        cut = mask.index(1)
        assert dec(tok, ids[:cut]) == f"<|bos|><|user|>\n{user['content']}<|end|>\n<|assistant|>\n"
        assert ids[0] == bos and ids.count(bos) == 1  # BOS from the template only, never doubled
        assert target_values(ids, mask) == ids[cut:] == enc(tok, assistant["content"] + "<|end|>\n")


def test_multiturn_trains_every_assistant_turn_and_no_user_turn(tiny_tokenizer, builtin_data_dir):
    tok = tiny_tokenizer
    rows = read_rows(builtin_data_dir, "sft_multiturn")
    ts = sft_set(tok, builtin_data_dir, "sft_multiturn", input_key="messages", output_key=None,
                 apply_chat_template=True, multiturn=True)
    assert len(ts) == N
    for ids, mask, i in zip(ts.input_ids, ts.loss_mask, ts.row_index):
        u1, a1, u2, a2 = (m["content"] for m in rows[i]["messages"])
        parts = [(flag, dec(tok, ids[s:e])) for flag, s, e in runs(mask)]
        assert parts == [(0, f"<|bos|><|user|>\n{u1}<|end|>\n<|assistant|>\n"), (1, f"{a1}<|end|>\n"),
                         (0, f"<|user|>\n{u2}<|end|>\n<|assistant|>\n"), (1, f"{a2}<|end|>\n")]
        assert dec(tok, target_values(ids, mask)) == f"{a1}<|end|>\n{a2}<|end|>\n"


# --- tokenize_rows: truncation, drops, errors ---------------------------------------------------


def digits_row(prompt: str, response: str) -> list[Segment]:
    return [Segment(prompt, False), Segment(response, True)]


def test_digits_are_one_token_each(tiny_tokenizer):  # the precondition of the length arithmetic below
    assert len(enc(tiny_tokenizer, "1234567890")) == 10


def test_truncation_and_prompt_too_long_drops_are_counted(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    rows = [digits_row("123", "45"),          # 3 + 2 + EOS = 6 <= 8: kept whole
            digits_row("1234", "567890"),     # 11 tokens, first target at 4: truncated to 8
            digits_row("12345678", "9"),      # first target at 8 = max_len: dropped
            digits_row("1234567", "89"),      # first target at 7: truncated, one target survives
            digits_row("123456789", "0")]     # prompt alone exceeds max_len: dropped
    ts = tokenize_rows(rows, tok, max_len=8, add_bos=False, append_eos=True, source="t", progress=False)
    assert ts.stats == {"rows": 5, "truncated": 2, "dropped_prompt_too_long": 2, "dropped_no_target": 0}
    assert ts.row_index == [0, 1, 3]
    assert ts.input_ids == [enc(tok, "12345") + [eos], enc(tok, "12345678"), enc(tok, "12345678")]
    assert ts.loss_mask == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]]
    assert all(len(ids) <= 8 for ids in ts.input_ids)
    assert ts.num_tokens == 6 + 8 + 8


def test_rows_without_a_target_token_are_dropped_and_counted(tiny_tokenizer):
    rows = [digits_row("12", ""), [Segment("7", True)], digits_row("12", "3")]
    ts = tokenize_rows(rows, tiny_tokenizer, max_len=8, add_bos=False, append_eos=False, source="t", progress=False)
    assert ts.stats == {"rows": 3, "truncated": 0, "dropped_prompt_too_long": 0, "dropped_no_target": 2}
    assert ts.row_index == [2]


def test_every_prompt_longer_than_max_len_is_an_error_naming_max_len(tiny_tokenizer):
    rows = [digits_row("12345678", "9"), digits_row("123456789", "0")]
    with pytest.raises(DataError, match=r"^src: --max_len 8 is shorter than the prompt of every row "
                                        r"\(2 of 2 rows dropped\); raise --max_len$"):
        tokenize_rows(rows, tiny_tokenizer, max_len=8, add_bos=False, append_eos=True, source="src", progress=False)


def test_no_row_with_a_target_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match=r"^src: no usable rows \(2 read, none with a target token\)$"):
        tokenize_rows([digits_row("1", ""), digits_row("2", "")], tiny_tokenizer, max_len=8, add_bos=False,
                      append_eos=False, source="src", progress=False)


def test_build_sft_set_max_len_shorter_than_every_prompt_names_max_len(tiny_tokenizer, builtin_data_dir):
    with pytest.raises(DataError, match=r"--max_len 4 is shorter than the prompt of every row"):
        sft_set(tiny_tokenizer, builtin_data_dir, "sft", input_template=TEMPLATE, max_len=4)


def test_eos_is_appended_once_and_not_when_the_response_already_ends_with_it(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    ts = tokenize_rows([digits_row("1", "2<|end|>"), digits_row("1", "2")], tok, max_len=16, add_bos=False,
                       append_eos=True, source="t", progress=False)
    assert ts.input_ids == [enc(tok, "12") + [eos]] * 2 and ts.loss_mask == [[0, 1, 1]] * 2


def test_chunked_tokenization_equals_one_chunk(tiny_tokenizer):
    rows = [digits_row(str(i) * (i % 4 + 1), "ab" * (i % 3)) for i in range(11)]
    kw = dict(max_len=6, add_bos=False, append_eos=True, source="t", progress=False)
    one, many = tokenize_rows(rows, tiny_tokenizer, **kw), tokenize_rows(rows, tiny_tokenizer, chunk=3, **kw)
    assert (one.input_ids, one.loss_mask, one.row_index, one.stats) == \
        (many.input_ids, many.loss_mask, many.row_index, many.stats)


# --- the BOS prefix probe -----------------------------------------------------------------------


def test_special_prefix_probe(tiny_tokenizer):
    assert special_prefix(tiny_tokenizer) == []  # the tiny tokenizer adds nothing by itself
    assert special_prefix(bos_tokenizer(also_eos=False)) == [1]
    assert special_prefix(bos_tokenizer(also_eos=True)) == [1]  # BOS a EOS: the prefix is still BOS


@pytest.mark.parametrize("also_eos", [False, True])
def test_add_bos_prepends_the_probed_prefix_untrained_and_only_once(also_eos):
    tok = bos_tokenizer(also_eos)
    rows = [digits_row("12", "3")]
    kw = dict(max_len=16, append_eos=True, source="t", progress=False)
    with_bos = tokenize_rows(rows, tok, add_bos=True, **kw)
    assert with_bos.input_ids == [[1] + enc(tok, "123") + [2]] and with_bos.loss_mask == [[0, 0, 0, 1, 1]]
    without = tokenize_rows(rows, tok, add_bos=False, **kw)
    assert without.input_ids == [enc(tok, "123") + [2]] and without.loss_mask == [[0, 0, 1, 1]]
