"""Checkpoint key mapping: Hugging Face names <-> tinytune names, as a table plus a short function.

Llama-family checkpoints already use tinytune's names. GPT-2's differ, and its `Conv1D` weights
are stored transposed (in, out); its fused `c_attn` holds q, k and v side by side.
"""
from __future__ import annotations

import re

import torch

# (HF pattern, tinytune name, transpose?)  `{i}` is the layer index.
GPT2_TABLE = [
    (r"wte\.weight", "model.embed_tokens.weight", False),
    (r"wpe\.weight", "model.embed_positions.weight", False),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", "model.layers.{i}.input_layernorm.{p}", False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", "model.layers.{i}.self_attn.o_proj.weight", True),
    (r"h\.(\d+)\.attn\.c_proj\.bias", "model.layers.{i}.self_attn.o_proj.bias", False),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", "model.layers.{i}.post_attention_layernorm.{p}", False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", "model.layers.{i}.mlp.up_proj.weight", True),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", "model.layers.{i}.mlp.up_proj.bias", False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", "model.layers.{i}.mlp.down_proj.weight", True),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", "model.layers.{i}.mlp.down_proj.bias", False),
    (r"ln_f\.(weight|bias)", "model.norm.{p}", False),
]
GPT2_FUSED_QKV = r"h\.(\d+)\.attn\.c_attn\.(weight|bias)"
# Buffers some checkpoints carry that hold no learned values.
IGNORED = [r"h\.\d+\.attn\.(bias|masked_bias)", r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def _strip_gpt2_prefix(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def is_ignored(model_type: str, key: str) -> bool:
    """Whether a checkpoint key is a non-learned buffer to skip."""
    key = _strip_gpt2_prefix(key) if model_type == "gpt2" else key
    return any(re.fullmatch(p, key) for p in IGNORED)


def hf_to_ours(model_type: str, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Map one checkpoint tensor to tinytune's name(s); None when the key is unknown."""
    if model_type != "gpt2":
        return {key: tensor}
    key = _strip_gpt2_prefix(key)
    if key == "lm_head.weight":
        return {key: tensor}
    fused = re.fullmatch(GPT2_FUSED_QKV, key)
    if fused:
        layer, part = fused.groups()
        pieces = tensor.chunk(3, dim=-1)  # weight (in, 3 out) or bias (3 out,)
        return {f"model.layers.{layer}.self_attn.{n}_proj.{part}": (p.t() if part == "weight" else p).contiguous()
                for n, p in zip("qkv", pieces)}
    for pattern, name, transpose in GPT2_TABLE:
        match = re.fullmatch(pattern, key)
        if match:
            groups = match.groups()
            i = groups[0] if groups and groups[0].isdigit() else None
            p = groups[-1] if groups and not groups[-1].isdigit() else None
            return {name.format(i=i, p=p): tensor.t().contiguous() if transpose else tensor}
    return None


def ours_to_hf(model_type: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tinytune's state dict -> checkpoint tensors under HF names (GPT-2: transposed, q/k/v fused)."""
    if model_type != "gpt2":
        return dict(state)
    out = {}
    inverse = [(re.compile(name.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)").replace("{p}", r"(?P<p>weight|bias)")),
                pattern, transpose) for pattern, name, transpose in GPT2_TABLE]
    for key, tensor in state.items():
        if key == "lm_head.weight":
            out[key] = tensor
            continue
        qkv = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key)
        if qkv:
            layer, part = qkv.groups()
            parts = [state[f"model.layers.{layer}.self_attn.{n}_proj.{part}"] for n in "qkv"]
            fused = torch.cat([p.t() for p in parts], dim=1) if part == "weight" else torch.cat(parts)
            out[f"transformer.h.{layer}.attn.c_attn.{part}"] = fused.contiguous()
            continue
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)", key):
            continue  # fused with q above
        for regex, pattern, transpose in inverse:
            match = regex.fullmatch(key)
            if match:
                hf_key = _fill(pattern, match.groupdict())
                out["transformer." + hf_key] = tensor.t().contiguous() if transpose else tensor
                break
        else:
            raise KeyError(f"no GPT-2 checkpoint name for tinytune key {key!r}")
    return out


def _fill(pattern: str, groups: dict) -> str:
    """Turn a table pattern back into a concrete key (the inverse of matching it)."""
    text = pattern.replace(r"\.", ".")
    text = text.replace(r"(\d+)", groups.get("i") or "", 1)
    return text.replace("(weight|bias)", groups.get("p") or "")
