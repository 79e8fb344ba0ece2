"""One flat config for every supported decoder, read from and written to HF `config.json`.

Families differ by switches, not subclasses:

| switch            | llama / mistral / qwen2        | gpt2                          |
|-------------------|--------------------------------|-------------------------------|
| norm              | "rms" (RMSNorm, no bias)       | "layer" (LayerNorm with bias) |
| positions         | "rope" (rotate-half)           | "learned" (wpe)               |
| gated_mlp, act    | True, "silu" (SwiGLU)          | False, "gelu_tanh"            |
| qkv_bias / o_bias | qwen2: True / False; llama: attention_bias for both | True / True |

Anything a family has that this decoder does not compute (MoE, an unknown rope scaling,
Qwen2's per-layer sliding window, GPT-2's inverse-layer-index scaling) raises `ValueError`
naming the field: nothing is silently approximated.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}


@dataclass
class ModelConfig:
    """Shape and switches of a decoder. Validated in `__post_init__` (ValueError naming the field)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    act: str = "silu"  # "silu" | "gelu_tanh" | "gelu" | "relu"
    gated_mlp: bool = True
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the source config.json, kept for saving

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _check_choice("norm", self.norm, ("rms", "layer"))
        _check_choice("positions", self.positions, ("rope", "learned"))
        _check_choice("act", self.act, ("silu", "gelu_tanh", "gelu", "relu"))
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got head_dim={self.head_dim}")
        _check_rope_scaling(self.rope_scaling)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every end-of-sequence id (HF allows a list)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        reader = _from_gpt2 if model_type == "gpt2" else _from_llama_family
        fields = reader(hf)
        fields.update(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                      pad_token_id=hf.get("pad_token_id"), hf_config=copy.deepcopy(hf))
        return cls(model_type=model_type, **fields)

    def to_hf(self) -> dict:
        """A `config.json` dict that `transformers` loads: the source config updated with these values."""
        writer = _to_gpt2 if self.model_type == "gpt2" else _to_llama_family
        out = copy.deepcopy(self.hf_config)
        out.update(writer(self))
        out.update(model_type=self.model_type, vocab_size=self.vocab_size, bos_token_id=self.bos_token_id,
                   eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                   tie_word_embeddings=self.tie_word_embeddings)
        return out


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {choices}")


def _check_rope_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling rope_type={kind!r} is not supported (supported: default, 'llama3')")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks {missing}")


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    return theta, (None if kind == "default" else scaling)


def _reject(hf: dict, field: str, ok) -> None:
    value = hf.get(field)
    if value is not None and not ok(value):
        raise ValueError(f"config.json {field}={value!r} is not supported by the tinytune decoder")


def _from_llama_family(hf: dict) -> dict:
    model_type = hf["model_type"]
    for moe_field in ("num_local_experts", "num_experts", "num_experts_per_tok"):
        _reject(hf, moe_field, lambda v: not v)
    _reject(hf, "pretraining_tp", lambda v: v == 1)
    if model_type == "qwen2":
        _reject(hf, "use_sliding_window", lambda v: v is False)
    theta, scaling = _rope_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), act=_ACTIVATIONS[act], gated_mlp=True,
        positions="rope", rope_theta=theta, rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
    )


def _from_gpt2(hf: dict) -> dict:
    _reject(hf, "scale_attn_by_inverse_layer_idx", lambda v: v is False)
    _reject(hf, "reorder_and_upcast_attn", lambda v: v is False)
    _reject(hf, "scale_attn_weights", lambda v: v is True)
    _reject(hf, "add_cross_attention", lambda v: v is False)
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json activation_function={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    d = hf["n_embd"]
    return dict(
        hidden_size=d, intermediate_size=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
        norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), act=_ACTIVATIONS[act], gated_mlp=False,
        positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


_HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _to_llama_family(c: ModelConfig) -> dict:
    rope = {"rope_theta": c.rope_theta, "rope_type": "default", **(c.rope_scaling or {})}
    out = dict(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        hidden_act=_HF_ACT[c.act], rope_theta=c.rope_theta, rope_parameters=rope, mlp_bias=c.mlp_bias,
        architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM"}[c.model_type]],
    )
    if c.model_type == "llama":
        out["attention_bias"] = c.qkv_bias
    if c.model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    return out


def _to_gpt2(c: ModelConfig) -> dict:
    return dict(
        n_embd=c.hidden_size, n_inner=c.intermediate_size, n_layer=c.num_layers, n_head=c.num_heads,
        n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
        activation_function=_HF_ACT[c.act], architectures=["GPT2LMHeadModel"],
    )
