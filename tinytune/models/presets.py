"""Small named model shapes with random weights, for tests, demos and benchmarks (no download)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .transformer import CausalLM

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_position_embeddings=512)

PRESETS: dict[str, dict] = {
    "llama-tiny": dict(_TINY, model_type="llama", num_kv_heads=2),
    "qwen2-tiny": dict(_TINY, model_type="qwen2", num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True),
    "mistral-tiny": dict(_TINY, model_type="mistral", num_kv_heads=2, sliding_window=64),
    "gpt2-tiny": dict(_TINY, model_type="gpt2", norm="layer", norm_eps=1e-5, act="gelu_tanh", gated_mlp=False,
                      positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                      intermediate_size=256),
    # ~30M parameters: the shape the inference and training benchmarks use.
    "llama-30m": dict(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                      num_heads=8, num_kv_heads=4, max_position_embeddings=2048),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named preset, with fields overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@torch.no_grad()
def init_weights(model: CausalLM, std: float = 0.02) -> CausalLM:
    """GPT-style init: linears and embeddings N(0, std), biases 0, norms 1."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
            module.bias.zero_()
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
            module.weight.fill_(1.0)
    return model


def build(preset: str | ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0,
          **overrides) -> CausalLM:
    """A randomly initialised `CausalLM` from a preset name (see `PRESETS`) or a `ModelConfig`.

    `seed` makes the weights reproducible (None: use the global RNG). Returns the model in eval mode.
    """
    cfg = preset if isinstance(preset, ModelConfig) else preset_config(preset, **overrides)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = init_weights(CausalLM(cfg))
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return model.to(device=device, dtype=dtype).eval()
