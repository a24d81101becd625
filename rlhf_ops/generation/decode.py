"""A KV-cached sampler for Llama-family decoders on CPU: `generate` without its per-token overhead.

On a small model, Hugging Face `generate` spends most of each decode step outside the matmuls:
its logits processors, stopping criteria, cache objects, mask builders and module wrappers,
plus `torch.multinomial`, whose exponential draws alone cost ~1 ms per step for 64 rows of a
512-token vocabulary. Here one decode step is the decoder's arithmetic and little else:

- q/k/v and gate/up are one matmul each (weights concatenated once per call), through oneDNN on
  fp32 where `models.onednn` is on (as the training forward is);
- RoPE is one complex multiply: q/k weight rows are permuted per head from the half-split
  layout to interleaved pairs, which leaves every q.k product unchanged;
- keys and values go to a preallocated [B, KV, L, D] cache, attended with SDPA (GQA in the kernel);
- a group of identical prompts (--n_samples_per_prompt) is prefilled once and its cache copied;
- finished rows leave the batch, so a step costs what the unfinished rows cost;
- a token is drawn by inverting the CDF with one uniform per row, from a generator seeded per
  call: the same seed gives the same samples, whichever rows are still running.

The distribution is the one `generate` samples from (softmax(logits / T), nucleus-filtered by
top_p; T == 0 is greedy), and the recorded log-probs are log softmax(logits / T) of the drawn
tokens, as `HFGenerator` records them. A checkpoint's generation_config.json (a repetition
penalty, top_k) is not applied, on purpose: the RL loss scores softmax(logits / T), so sampling
from anything else would make the rollouts off-policy (`HFGenerator` neutralises it on the
`generate` path too: `base.NEUTRAL`). The samples themselves differ from `generate`'s, which
draws with `torch.multinomial`. Models this does not cover (other architectures, LoRA-wrapped
or quantized layers, a user's forward hook on a submodule, a sliding window shorter than the
sequence, a GPU) go to `generate`:
`unsupported(...)` says why. Tests: tests/unit/test_decode.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhf_ops.models import onednn

ARCHITECTURES = ("llama", "qwen2", "mistral")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unsupported(hf: torch.nn.Module, max_len: int) -> str | None:
    """Why `sample` cannot run `hf` for sequences of up to `max_len` tokens (None: it can)."""
    cfg = hf.config
    if cfg.model_type not in ARCHITECTURES:
        return f"model_type {cfg.model_type!r} (covered: {', '.join(ARCHITECTURES)})"
    if next(hf.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
        return f"sliding window {window} < sequence length {max_len}"
    inner = getattr(hf, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a *ForCausalLM with .model.{embed_tokens,layers,norm,rotary_emb}"
    for i, layer in enumerate(inner.layers):
        for name in _LINEARS:
            mod = layer.get_submodule(name)
            if type(mod) not in _PLAIN_LINEAR:
                return f"layers.{i}.{name} is a {type(mod).__name__}, not a plain Linear (LoRA/quantized)"
        if hasattr(layer.self_attn, "q_norm"):
            return "q/k norms in attention"
    # the sampler reads weights and calls no module, so forward hooks would not run: a model with a hook of its
    # user's (a logit hook) goes to `generate`. DeepSpeed's are no reason: ZeRO-3's fetch/release hooks on every
    # submodule have nothing to do while the generator holds the weights gathered, and ZeRO 0-2 hook only the root;
    # nor are `models.rows`' hooks on the last MLP, which do nothing outside `only_rows` (the sampler computes every row)
    hooked = [n for n, m in hf.named_modules() if n and _user_hooks(m)]
    if hooked:
        return f"forward hooks on {hooked[0]}" + (f" and {len(hooked) - 1} more modules" if len(hooked) > 1 else "")
    from torch.nn.modules import module as _module
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "global forward hooks"
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        return f"embed_tokens is a {type(inner.embed_tokens).__name__}, not a plain Embedding"
    if type(getattr(hf, "lm_head", None)) not in _PLAIN_LINEAR:
        return "lm_head is not a plain Linear"
    return None


_PLAIN_LINEAR = (torch.nn.Linear, onednn.Linear)  # models.onednn.Linear is nn.Linear with another kernel
_OWN_HOOKS = ("deepspeed.", "rlhf_ops.models.rows")  # models.rows' hooks act only inside its only_rows()


def _user_hooks(module: torch.nn.Module) -> list:
    """The module's forward (pre-)hooks that are neither DeepSpeed's nor `models.rows`' own."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not (getattr(h, "__module__", None) or "").startswith(_OWN_HOOKS)]


@dataclass
class _Layer:
    norm1: torch.Tensor
    eps1: float
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: torch.Tensor | None
    b_down: torch.Tensor | None


def _interleave_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from RoPE's half-split order to interleaved pairs."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
    idx = (torch.arange(heads)[:, None] * head_dim + perm[None]).reshape(-1).to(w.device)
    return w.index_select(0, idx)


def _cat_bias(mods: Sequence[torch.nn.Linear], fix: Sequence) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([f(m.bias) if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m, f in zip(mods, fix)])


