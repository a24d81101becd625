"""PRM data and loss: labels read at the step placeholders, clear errors, packed == padded.

Labels are checked against hand-written rows (the Math-Shepherd example of docs/data_layout.md)
and, on the whole built-in set, against its `value` column (the same labels as probabilities).
The loss is checked against a slow reference: one unpadded forward per row, full logits, the
two reward-token logits read at every placeholder, cross-entropy averaged by hand.
"""
from __future__ import annotations

import json

import pytest
import torch

from rlhf_ops.config import ConfigError, parse_config
from rlhf_ops.data.prm import collate_prm, layout_labels, row_labels, step_token_ids, tokenize_prm
from rlhf_ops.data.sources import DataError
from rlhf_ops.models.tiny import build_model
from rlhf_ops.trainers.prm import PRMConfig, batch_maker, build_prm_set, prm_step

PH, REWARDS = "ки", ["+", "-"]
TEXT = "What is 1 + 54 - 43?\n1 + 54 = 55 ки\n55 - 43 = 14 ки\nAnswer: 14 ки"
LABEL = "What is 1 + 54 - 43?\n1 + 54 = 55 +\n55 - 43 = 14 -\nAnswer: 14 -"


def _cfg(dataset: str, **kw) -> PRMConfig:
    return PRMConfig(pretrain="tiny-model", dataset=dataset, **kw)


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_math_shepherd_label_string_gives_one_hard_label_per_placeholder():
    # "+" and "-" also occur in the question and the steps: only the placeholder slots count
    assert layout_labels(TEXT, LABEL, PH, REWARDS, "row") == [0, 1, 1]
    assert layout_labels(TEXT, LABEL.replace("14 -\nA", "14 +\nA"), PH, REWARDS, "row") == [0, 0, 1]


def test_label_lists_of_tokens_and_of_probabilities():
    assert row_labels(TEXT, ["+", "-", "-"], PH, REWARDS, "row") == [0, 1, 1]
    soft = row_labels(TEXT, [1.0, 0.25, 0], PH, REWARDS, "row")
    assert soft == [1.0, 0.25, 0.0] and all(isinstance(v, float) for v in soft)


@pytest.mark.parametrize("label,needle", [
    (LABEL.replace("What", "Who"), r"differs before the first placeholder \(character 0: 'Who"),
    (LABEL.replace("55 +", "55 *"), r"differs at placeholder 1 of 3 or the text after it \(character 33: '\*"),
    (LABEL.replace("55 -", "56 -"), r"differs at placeholder 1 of 3 or the text after it"),  # step text changed
    (LABEL + "\nmore -", r"differs after the last placeholder \(extra text\) \(character 62: '\\nmore"),
    (["+", "?", "-"], r"label '\?' is not one of --reward_tokens"),
    ([1.0, 1.5, 0.0], r"probabilities in \[0, 1\]"),
    (["+", 1.0, "-"], r"mixes types"),
    (3, r"label is a int"),
])
def test_bad_labels_are_named(label, needle):
    with pytest.raises(DataError, match=rf"^row: .*{needle}"):
        row_labels(TEXT, label, PH, REWARDS, "row")


def test_label_count_mismatch_names_file_and_row(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "prm.jsonl", [{"input": TEXT, "value": [1.0, 0.0, 0.0]},
                                           {"input": TEXT, "value": [1.0, 0.0]}])
    with pytest.raises(DataError, match=rf"^{path} \(train\) row 1: 2 labels for 3 'ки' placeholders"):
        build_prm_set(_cfg(path, label_key="value"), tiny_tokenizer, path, "train")


def test_placeholder_or_reward_token_of_several_pieces_is_refused(tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"--placeholder_token '<step>' is not one token: .* 4 pieces "
                                          r"\['<', 's', 'tep', '>'\]"):
        step_token_ids(tiny_tokenizer, "<step>", REWARDS)
    with pytest.raises(ConfigError, match=r"--reward_tokens '55' is not one token: .* \['5', '5'\]"):
        step_token_ids(tiny_tokenizer, PH, ["55", "-"])


def test_placeholder_merged_with_its_neighbours_is_refused(tiny_tokenizer, tmp_path):
    # "Answer" is one token alone, but " Answer" in running text is another one ("ĠAnswer")
    path = _write(tmp_path / "prm.jsonl", [{"input": "What is 2 + 2?\n2 + 2 = 4 Answer", "label": ["+"]}])
    with pytest.raises(DataError, match=r"row 0: 'Answer' occurs 1 times in the text but its token id \d+ 0 times "
                                        r"after tokenization: in context the tokenizer does not keep it"):
        build_prm_set(_cfg(path, placeholder_token="Answer"), tiny_tokenizer, path, "train")


def test_hard_and_soft_labels_in_one_dataset_are_refused(tiny_tokenizer):
    # one file cannot mix them (its column has one type), but a mixture of two sources can
    with pytest.raises(DataError, match=r"^src row 1: hard \(reward tokens\) labels, but earlier rows have soft"):
        tokenize_prm([TEXT, TEXT], [[1.0, 0.0, 0.0], [0, 1, 1]], tiny_tokenizer, placeholder=PH,
                     placeholder_id=step_token_ids(tiny_tokenizer, PH, REWARDS)[0], max_len=128, source="src")


