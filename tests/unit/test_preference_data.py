"""Preference pairs: formats, exact masks, dropped pairs, errors, and the pair batch layout.

Expected ids are built independently: the tokenizer applied to the full formatted text (plain:
template + response + EOS; chat: `apply_chat_template` of the whole conversation), with the mask
set on the response's tokens only.
"""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ops.data.preference import build_preference_set, pair_batch, split_pairs
from rlhf_ops.data.sources import DataError
from rlhf_ops.trainers.rm import RMConfig

TEMPLATE = "User: {}\nAssistant: "


def cfg_for(dataset, **kw) -> RMConfig:
    return RMConfig(pretrain="tiny-model", dataset=str(dataset), **kw)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_pairs_share_the_templated_prompt_and_mask_only_the_response(tiny_tokenizer, builtin_data_dir):
    cfg = cfg_for(builtin_data_dir / "preference", prompt_key="prompt", input_template=TEMPLATE, margin_key="margin")
    ps = build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=8, margin_key="margin")
    rows = [json.loads(x) for x in (builtin_data_dir / "preference" / "train.jsonl").read_text().splitlines()[:8]]
    assert len(ps) == 8 and ps.row_index == list(range(8))
    eos = tiny_tokenizer.eos_token_id
    for i, row in enumerate(rows):
        prompt = ids(tiny_tokenizer, TEMPLATE.format(row["prompt"]))
        for side, got, mask in (("chosen", ps.chosen_ids[i], ps.chosen_mask[i]),
                                ("rejected", ps.rejected_ids[i], ps.rejected_mask[i])):
            response = ids(tiny_tokenizer, row[side]) + [eos]
            assert got == prompt + response
            assert mask == [0] * len(prompt) + [1] * len(response)
    assert ps.margins == [r["margin"] for r in rows]


def test_chat_pairs_without_prompt_key_score_the_last_assistant_turn(tiny_tokenizer, builtin_data_dir):
    cfg = cfg_for(builtin_data_dir / "preference_chat", apply_chat_template=True)
    ps = build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=4)
    rows = [json.loads(x) for x in (builtin_data_dir / "preference_chat" / "train.jsonl").read_text().splitlines()[:4]]
    for i, row in enumerate(rows):
        full = tiny_tokenizer.apply_chat_template(row["rejected"], tokenize=False)
        head = tiny_tokenizer.apply_chat_template(row["rejected"][:-1], tokenize=False, add_generation_prompt=True)
        assert ps.rejected_ids[i] == ids(tiny_tokenizer, full)  # no extra BOS/EOS: the template has them
        n_head = len(ids(tiny_tokenizer, head))
        assert ps.rejected_mask[i] == [0] * n_head + [1] * (len(ps.rejected_ids[i]) - n_head)
    assert ps.margins is None


def test_chat_pairs_with_prompt_key_equal_the_whole_conversation(tiny_tokenizer, tmp_path):
    q, good, bad = "What is 2 + 2?", "2 + 2 = 4\nAnswer: 4", "2 + 2 = 5\nAnswer: 5"
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": [{"role": "user", "content": q}], "c": good, "r": bad}])
    cfg = cfg_for(path, apply_chat_template=True, prompt_key="q", chosen_key="c", rejected_key="r")
    ps = build_preference_set(cfg, tiny_tokenizer, path, "train")
    conv = [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
    assert ps.chosen_ids[0] == ids(tiny_tokenizer, tiny_tokenizer.apply_chat_template(conv, tokenize=False))


def test_identical_pairs_are_counted_and_dropped(tiny_tokenizer, tmp_path, caplog):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "same", "rejected": "same"},
            {"prompt": "c", "chosen": "z", "rejected": "w"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = cfg_for(path, prompt_key="prompt", input_template=TEMPLATE)
    with caplog.at_level("INFO"):
        ps = build_preference_set(cfg, tiny_tokenizer, path, "train")
    assert ps.row_index == [0, 2]
    assert ps.stats == {"rows": 3, "pairs": 2, "dropped_one_side": 0, "dropped_identical": 1}
    assert "1 dropped because chosen == rejected" in caplog.text


def test_a_pair_is_dropped_when_either_side_is_dropped(tiny_tokenizer, tmp_path):
    long_q = "What is " + " + ".join(["1"] * 40) + "?"
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rows = [{"chosen": conv("What is 1 + 1?", "2"), "rejected": conv("What is 1 + 1?", "3")},
            {"chosen": conv("What is 1 + 2?", "3"), "rejected": conv(long_q, "3")},  # rejected prompt > max_len
            {"chosen": conv(long_q, "41"), "rejected": conv("What is 2 + 2?", "5")}]  # chosen prompt > max_len
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ps = build_preference_set(cfg_for(path, apply_chat_template=True, max_len=40), tiny_tokenizer, path, "train")
    assert ps.row_index == [0] and ps.stats["dropped_one_side"] == 2
    assert len(ps.chosen_ids) == len(ps.rejected_ids) == 1


def test_no_usable_pair_is_an_error(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no usable pairs.*1 have chosen == rejected"):
        build_preference_set(cfg_for(path, prompt_key="prompt"), tiny_tokenizer, path, "train")


@pytest.mark.parametrize("flag,value", [("chosen_key", "good"), ("rejected_key", "bad"), ("prompt_key", "question")])
def test_missing_key_names_the_key_and_the_keys_present(tiny_tokenizer, builtin_data_dir, flag, value):
    cfg = cfg_for(builtin_data_dir / "preference", **{flag: value})
    with pytest.raises(DataError, match=rf"missing key '{value}' in .*preference \(keys present: prompt, chosen, rejected, margin, error\)"):
        build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=4)


def test_missing_or_bad_margin_column_is_an_error(tiny_tokenizer, builtin_data_dir, tmp_path):
    cfg = cfg_for(builtin_data_dir / "preference_chat", apply_chat_template=True)
    with pytest.raises(DataError, match="missing key 'margin'"):
        build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=4, margin_key="margin")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y", "m": "big"}])
    with pytest.raises(DataError, match="row 0: margin 'm' must be a number, got 'big'"):
        build_preference_set(cfg_for(path, prompt_key="prompt"), tiny_tokenizer, path, "train", margin_key="m")


def test_same_chosen_and_rejected_keys_are_refused():
    from rlhf_ops.config import ConfigError
    with pytest.raises(ConfigError, match="--rejected_key: must differ from --chosen_key"):
        RMConfig(pretrain="m", dataset="d", chosen_key="x", rejected_key="x")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_pair_batch_holds_chosen_rows_then_rejected_rows(tiny_tokenizer, builtin_data_dir, packed):
    cfg = cfg_for(builtin_data_dir / "preference", prompt_key="prompt", input_template=TEMPLATE, margin_key="margin")
    ps = build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=10, margin_key="margin")
    pick = [7, 2, 5]
    pb = pair_batch(ps, pick, tiny_tokenizer.pad_token_id, packed=packed, device="cpu")
    want = [ps.chosen_ids[i] for i in pick] + [ps.rejected_ids[i] for i in pick]
    assert pb.num_pairs == 3 and pb.batch.seq_lens == [len(x) for x in want]
    if packed:
        assert pb.batch.input_ids_BT.tolist() == [[t for x in want for t in x]]
    else:
        assert [row[:len(x)] for row, x in zip(pb.batch.input_ids_BT.tolist(), want)] == want
    torch.testing.assert_close(pb.margin_P, torch.tensor([ps.margins[i] for i in pick]))
    c, r = split_pairs(torch.arange(6), 3)
    assert c.tolist() == [0, 1, 2] and r.tolist() == [3, 4, 5]