class _Weights:
    """The decoder's weights, fused for decoding; taken once per call (they change between calls)."""

    def __init__(self, hf: torch.nn.Module):
        cfg, inner = hf.config, hf.model
        attn0 = inner.layers[0].self_attn
        self.H, self.KV = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = attn0.head_dim
        self.scaling = float(attn0.scaling)
        self.linear = onednn.linear if onednn.wanted() else F.linear
        # weights and plain forwards only, never a module call: under ZeRO-3 a module call runs DeepSpeed's
        # fetch/release hooks, whose all-gathers would need every rank in step (ranks sample different lengths)
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb.forward
        self.lm_head_w, self.lm_head_b = hf.lm_head.weight, hf.lm_head.bias
        self.norm, self.norm_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        qfix = lambda t: _interleave_rows(t, self.H, self.D)  # noqa: E731
        kfix = lambda t: _interleave_rows(t, self.KV, self.D)  # noqa: E731
        keep = lambda t: t  # noqa: E731
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = (a.q_proj, a.k_proj, a.v_proj)
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight, eps1=float(layer.input_layernorm.variance_epsilon),
                w_qkv=torch.cat([qfix(a.q_proj.weight), kfix(a.k_proj.weight), a.v_proj.weight]),
                b_qkv=_cat_bias(qkv, (qfix, kfix, keep)), w_o=a.o_proj.weight, b_o=a.o_proj.bias,
                norm2=layer.post_attention_layernorm.weight, eps2=float(layer.post_attention_layernorm.variance_epsilon),
                w_gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                b_gate_up=_cat_bias((m.gate_proj, m.up_proj), (keep, keep)), w_down=m.down_proj.weight, b_down=m.down_proj.bias))

    def rope(self, x: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, 1, D/2] complex rotations from the model's own rotary module (any rope type)."""
        cos, sin = self.rotary(x, position_ids_BT)
        half = self.D // 2
        return torch.complex(cos[..., :half].float(), sin[..., :half].float())[:, :, None]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(t_BTHD: torch.Tensor, rot_BT1F: torch.Tensor) -> torch.Tensor:
    shape = t_BTHD.shape
    c = torch.view_as_complex(t_BTHD.float().reshape(*shape[:-1], -1, 2))
    return torch.view_as_real(c * rot_BT1F).reshape(shape).to(t_BTHD.dtype)


class _Cache:
    """Keys and values of every layer, filled up to `length`: [B * KV, L, D] (row b * KV + h), so that a
    decode step's attention is one batched matmul per side over (row, kv head) with no copy."""

    def __init__(self, n_layers: int, B: int, KV: int, L: int, D: int, like: torch.Tensor):
        self.B, self.KV, self.L, self.D = B, KV, L, D
        self.k = [like.new_zeros(B * KV, L, D) for _ in range(n_layers)]
        self.v = [like.new_zeros(B * KV, L, D) for _ in range(n_layers)]
        self.length = 0

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.B, self.KV, self.L, self.D)

    def select(self, rows: torch.Tensor) -> None:
        self.k = [self.view(k).index_select(0, rows).view(-1, self.L, self.D) for k in self.k]
        self.v = [self.view(v).index_select(0, rows).view(-1, self.L, self.D) for v in self.v]
        self.B = len(rows)


def _forward(w: _Weights, cache: _Cache, ids_BT: torch.Tensor, pos_BT: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden states [B, T, C] of `ids_BT` placed at cache slots [length, length + T); extends the cache.

    Prefill (T > 1): `mask` is [B, 1, T, length + T] bool (True: attend), None for plain causal.
    Decode (T == 1): `mask` is [B * KV, 1, length + 1] additive (0 or -inf), None when nothing is masked.
    """
    B, T = ids_BT.shape
    H, KV, D = w.H, w.KV, w.D
    x = F.embedding(ids_BT, w.embed)
    rot = w.rope(x, pos_BT)
    t0, t1 = cache.length, cache.length + T
    for i, lw in enumerate(w.layers):
        h = _rms_norm(x, lw.norm1, lw.eps1)
        q, k, v = w.linear(h, lw.w_qkv, lw.b_qkv).split([H * D, KV * D, KV * D], dim=-1)
        q = _rotate(q.view(B, T, H, D), rot)
        ck, cv = cache.view(cache.k[i]), cache.view(cache.v[i])
        ck[:, :, t0:t1] = _rotate(k.view(B, T, KV, D), rot).transpose(1, 2)
        cv[:, :, t0:t1] = v.view(B, T, KV, D).transpose(1, 2)
        if T == 1:  # q heads h * G .. h * G + G - 1 share kv head h, as in HF's repeat_kv
            q_RGD = q.view(B * KV, H // KV, D)
            k_RDt = cache.k[i][:, :t1].transpose(1, 2)
            scores = (torch.baddbmm(mask, q_RGD, k_RDt, alpha=w.scaling) if mask is not None
                      else torch.bmm(q_RGD, k_RDt).mul_(w.scaling))
            o = torch.bmm(torch.softmax(scores, dim=-1), cache.v[i][:, :t1]).view(B, 1, H * D)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), ck[:, :, :t1], cv[:, :, :t1], attn_mask=mask,
                                               is_causal=mask is None, scale=w.scaling, enable_gqa=H != KV)
            o = o.transpose(1, 2).reshape(B, T, H * D)
        x = x + w.linear(o, lw.w_o, lw.b_o)
        h = _rms_norm(x, lw.norm2, lw.eps2)
        gate, up = w.linear(h, lw.w_gate_up, lw.b_gate_up).chunk(2, dim=-1)
        x = x + w.linear(F.silu(gate) * up, lw.w_down, lw.b_down)
    cache.length = t1
    return x


def _next_logits(w: _Weights, x_BTC: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, V] at each row's last position."""
    return w.linear(_rms_norm(x_BTC[:, -1], w.norm, w.norm_eps), w.lm_head_w, w.lm_head_b).float()


def _nucleus(z_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the top_p nucleus set to -inf (the most likely token always stays), as generate's TopP."""
    sorted_z, order = torch.sort(z_BV, dim=-1)
    drop_sorted = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop_sorted[:, -1] = False
    return z_BV.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))