def test_builtin_label_strings_agree_with_the_value_column(tiny_tokenizer, builtin_data_dir):
    spec = str(builtin_data_dir / "prm")
    hard = build_prm_set(_cfg(spec), tiny_tokenizer, spec, "train")
    soft = build_prm_set(_cfg(spec, label_key="value"), tiny_tokenizer, spec, "train")
    ph, _ = step_token_ids(tiny_tokenizer, PH, REWARDS)
    assert not hard.soft and soft.soft and len(hard) == len(soft) == 2000
    assert hard.input_ids == soft.input_ids
    for ids, h, s in zip(hard.input_ids, hard.labels, soft.labels):
        assert ids.count(ph) == len(h) and h == [0 if v == 1.0 else 1 for v in s]
    assert 0.5 < sum(v for row in soft.labels for v in row) / soft.num_steps < 0.7  # about 59% of steps are "+"


def test_truncation_keeps_the_steps_whose_placeholder_survives(tiny_tokenizer, tmp_path):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ph, _ = step_token_ids(tiny_tokenizer, PH, REWARDS)
    first, second = [i for i, t in enumerate(ids) if t == ph][:2]
    path = _write(tmp_path / "prm.jsonl", [{"input": TEXT, "label": LABEL}, {"input": TEXT, "label": LABEL},
                                           {"input": "no step here", "label": "no step here"}])
    ts = build_prm_set(_cfg(path, max_len=second), tiny_tokenizer, path, "train")  # cuts before the 2nd placeholder
    assert ts.labels == [[0], [0]] and all(len(r) == second and r[first] == ph for r in ts.input_ids)
    assert ts.stats == {"rows": 3, "truncated": 2, "steps_cut": 4, "dropped_no_step": 1}
    with pytest.raises(DataError, match=r"no usable rows \(3 read, none with a step placeholder within --max_len 5\)"):
        build_prm_set(_cfg(path, max_len=5), tiny_tokenizer, path, "train")


def test_options_parse_like_the_reference_and_are_checked():
    cfg = parse_config(PRMConfig, ["--pretrain", "m", "--dataset", "d", "--placeholder_token", "ки",
                                   "--reward_tokens", "+", "-"])
    assert cfg.reward_tokens == ["+", "-"] and cfg.label_key == "label" and cfg.save_path == "./ckpt/prm"
    with pytest.raises(ConfigError, match=r"--reward_tokens: must be distinct"):
        _cfg("d", reward_tokens=["+", "+"])
    with pytest.raises(ConfigError, match=r"--placeholder_token: must be non-empty and not one of --reward_tokens"):
        _cfg("d", placeholder_token="+")
    with pytest.raises(ConfigError, match=r"--apply_chat_template: is not supported"):
        _cfg("d", apply_chat_template=True)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, seed=0)


def reference_loss(model, ids_rows, label_rows, ph, reward_ids, soft) -> torch.Tensor:
    """Mean step cross-entropy, one unpadded full-logits forward per row."""
    losses = []
    with torch.no_grad():
        for ids, labels in zip(ids_rows, label_rows):
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[[t for t, x in enumerate(ids) if x == ph]][:, reward_ids], dim=-1)
            for k, y in enumerate(labels):
                losses.append(-(y * logp[k, 0] + (1 - y) * logp[k, 1]) if soft else -logp[k, y])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("label_key", ["label", "value"], ids=["hard", "soft"])
def test_prm_loss_packed_equals_padded_equals_per_row_reference(model, tiny_tokenizer, builtin_data_dir, label_key):
    spec = str(builtin_data_dir / "prm")
    ts = build_prm_set(_cfg(spec, label_key=label_key), tiny_tokenizer, spec, "eval", max_samples=8)
    ph, reward_ids = step_token_ids(tiny_tokenizer, PH, REWARDS)
    pick = [5, 0, 3, 7, 1]
    assert len({len(ts.input_ids[i]) for i in pick}) > 2  # padding really happens
    ref = reference_loss(model, [ts.input_ids[i] for i in pick], [ts.labels[i] for i in pick], ph, reward_ids, ts.soft)
    results = {}
    for packed in (False, True):
        batch = batch_maker(ts, tiny_tokenizer.pad_token_id, ph, packed, "cpu")(pick)
        with torch.no_grad():
            loss, metrics = prm_step(model, batch, reward_ids)
        results[packed] = loss
        n = sum(len(ts.labels[i]) for i in pick)
        assert metrics["loss"][1] == metrics["acc"][1] == n and 0.0 <= metrics["acc"][0] <= n
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[False].double(), ref, rtol=1e-5, atol=1e-6)


def test_collate_marks_exactly_the_placeholders_in_row_order(tiny_tokenizer):
    ph = 511
    rows = [[3, ph, 4, ph], [5, 6, ph]]
    padded = collate_prm(rows, [[0, 1], [1]], pad_id=0, placeholder_id=ph, soft=False)
    packed = collate_prm(rows, [[0, 1], [1]], pad_id=0, placeholder_id=ph, soft=False, packed=True)
    assert padded.steps_BT.tolist() == [[False, True, False, True], [False, False, True, False]]
    assert packed.steps_BT.tolist() == [[False, True, False, True, False, False, True]]
    assert padded.labels_N.tolist() == packed.labels_N.tolist() == [0, 1, 1] and padded.labels_N.dtype == torch.long
    assert collate_prm(rows, [[1.0, 0.5], [0.0]], pad_id=0, placeholder_id=ph, soft=True).labels_N.dtype == torch.float32
