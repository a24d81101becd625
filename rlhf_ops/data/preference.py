"""Preference pairs for reward-model and DPO training: rows -> aligned (chosen, rejected) ids.

Row formats (OpenRLHF's semantics for `--prompt_key`, `--chosen_key`, `--rejected_key`):

* `--apply_chat_template`, no `--prompt_key`: chosen and rejected are whole conversations
  (message lists); the last assistant turn of each is its response, the turns before it the prompt.
* `--apply_chat_template` with `--prompt_key`: a prompt (string or messages) plus a chosen and a
  rejected response (string or assistant messages).
* plain text: the `--prompt_key` value formatted with `--input_template` (no prompt without the
  key), then the response text; BOS is prepended and EOS appended as for SFT.

Both sides go through `templates.pair_segments` and `tokenize.tokenize_rows`, so the response
mask is exact (DPO scores response tokens only; a reward model reads the last token). A pair is
kept only when both sides survive `--max_len` and differ: a pair whose two sides are identical
(after formatting and truncation) has no preference to learn, so it is counted, logged and dropped.

A pair micro-batch is one `Batch` of 2P samples, the P chosen rows then the P rejected rows,
padded or packed by `batching.collate`: one forward scores both sides.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from rlhf_ops.config import check, opt
from rlhf_ops.data.batching import Batch, collate
from rlhf_ops.data.sources import DataError, load_mixture, require_keys
from rlhf_ops.data.templates import Segment, pair_segments
from rlhf_ops.data.tokenize import TokenizedSet, tokenize_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferenceOptions:
    """The data flags every pairwise trainer (RM, DPO) shares, named as in the reference CLI."""
    chosen_key: str = opt("chosen", "JSON key of the chosen response (a whole conversation with --apply_chat_template and no --prompt_key)")
    rejected_key: str = opt("rejected", "JSON key of the rejected response (same forms as --chosen_key)")
    prompt_key: Optional[str] = opt(None, "JSON key of the prompt; None: chosen/rejected hold the whole conversation (chat) or the whole text (plain)")


def validate_preference(cfg: PreferenceOptions) -> None:
    check(cfg.chosen_key != cfg.rejected_key, "rejected_key", f"must differ from --chosen_key ({cfg.chosen_key!r})")
    check(cfg.prompt_key not in (cfg.chosen_key, cfg.rejected_key), "prompt_key",
          f"must differ from --chosen_key and --rejected_key, got {cfg.prompt_key!r}")


@dataclass
class PreferenceSet:
    """Aligned pairs: chosen_ids[i] and rejected_ids[i] come from source row row_index[i].

    Masks are per-token target flags (1 = response token), as in `TokenizedSet`.
    margins: one float per pair from `--margin_key`, or None without a margin column.
    """
    chosen_ids: list[list[int]]
    chosen_mask: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_mask: list[list[int]]
    row_index: list[int]
    margins: list[float] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.row_index)


def side_segments(row: dict, key: str, cfg: Any, tokenizer: Any, where: str) -> list[Segment]:
    """Segments of one side (`key` = chosen or rejected key) of a row: [prompt, response]."""
    prompt = row[cfg.prompt_key] if cfg.prompt_key else None
    return pair_segments(prompt, row[key], tokenizer, apply_chat_template=cfg.apply_chat_template,
                         input_template=cfg.input_template, where=f"{where} ({key})")


def build_preference_set(cfg: Any, tokenizer: Any, spec: str, split: str, probs: str | None = None,
                         max_samples: int | None = None, margin_key: str | None = None) -> PreferenceSet:
    """Load, format and tokenize preference rows (`cfg`: PreferenceOptions + DataOptions + seed)."""
    ds = load_mixture(spec, probs, split=split, max_samples=max_samples, seed=cfg.seed)
    require_keys(ds, [k for k in (cfg.chosen_key, cfg.rejected_key, cfg.prompt_key, margin_key) if k], spec)
    source = f"{spec} ({split})"
    chosen, rejected = [], []
    for i, row in enumerate(ds):
        chosen.append(side_segments(row, cfg.chosen_key, cfg, tokenizer, f"{source} row {i}"))
        rejected.append(side_segments(row, cfg.rejected_key, cfg, tokenizer, f"{source} row {i}"))
    plain = not cfg.apply_chat_template
    kw = dict(max_len=cfg.max_len, add_bos=plain, append_eos=plain, progress=int(os.environ.get("RANK", 0)) == 0)
    c = tokenize_rows(chosen, tokenizer, source=f"{source} {cfg.chosen_key}", **kw)
    r = tokenize_rows(rejected, tokenizer, source=f"{source} {cfg.rejected_key}", **kw)
    margins = _margins(ds[margin_key], margin_key, source) if margin_key else None
    return align_pairs(c, r, margins, source)


def _margins(values: Sequence[Any], key: str, source: str) -> list[float]:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{source} row {i}: margin {key!r} must be a number, got {v!r}")
    return [float(v) for v in values]


def align_pairs(c: TokenizedSet, r: TokenizedSet, margins: list[float] | None, source: str) -> PreferenceSet:
    """Keep the rows whose both sides were tokenized and differ; count and log the rest."""
    rej_at = {row: j for j, row in enumerate(r.row_index)}
    out = PreferenceSet([], [], [], [], [], [] if margins is not None else None)
    identical = 0
    for i, row in enumerate(c.row_index):
        j = rej_at.get(row)
        if j is None:
            continue
        if c.input_ids[i] == r.input_ids[j]:
            identical += 1
            continue
        out.chosen_ids.append(c.input_ids[i])
        out.chosen_mask.append(c.loss_mask[i])
        out.rejected_ids.append(r.input_ids[j])
        out.rejected_mask.append(r.loss_mask[j])
        out.row_index.append(row)
        if margins is not None:
            out.margins.append(margins[row])
    one_side = c.stats["rows"] - len(set(c.row_index) & rej_at.keys())  # pairs that lost a side
    out.stats = {"rows": c.stats["rows"], "pairs": len(out), "dropped_one_side": one_side,
                 "dropped_identical": identical}
    if one_side or identical:
        logger.info("%s: %d pairs kept of %d rows; %d dropped because one side did not survive --max_len, "
                    "%d dropped because chosen == rejected", source, len(out), c.stats["rows"], one_side, identical)
    if not len(out):
        raise DataError(f"{source}: no usable pairs ({c.stats['rows']} rows: {one_side} lost a side to "
                        f"--max_len, {identical} have chosen == rejected)")
    return out


@dataclass
class PairBatch:
    """One micro-batch of P pairs.

    batch: 2P samples, chosen rows [0, P) then rejected rows [P, 2P) (padded or packed).
    margin_P: [P] float32 margins, or None.
    last_index_S: [2P] where each sample's last token sits in the packed row when the pairs share
        their common prefix (`shared_pair_row`), chosen then rejected; None otherwise.
    """
    batch: Batch
    num_pairs: int
    margin_P: torch.Tensor | None = None
    last_index_S: torch.Tensor | None = None


def shared_pair_row(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]) -> tuple[Batch, torch.Tensor]:
    """One packed row in which each pair's rejected side carries only what follows the tokens it shares
    with the chosen side (their common prefix: the prompt, at least), with positions continuing that
    prefix, so `models.attention.packed_layout` attends it to the shared tokens (RM --prefix_sharing).
    Returns the batch (no targets: a reward model reads last tokens) and each sample's last-token index,
    chosen then rejected. A rejected side keeps at least its own last token."""
    ids: list[int] = []
    pos: list[int] = []
    last_c: list[int] = []
    last_r: list[int] = []
    for c, r in zip(chosen, rejected):
        k = 0
        while k < min(len(c), len(r) - 1) and c[k] == r[k]:
            k += 1
        ids += c
        pos += range(len(c))
        last_c.append(len(ids) - 1)
        ids += r[k:]
        pos += range(k, len(r))
        last_r.append(len(ids) - 1)
    ids_1T = torch.tensor(ids, dtype=torch.long)[None]
    batch = Batch(ids_1T, torch.tensor(pos, dtype=torch.long)[None], None, torch.full_like(ids_1T, -100),
                  [len(x) for x in (*chosen, *rejected)])
    return batch, torch.tensor(last_c + last_r, dtype=torch.long)


def pair_batch(data: PreferenceSet, indices: Sequence[int], pad_id: int, *, packed: bool,
               device: Any, share_prefix: bool = False) -> PairBatch:
    """`share_prefix` (reward models only: the row has no targets): `shared_pair_row`."""
    margin = None
    if data.margins is not None:
        margin = torch.tensor([data.margins[i] for i in indices], dtype=torch.float32, device=device)
    if share_prefix:
        batch, last_S = shared_pair_row([data.chosen_ids[i] for i in indices], [data.rejected_ids[i] for i in indices])
        return PairBatch(batch.to(device), len(indices), margin, last_S.to(device))
    ids = [data.chosen_ids[i] for i in indices] + [data.rejected_ids[i] for i in indices]
    masks = [data.chosen_mask[i] for i in indices] + [data.rejected_mask[i] for i in indices]
    batch = collate(ids, masks, pad_id, packed=packed).to(device)
    return PairBatch(batch, len(indices), margin)


def split_pairs(x_S: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_P, rejected_P) from per-sample values of a pair batch."""
    return x_S[:num_pairs], x_S[num_pairs:]


def pair_batch_maker(data: PreferenceSet, pad_id: int, *, packed: bool, device: Any, share_prefix: bool = False):
    """`make_batch(indices) -> PairBatch` for the shared loop."""
    def make(indices: list[int]) -> PairBatch:
        return pair_batch(data, indices, pad_id, packed=packed, device=device, share_prefix=share_prefix)
    return make