def _draw(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float, top_p: float,
          record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [B], log p of each token under softmax(logits / T) or None): inverse-CDF draws from `u_B`."""
    if temperature == 0:
        tok = logits_BV.argmax(dim=-1)
        return tok, (torch.log_softmax(logits_BV, -1).gather(1, tok[:, None])[:, 0] if record else None)
    z = logits_BV / temperature
    logp = torch.log_softmax(z, dim=-1)
    probs = torch.softmax(_nucleus(z, top_p), dim=-1) if top_p < 1.0 else logp.exp()
    cdf = probs.cumsum(dim=-1)
    tok = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    return tok, (logp.gather(1, tok[:, None])[:, 0] if record else None)


@torch.no_grad()
def sample(hf: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           top_p: float, seed: int, eos_id: int | None, pad_id: int,
           record_logprobs: bool = False) -> tuple[list[list[int]], list[list[float]] | None]:
    """Completions of `prompts` (each ends at and includes the first EOS, or at max_new_tokens), and,
    with `record_logprobs`, each completion token's log p under softmax(logits / temperature)."""
    w = _Weights(hf)
    device = w.norm.device
    B = len(prompts)
    # identical prompts (a group of samples) are prefilled once
    uniq: dict[tuple[int, ...], int] = {}
    of_row = torch.tensor([uniq.setdefault(tuple(p), len(uniq)) for p in prompts], device=device)
    U, P = len(uniq), max(map(len, prompts))
    ids = torch.full((U, P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((U, P + max_new_tokens), dtype=torch.bool, device=device)
    for r, p in enumerate(uniq):
        ids[r, P - len(p):] = torch.as_tensor(p, device=device)
        valid[r, P - len(p):] = True  # left padding; every generated slot is valid
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # as generate: positions skip the padding
    mask = None
    if not bool(valid[:, :P].all()):
        mask = torch.ones(P, P, dtype=torch.bool, device=device).tril() & valid[:, None, None, :P]
        mask |= torch.eye(P, dtype=torch.bool, device=device)  # padding rows attend to themselves, never NaN
    cache = _Cache(len(w.layers), U, w.KV, P + max_new_tokens, w.D, w.norm)
    logits = _next_logits(w, _forward(w, cache, ids, pos, mask))
    cache.select(of_row)
    logits, valid, last_pos = logits[of_row], valid[of_row], pos[of_row, -1]

    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    out_logp = torch.zeros((B, max_new_tokens)) if record_logprobs else None
    active = torch.arange(B, device=device)  # rows in the cache (finished ones until they are dropped)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        u = torch.rand(B, generator=gen).to(device)[active]  # one draw per row per step, finished or not
        tok, lp = _draw(logits, u, temperature, top_p, record_logprobs)
        rows = active[~done].cpu()
        out[rows, t] = tok[~done].cpu()
        if out_logp is not None:
            out_logp[rows, t] = lp[~done].float().cpu()
        if eos_id is not None:
            done |= tok == eos_id
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if int(done.sum()) >= 0.25 * len(active):  # drop finished rows once they are a quarter of the batch
            keep = (~done).nonzero()[:, 0]
            active, tok, valid, last_pos, done = active[keep], tok[keep], valid[keep], last_pos[keep], done[keep]
            cache.select(keep)
        last_pos = last_pos + 1
        step_mask = None
        if not bool(valid[:, :cache.length].all()):  # left padding still in the batch
            step_mask = torch.zeros(valid.shape, dtype=logits.dtype, device=device).masked_fill_(~valid, float("-inf"))
            step_mask = step_mask.repeat_interleave(w.KV, dim=0)[:, None, :cache.length + 1].to(w.norm.dtype)
        logits = _next_logits(w, _forward(w, cache, tok[:, None], last_pos[:, None], step_mask))
    completions, logps = [], [] if record_logprobs else None
    for r in range(B):
        row = out[r].tolist()  # padding after the EOS
        n = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else max_new_tokens
        completions.append(row[:n])
        if logps is not None:
            logps.append(out_logp[r, :n].tolist())
    return completions, logps
