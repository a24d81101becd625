"""The value-head model: one scalar per token on top of a decoder (reward model, RL critic).

It is Hugging Face's own `AutoModelForSequenceClassification` with `num_labels=1`: loading a
causal-LM checkpoint drops its LM head and adds a fresh `score` head (Linear(H, 1, bias=False)),
and a saved reward model loads back with that same class and scores what we score.

Head name (`--value_head_prefix`, default `score`). In memory the head is always the `score`
attribute, which HF's forward and PEFT's SEQ_CLS task expect. The prefix is the name *on disk*:
`load_value_model` reads `<prefix>.*` weights into `score` (from_pretrained's `key_mapping`),
and saving renames `score.*` back to `<prefix>.*` (`head_key_prefixes` -> `save_hf_model`).
Only with `score` does plain `AutoModelForSequenceClassification.from_pretrained(path,
num_labels=1)` find the head (another prefix gives it a fresh, random `score`), which is why
`score` is the default, as OpenRLHF recommends.

Scores. `token_values` runs the model's own forward (a DeepSpeed engine's forward when training,
whose hooks its backward needs) and captures the head's output at every position: [B, T]; no LM
head exists to compute. `sequence_rewards` takes each sample's value at its last token, padded or
packed. HF's pooled logits are the value at the rightmost token that is not `pad_token_id`: the
same token when samples are right-padded and never end with the pad id (so the pad id must not
be EOS for data that ends with EOS; the trainer warns).

Reward statistics: `set_reward_stats` writes `config.normalize_reward = False`, `config.mean`,
`config.std` (OpenRLHF's fields) for `--normalize_reward` in RL.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any

import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.data.batching import Batch
from rlhf_ops.models.forward import is_packed, unwrap
from rlhf_ops.models.loading import _zero3_context, attn_implementation, fast_paths

HEAD = "score"  # the attribute HF's *ForSequenceClassification and PEFT's SEQ_CLS task use


def head_key_prefixes(value_head_prefix: str) -> dict[str, str] | None:
    """State-dict key renames for saving the head under `value_head_prefix` (None: nothing to do)."""
    return None if value_head_prefix == HEAD else {f"{HEAD}.": f"{value_head_prefix}."}


def check_value_head_prefix(prefix: str) -> None:
    if not prefix.isidentifier() or prefix in ("model", "lm_head"):
        raise ConfigError(f"--value_head_prefix: expected a Python identifier other than 'model' and 'lm_head' "
                          f"(the head's name in the state dict), got {prefix!r}")


def load_value_model(path: str, *, value_head_prefix: str = HEAD, bf16: bool = False, flash_attn: bool = False,
                     ds_config: dict | None = None, load_in_4bit: bool = False, init_head_std: float | None = None,
                     pad_token_id: int | None = None) -> torch.nn.Module:
    """A *ForSequenceClassification (num_labels=1) in train mode, head read from `<prefix>.*`.

    A head missing from the checkpoint (a causal LM) is initialised N(0, init_head_std), default
    1 / (hidden_size + 1) as OpenRLHF does. `pad_token_id` is written to the config: HF's pooling
    needs it. With a ZeRO-3 `ds_config` the weights load partitioned.
    """
    from transformers import AutoModelForSequenceClassification

    check_value_head_prefix(value_head_prefix)
    kwargs: dict[str, Any] = dict(num_labels=1, dtype=torch.bfloat16 if bf16 else torch.float32,
                                  attn_implementation=attn_implementation(flash_attn), output_loading_info=True)
    if value_head_prefix != HEAD:
        kwargs["key_mapping"] = {rf"^{re.escape(value_head_prefix)}\.": f"{HEAD}."}
    if load_in_4bit:
        from rlhf_ops.models.lora import quantization_config
        kwargs["quantization_config"] = quantization_config(True)
    keep = _zero3_context(ds_config)  # noqa: F841  (must stay alive during from_pretrained)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"{path}: could not load a model ({str(e).splitlines()[0]})") from e
    fast_paths(model)
    model.config.use_cache = False
    model.config.value_head_prefix = value_head_prefix
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if any(k.startswith(f"{HEAD}.") for k in info["missing_keys"]):
        std = init_head_std if init_head_std is not None else 1.0 / (model.config.hidden_size + 1)
        init_head(model, std)
    return model.train()


def init_head(model: torch.nn.Module, std: float) -> None:
    """Re-draw the head's weight from N(0, std) (gathered and broadcast from rank 0 under ZeRO-3)."""
    weight = getattr(unwrap(model), HEAD).weight
    ctx = nullcontext()
    if hasattr(weight, "ds_id"):
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    with ctx, torch.no_grad():
        weight.normal_(0.0, std)


