"""Tokenize rows of segments into (input_ids, loss_mask) with exact masks, in batches.

Texts are tokenized in one batched call per chunk (fast tokenizers parallelise that), then each
row's segments are concatenated. `--max_len` truncates; a row whose untrained prefix already
fills `max_len` cannot contribute a loss token and is dropped. Both are counted and logged,
and a set where every row is dropped is an error that says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhf_ops.data.sources import DataError
from rlhf_ops.data.templates import Segment

logger = logging.getLogger(__name__)


@dataclass
class TokenizedSet:
    """Token ids and per-token loss masks (1 = this token is a training target), one per row."""
    input_ids: list[list[int]]
    loss_mask: list[list[int]]
    row_index: list[int]  # index of each kept row in the source data
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.input_ids))


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of a text by itself (usually BOS), learned by probing.

    Only the part before the text counts: a tokenizer that also appends ids (BOS a EOS) still
    gives just its prefix.
    """
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for n in range(len(with_sp) - len(without) + 1):
        if with_sp[n:n + len(without)] == without:
            return with_sp[:n]
    return []


def tokenize_rows(rows: Sequence[Sequence[Segment]], tokenizer: Any, *, max_len: int, add_bos: bool,
                  append_eos: bool, source: str, chunk: int = 2048, progress: bool = True) -> TokenizedSet:
    """Tokenize each row's segments; `add_bos` prepends the tokenizer's own special prefix."""
    from tqdm.auto import tqdm

    prefix = special_prefix(tokenizer) if add_bos else []
    eos = tokenizer.eos_token_id
    out = TokenizedSet([], [], [], {"rows": len(rows), "truncated": 0, "dropped_prompt_too_long": 0,
                                    "dropped_no_target": 0})
    bar = tqdm(total=len(rows), desc=f"tokenize {source}", disable=not progress, leave=False)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        texts = [s.text for segs in part for s in segs]
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        k = 0
        for j, segs in enumerate(part):
            ids, mask = list(prefix), [0] * len(prefix)
            for s in segs:
                ids += enc[k]
                mask += [int(s.train)] * len(enc[k])
                k += 1
            if append_eos and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
                mask.append(1)
            _keep(out, ids, mask, start + j, max_len)
        bar.update(len(part))
    bar.close()
    st = out.stats
    if st["truncated"] or st["dropped_prompt_too_long"] or st["dropped_no_target"]:
        logger.info("%s: %d rows, %d truncated to --max_len %d, %d dropped (prompt fills --max_len), "
                    "%d dropped (no target tokens)", source, st["rows"], st["truncated"], max_len,
                    st["dropped_prompt_too_long"], st["dropped_no_target"])
    if not out.input_ids:
        if st["dropped_prompt_too_long"]:
            raise DataError(f"{source}: --max_len {max_len} is shorter than the prompt of every row "
                            f"({st['dropped_prompt_too_long']} of {st['rows']} rows dropped); raise --max_len")
        raise DataError(f"{source}: no usable rows ({st['rows']} read, none with a target token)")
    return out


def _keep(out: TokenizedSet, ids: list[int], mask: list[int], index: int, max_len: int) -> None:
    if len(ids) > max_len:
        first_target = mask.index(1) if 1 in mask else len(mask)
        if first_target >= max_len:  # no target token would survive truncation
            out.stats["dropped_prompt_too_long"] += 1
            return
        ids, mask = ids[:max_len], mask[:max_len]
        out.stats["truncated"] += 1
    if not any(mask[1:]):
        out.stats["dropped_no_target"] += 1
        return
    out.input_ids.append(ids)
    out.loss_mask.append(mask)
    out.row_index.append(index)
