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

from .. import _check

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu": "gelu", "relu": "relu"}
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings")
_SWITCHES = ("gated_mlp", "qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings")
_REQUIRED = object()


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
        self._check_types()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
            if self.head_dim < 1:
                raise ValueError(f"ModelConfig.head_dim defaults to hidden_size // num_heads = {self.hidden_size} // "
                                 f"{self.num_heads} = 0; give head_dim or a hidden_size >= num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _check_choice("norm", self.norm, ("rms", "layer"))
        _check_choice("positions", self.positions, ("rope", "learned"))
        _check_choice("act", self.act, ("silu", "gelu_tanh", "gelu", "relu"))
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got head_dim={self.head_dim}")
        _check_rope_scaling(self.rope_scaling, lambda key: f"ModelConfig.rope_scaling[{key!r}]")

    def _check_types(self) -> None:
        """Every field its type and range (users build configs by hand: "64" is not a size)."""
        for name in _SIZES:
            _check.integer(getattr(self, name), f"ModelConfig.{name}", 1, name=name)
        for name in ("num_kv_heads", "head_dim", "sliding_window"):
            _check.optional(_check.integer, getattr(self, name), f"ModelConfig.{name}", 1, name=name)
        for name in ("norm_eps", "rope_theta"):
            _check.number(getattr(self, name), f"ModelConfig.{name}", 0, low_open=True, name=name)
        for name in _SWITCHES:
            _check.boolean(getattr(self, name), f"ModelConfig.{name}", name=name)
        for name in ("bos_token_id", "pad_token_id"):
            _check.optional(_check.integer, getattr(self, name), f"ModelConfig.{name}", 0, name=name)
        _check.optional(_check.integer_or_list, self.eos_token_id, "ModelConfig.eos_token_id", 0, name="eos_token_id")
        _check.optional(_check.mapping, self.rope_scaling, "ModelConfig.rope_scaling", name="rope_scaling")
        _check.mapping(self.hf_config, "ModelConfig.hf_config", name="hf_config")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every end-of-sequence id (HF allows a list)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf: dict, source=None) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict, checking every field it reads.

        Args:
            hf: the parsed config.json.
            source: its path (or a string naming it), shown in error messages; None: just "config.json".

        Raises:
            ValueError: a field of the wrong type or out of range, a missing required field, or a feature
                this decoder does not compute; each names the file and the field (`FieldError`, also a
                TypeError, for a wrong type or range).
        """
        fields = _check.Fields(hf, "config.json", source)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{fields.label} model_type={model_type!r} is not supported; "
                             f"supported: {SUPPORTED_MODEL_TYPES}")
        reader = _from_gpt2 if model_type == "gpt2" else _from_llama_family
        values = reader(fields)
        values.update(_token_ids(fields), hf_config=copy.deepcopy(hf))
        try:
            return cls(model_type=model_type, **values)
        except ValueError as err:  # a rule between fields (num_heads % num_kv_heads, ...): name the file too
            raise type(err)(f"{fields.label}: {err}") from None

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


def _check_rope_scaling(scaling: dict | None, where) -> None:
    """The llama3 rope scaling fields: numbers, finite, in the ranges its formula divides by.

    `where(key)` names a key in messages (the config field, or the config.json field)."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling rope_type={kind!r} is not supported (supported: default, 'llama3')")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks {missing}")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):  # wavelengths are divided by each
        _check.number(scaling[key], where(key), 0, low_open=True)
    _check.integer(scaling["original_max_position_embeddings"], where("original_max_position_embeddings"), 1)
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:  # the smoothing divides by high - low
        raise ValueError(f"{where('low_freq_factor')}={scaling['low_freq_factor']!r} must be less than "
                         f"high_freq_factor={scaling['high_freq_factor']!r}")