def token_values(model: torch.nn.Module, batch: Batch, rows_BT: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] float32: the head applied to the last hidden state at every position.

    Calls `model(...)` itself (HF forward, PEFT wrapper or DeepSpeed engine) and reads the head's
    output through a forward hook, so training through a DeepSpeed engine keeps the engine's
    forward hooks; the pooled logits HF also returns cost one gather and are ignored.
    `rows_BT` ([B, T] bool): the only positions the caller reads. The last layer's MLP then runs
    there only (`models.rows`), and every other position holds NaN, so that reading one fails loudly.
    """
    from rlhf_ops.models.rows import only_rows

    captured: list[torch.Tensor] = []
    handle = getattr(unwrap(model), HEAD).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with only_rows(rows_BT):
            model(**batch.model_inputs(), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the value head to run once per forward, it ran {len(captured)} times")
    values_BT = captured[0].squeeze(-1).float()
    if rows_BT is not None:
        values_BT = values_BT.masked_fill(~rows_BT.to(values_BT.device), float("nan"))
    return values_BT


def last_token_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_S, col_S): where each sample's last token sits in the batch.

    Padded (one sample per row, right padding): (s, seq_len - 1). Packed (all samples in one
    row): (0, cumsum(seq_lens) - 1). One sample in one row is both, with the same answer.
    """
    lens_S = torch.as_tensor(batch.seq_lens, dtype=torch.long)
    if not is_packed(batch):
        return torch.arange(len(lens_S)), lens_S - 1
    return torch.zeros_like(lens_S), lens_S.cumsum(0) - 1


def sequence_rewards(values_BT: torch.Tensor, batch: Batch, last_index_S: torch.Tensor | None = None) -> torch.Tensor:
    """[S] the value at each sample's last token (the reward of a reward model); `last_index_S`: those
    tokens' places in a packed row whose samples share tokens (`data.preference.shared_pair_row`)."""
    if last_index_S is not None:
        return values_BT[0, last_index_S.to(values_BT.device)]
    rows_S, cols_S = last_token_positions(batch)
    return values_BT[rows_S.to(values_BT.device), cols_S.to(values_BT.device)]


def sequence_scores(model: torch.nn.Module, batch: Batch, last_index_S: torch.Tensor | None = None) -> torch.Tensor:
    """[S] a reward model's score of each sample: `sequence_rewards` of `token_values`, with the last
    layer's MLP run at the samples' last tokens only."""
    B, T = batch.input_ids_BT.shape
    rows_BT = torch.zeros(B, T, dtype=torch.bool, device=batch.input_ids_BT.device)
    if last_index_S is not None:
        rows_BT[0, last_index_S.to(rows_BT.device)] = True
    else:
        rows_S, cols_S = last_token_positions(batch)
        rows_BT[rows_S.to(rows_BT.device), cols_S.to(rows_BT.device)] = True
    return sequence_rewards(token_values(model, batch, rows_BT), batch, last_index_S)


def set_reward_stats(model: torch.nn.Module, mean: float, std: float) -> None:
    """Store reward mean/std in the model config (OpenRLHF's fields, read by RL's --normalize_reward)."""
    config = unwrap(model).config
    config.normalize_reward = False
    config.mean = float(mean)
    config.std = float(std)
