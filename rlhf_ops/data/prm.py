"""Process-reward-model data: step placeholders in the input, one label per placeholder.

A row holds `--input_key` text in which every reasoning step ends with `--placeholder_token`
(Math-Shepherd's "ки") and `--label_key`, one of:

* a string in the Math-Shepherd layout: the input with each placeholder replaced by one of
  `--reward_tokens` ("+" step correct, "-" wrong) -> hard labels (an index into the reward tokens);
* a list of reward-token strings, one per placeholder -> hard labels;
* a list of numbers in [0, 1] (e.g. Math-Shepherd's `value`), P(first reward token) -> soft labels.

Labels are read by walking the label string along the input split at the placeholders, so reward
tokens that also occur in the text ("1 + 54") cannot be mistaken for step labels. The whole text is
tokenized at once (as the model sees it at inference) and the placeholder must come out as exactly
one token id per occurrence; anything else is an error, never a silent mis-tokenization.
`--max_len` truncation keeps the steps whose placeholder survives (counted in the log); the loss is
taken at the placeholder positions themselves (OpenRLHF's convention, see `algos.preference`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf_ops.data.batching import Batch, collate
from rlhf_ops.data.sources import DataError
from rlhf_ops.data.templates import prompt_text
from rlhf_ops.data.tokenize import special_prefix

logger = logging.getLogger(__name__)
Labels = list[int] | list[float]  # hard: index into the reward tokens; soft: P(first reward token)


@dataclass
class PRMSet:
    """Tokenized PRM rows: ids and the labels of the placeholders that survived truncation."""
    input_ids: list[list[int]]
    labels: list[Labels]
    row_index: list[int]  # index of each kept row in the source data
    soft: bool
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_steps(self) -> int:
        return sum(map(len, self.labels))


def single_token_id(tokenizer: Any, token: str, flag: str) -> int:
    """The id of `token`, or a ConfigError naming the pieces when the tokenizer splits it."""
    from rlhf_ops.config import ConfigError

    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"--{flag} {token!r} is not one token: the tokenizer splits it into {len(ids)} pieces "
                          f"{pieces}; use a string it keeps whole, or add it to the tokenizer "
                          "(tokenizer.add_tokens) and resize the model's embeddings first")
    return ids[0]


def step_token_ids(tokenizer: Any, placeholder: str, reward_tokens: Sequence[str]) -> tuple[int, list[int]]:
    """(placeholder id, reward token ids), each checked to be a single, distinct token."""
    from rlhf_ops.config import ConfigError

    ph = single_token_id(tokenizer, placeholder, "placeholder_token")
    rewards = [single_token_id(tokenizer, t, "reward_tokens") for t in reward_tokens]
    if len(set(rewards)) != len(rewards) or ph in rewards:
        raise ConfigError(f"--reward_tokens {list(reward_tokens)} and --placeholder_token {placeholder!r} must be "
                          f"distinct tokens, got ids {rewards} and {ph}")
    if ph == tokenizer.pad_token_id:
        raise ConfigError(f"--placeholder_token {placeholder!r} is the tokenizer's padding token")
    return ph, rewards


def layout_labels(text: str, label: str, placeholder: str, reward_tokens: Sequence[str], where: str) -> list[int]:
    """Hard labels from a Math-Shepherd label string: `text` with each placeholder replaced by a reward token."""
    pieces = text.split(placeholder)
    n = len(pieces) - 1

    def mismatch(at: str, pos: int) -> DataError:
        return DataError(f"{where}: the label string is not the input with each of its {n} {placeholder!r} replaced "
                         f"by one of {list(reward_tokens)}: it differs {at} (character {pos}: {label[pos:pos + 30]!r})")

    if not label.startswith(pieces[0]):
        raise mismatch("before the first placeholder", 0)
    pos, out = len(pieces[0]), []
    by_length = sorted(range(len(reward_tokens)), key=lambda j: -len(reward_tokens[j]))
    for k, piece in enumerate(pieces[1:]):
        for j in by_length:  # the reward token that is followed by the next piece of the input
            r = reward_tokens[j]
            if label.startswith(r, pos) and label.startswith(piece, pos + len(r)):
                out.append(j)
                pos += len(r) + len(piece)
                break
        else:
            raise mismatch(f"at placeholder {k + 1} of {n} or the text after it", pos)
    if pos != len(label):
        raise mismatch("after the last placeholder (extra text)", pos)
    return out


def row_labels(text: str, label: Any, placeholder: str, reward_tokens: Sequence[str], where: str) -> Labels:
    """One label per placeholder of `text`, from any supported label form (see module doc)."""
    n = text.count(placeholder)
    if isinstance(label, str):
        return layout_labels(text, label, placeholder, reward_tokens, where)
    if not isinstance(label, (list, tuple)):
        raise DataError(f"{where}: label is a {type(label).__name__}; expected a string in the Math-Shepherd "
                        "layout, a list of reward tokens or a list of probabilities")
    if all(isinstance(v, str) for v in label):
        bad = [v for v in label if v not in reward_tokens]
        if bad:
            raise DataError(f"{where}: label {bad[0]!r} is not one of --reward_tokens {list(reward_tokens)}")
        out: Labels = [list(reward_tokens).index(v) for v in label]
    elif all(isinstance(v, (int, float)) for v in label):
        out = [float(v) for v in label]
        if not all(0.0 <= v <= 1.0 for v in out):
            raise DataError(f"{where}: soft labels must be probabilities in [0, 1], got {label}")
    else:
        raise DataError(f"{where}: label list mixes types ({label!r}); expected reward tokens or probabilities")
    if len(out) != n:
        raise DataError(f"{where}: {len(out)} labels for {n} {placeholder!r} placeholders in the input")
    return out


def tokenize_prm(texts: Sequence[str], labels: Sequence[Labels], tokenizer: Any, *,
                 placeholder: str, placeholder_id: int, max_len: int, source: str, chunk: int = 2048) -> PRMSet:
    """Tokenize whole texts (BOS first, as SFT does for plain text), check placeholders, truncate."""
    prefix = special_prefix(tokenizer)
    soft = is_soft(labels)
    out = PRMSet([], [], [], soft, {"rows": len(texts), "truncated": 0, "steps_cut": 0, "dropped_no_step": 0})
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(enc):
            i = start + j
            where = f"{source} row {i}"
            _check_kind(labels[i], soft, where)
            ids = prefix + list(ids)
            _check_placeholders(ids, texts[i], placeholder, placeholder_id, tokenizer, where)
            _keep(out, ids, list(labels[i]), i, placeholder_id, max_len)
    _log_stats(out, source, max_len)
    return out


def _check_kind(labels: Labels, soft: bool, where: str) -> None:
    if labels and isinstance(labels[0], float) != soft:
        kind = {True: "soft (probabilities)", False: "hard (reward tokens)"}
        raise DataError(f"{where}: {kind[not soft]} labels, but earlier rows have {kind[soft]} labels; "
                        "use one kind per dataset")


def _check_placeholders(ids: list[int], text: str, placeholder: str, placeholder_id: int, tokenizer: Any,
                        where: str) -> None:
    n_text, n_ids = text.count(placeholder), ids.count(placeholder_id)
    if n_text != n_ids:
        at = text.find(placeholder)
        context = text[max(0, at - 10):at + len(placeholder) + 5]
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(context, add_special_tokens=False)["input_ids"])
        raise DataError(f"{where}: {placeholder!r} occurs {n_text} times in the text but its token id "
                        f"{placeholder_id} {n_ids} times after tokenization: in context the tokenizer does not keep "
                        f"it as that one token ({context!r} -> {pieces}); add it to the tokenizer as its own token")


def _keep(out: PRMSet, ids: list[int], labels: Labels, row: int, placeholder_id: int, max_len: int) -> None:
    if len(ids) > max_len:
        ids = ids[:max_len]
        kept = ids.count(placeholder_id)
        out.stats["truncated"] += 1
        out.stats["steps_cut"] += len(labels) - kept
        labels = labels[:kept]
    if not labels:
        out.stats["dropped_no_step"] += 1
        return
    out.input_ids.append(ids)
    out.labels.append(labels)
    out.row_index.append(row)


def _log_stats(out: PRMSet, source: str, max_len: int) -> None:
    st = out.stats
    if st["truncated"] or st["dropped_no_step"]:
        logger.info("%s: %d rows, %d truncated to --max_len %d (%d steps cut), %d dropped (no step left)",
                    source, st["rows"], st["truncated"], max_len, st["steps_cut"], st["dropped_no_step"])
    if not out.input_ids:
        raise DataError(f"{source}: no usable rows ({st['rows']} read, none with a step placeholder within "
                        f"--max_len {max_len})")


def build_prm_rows(ds: Any, *, input_key: str, label_key: str, input_template: str | None, placeholder: str,
                   reward_tokens: Sequence[str], source: str) -> tuple[list[str], list[Labels]]:
    """(formatted texts, labels) for every row of a loaded dataset, labels read from the raw input."""
    texts, labels = [], []
    for i, row in enumerate(ds):
        where = f"{source} row {i}"
        raw = row[input_key]
        text = prompt_text(raw, None, apply_chat_template=False, input_template=input_template, where=where)
        if text.count(placeholder) != raw.count(placeholder):
            raise DataError(f"{where}: --input_template adds {placeholder!r} placeholders to the input")
        labels.append(row_labels(raw, row[label_key], placeholder, reward_tokens, where))
        texts.append(text)
    if is_soft(labels) and len(reward_tokens) != 2:
        raise DataError(f"{source}: soft (probability) labels need exactly 2 --reward_tokens, got {list(reward_tokens)}")
    return texts, labels


def is_soft(labels: Sequence[Labels]) -> bool:
    """Whether the first labelled row has soft (probability) labels."""
    first = next((row for row in labels if row), [])
    return bool(first) and isinstance(first[0], float)


@dataclass
class PRMBatch:
    """One PRM micro-batch.

    inputs: model inputs in the padded or packed layout of `data.batching.collate` (its targets are unused).
    steps_BT: [B, T] bool, True at the placeholder positions whose logits are scored.
    labels_N: [N] labels of those positions in row-major order: long index into the reward tokens
        (hard) or float P(first reward token) (soft), as `algos.preference.prm_loss` takes them.
    """
    inputs: Batch
    steps_BT: torch.Tensor
    labels_N: torch.Tensor

    def to(self, device: torch.device | str) -> "PRMBatch":
        return PRMBatch(self.inputs.to(device), self.steps_BT.to(device), self.labels_N.to(device))


def collate_prm(ids_rows: Sequence[Sequence[int]], label_rows: Sequence[Labels], *, pad_id: int,
                placeholder_id: int, soft: bool, packed: bool = False) -> PRMBatch:
    inputs = collate(ids_rows, [[0] * len(r) for r in ids_rows], pad_id, packed=packed)
    steps = inputs.input_ids_BT == placeholder_id
    if not packed:
        steps &= inputs.attention_mask.bool()
    labels = torch.tensor([v for row in label_rows for v in row], dtype=torch.float32 if soft else torch.long)
    if int(steps.sum()) != labels.numel():
        raise ValueError(f"{int(steps.sum())} placeholder positions for {labels.numel()} labels")
    return PRMBatch(inputs, steps, labels)