def _rope_from_hf(fields: _check.Fields) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = dict(fields.get("rope_parameters", _check.mapping, none=True, default=None) or {})
    legacy = dict(fields.get("rope_scaling", _check.mapping, none=True, default=None) or {})

    def where(key: str) -> str:
        return fields.where(f"{'rope_parameters' if key in params else 'rope_scaling'}.{key}")
    # 4.x rope_theta: checked even when 5.x rope_parameters gives the value used
    theta = fields.get("rope_theta", _check.number, 0, low_open=True, default=10000.0)
    if "rope_theta" in params:
        theta = _check.number(params["rope_theta"], where("rope_theta"), 0, low_open=True)
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if "partial_rotary_factor" in scaling:
        partial = _check.number(scaling["partial_rotary_factor"], where("partial_rotary_factor"))
    else:
        partial = fields.get("partial_rotary_factor", _check.number, default=1.0)
    if partial != 1.0:
        raise ValueError(f"{fields.label} partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    _check_rope_scaling(scaling, where)
    return theta, scaling


def _reject(fields: _check.Fields, field: str, ok) -> None:
    value = fields.data.get(field)
    if value is not None and not ok(value):
        raise ValueError(f"{fields.label} {field}={value!r} is not supported by the tinytune decoder")


def _size(fields: _check.Fields, key: str, default=_REQUIRED):
    """An integer >= 1 (null or absent: `default`, if the field is optional)."""
    if default is _REQUIRED:
        return fields.get(key, _check.integer, 1)
    value = fields.get(key, _check.integer, 1, none=True, default=None)
    return default if value is None else value


def _flag(fields: _check.Fields, key: str, default: bool) -> bool:
    value = fields.get(key, _check.boolean, none=True, default=None)
    return default if value is None else value


def _eps(fields: _check.Fields, key: str, default: float) -> float:
    value = fields.get(key, _check.number, 0, low_open=True, none=True, default=None)
    return default if value is None else value


def _activation(fields: _check.Fields, key: str, default: str) -> str:
    act = fields.get(key, _check.string, default=default)
    if act not in _ACTIVATIONS:
        raise ValueError(f"{fields.label} {key}={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _token_ids(fields: _check.Fields) -> dict:
    """bos/eos/pad ids: None or an int >= 0 (eos: or a list). pad -1 is read as None: older Llama
    configs write it for "no pad token", and the tokenizer ignores it likewise."""
    def ids(name, check=_check.integer):
        return fields.get(name, check, 0, none=True, default=None)

    pad = fields.data.get("pad_token_id")
    return {"bos_token_id": ids("bos_token_id"), "eos_token_id": ids("eos_token_id", _check.integer_or_list),
            "pad_token_id": None if type(pad) is int and pad == -1 else ids("pad_token_id")}


def _from_llama_family(fields: _check.Fields) -> dict:
    model_type = fields.data["model_type"]
    for moe_field in ("num_local_experts", "num_experts", "num_experts_per_tok"):
        _reject(fields, moe_field, lambda v: not v)
    _reject(fields, "pretraining_tp", lambda v: v == 1)
    if model_type == "qwen2":
        _reject(fields, "use_sliding_window", lambda v: v is False)
    theta, scaling = _rope_from_hf(fields)
    attention_bias = _flag(fields, "attention_bias", False)
    sliding = None  # only Mistral's decoder reads it (Qwen2's is refused above unless off)
    if model_type == "mistral":
        sliding = fields.get("sliding_window", _check.integer, 1, none=True, default=None)
    return dict(
        hidden_size=_size(fields, "hidden_size"), intermediate_size=_size(fields, "intermediate_size"),
        num_layers=_size(fields, "num_hidden_layers"), num_heads=_size(fields, "num_attention_heads"),
        num_kv_heads=_size(fields, "num_key_value_heads", None), head_dim=_size(fields, "head_dim", None),
        vocab_size=_size(fields, "vocab_size"), max_position_embeddings=_size(fields, "max_position_embeddings", 2048),
        norm="rms", norm_eps=_eps(fields, "rms_norm_eps", 1e-6), act=_activation(fields, "hidden_act", "silu"),
        gated_mlp=True, positions="rope", rope_theta=theta, rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=_flag(fields, "mlp_bias", False),
        tie_word_embeddings=_flag(fields, "tie_word_embeddings", False),
        sliding_window=sliding,
    )


def _from_gpt2(fields: _check.Fields) -> dict:
    _reject(fields, "scale_attn_by_inverse_layer_idx", lambda v: v is False)
    _reject(fields, "reorder_and_upcast_attn", lambda v: v is False)
    _reject(fields, "scale_attn_weights", lambda v: v is True)
    _reject(fields, "add_cross_attention", lambda v: v is False)
    d = _size(fields, "n_embd")
    return dict(
        hidden_size=d, intermediate_size=_size(fields, "n_inner", 4 * d), num_layers=_size(fields, "n_layer"),
        num_heads=_size(fields, "n_head"), vocab_size=_size(fields, "vocab_size"),
        max_position_embeddings=_size(fields, "n_positions"),
        norm="layer", norm_eps=_eps(fields, "layer_norm_epsilon", 1e-5),
        act=_activation(fields, "activation_function", "gelu_new"), gated_mlp=False,
        positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=_flag(fields, "tie_word_embeddings", True),
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
