"""The decoder's building blocks: norms, rotary embeddings, attention, MLP, and the KV cache.

Shapes: B batch, T new tokens, S keys (prefix + cached + new), nh query heads, nkv key/value
heads, hd head dim, d hidden size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# torch >= 2.5 repeats K/V heads inside SDPA; older versions get them expanded here.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (Llama family) or LayerNorm with bias (GPT-2)."""
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq (hd/2,) in fp32, with the llama3 frequency-dependent scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)  # long waves: slowed
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE at given positions (computed in fp32, as HF does)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def reset_buffers(self, device) -> None:
        """Recompute inv_freq on `device` (after building on the meta device)."""
        self.inv_freq = rope_inverse_frequencies(self.cfg).to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, hd) rotated: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation (never concatenated).

    `k[i]`, `v[i]`: (B, nkv, max_len, hd). `length`: tokens written so far, advanced by the
    decoder after each forward.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nkv, T, hd) at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. after some sequences finished)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, RoPE or none, SDPA, optional cache and prefix."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        self.nh, self.nkv, self.hd, self.layer_idx = nh, nkv, hd, layer_idx

    def forward(self, h, rope, mask, cache=None, prefix=None):
        """h (B, T, d); rope: (cos, sin) or None; mask: bool (B, 1, T, S) or None for plain causal."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        if prefix is not None:  # learned (B or 1, nkv, P, hd) keys/values seen by every query
            pk, pv = (p.to(k.dtype).expand(B, -1, -1, -1) for p in prefix)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
        out = _sdpa(q, k, v, mask, causal=mask is None and T > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))


def _sdpa(q, k, v, mask, causal: bool):
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


_ACT_FNS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


class MLP(nn.Module):
    """SwiGLU `down(act(gate(x)) * up(x))` (Llama family) or `down(act(up(x)))` (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=bias) if cfg.gated_mlp else None
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)
        self.act = _ACT_FNS[cfg.act]

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, rope, mask, cache=None, prefix=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache, prefix)
        return h + self.mlp(self.post_attention_layernorm(h))
