"""Prompt tuning (Lester et al., 2021): P learned input embeddings in front of every sequence.

    cfg = prompt.PromptConfig(num_virtual_tokens=20)            # or init_text="Classify the review:"
    names = prompt.apply(model, cfg, tokenizer=None)            # hooks the model; freezes every base weight

For input embeddings X (B, T, d) the model runs on [E; X] (B, P + T, d) with E (P, d) the only
trainable parameters, P * d of them. The hooks (see `_virtual.py` for the calling protocol) also
prepend P ones to a 2-D attention mask (a boolean 4-D mask gets the prompt as causal rows and
always-visible columns), put the real tokens at positions P, P + 1, ... as PEFT does (given
`position_ids` are shifted by P), prepend P ignored labels to `labels` (models that compute their loss;
the caller's first label stays unscored, see `_prompted_labels`), and
cut the P virtual positions from the output: logits or hidden states come back (B, T, ...), aligned
with the caller's tokens and labels, so `tinytune.train.fit` needs no change. With a KV cache, the
prompt goes in on the call that finds the cache empty; later calls only shift mask and positions.
Works on tinytune's `CausalLM` and on any model whose forward takes `input_ids` and
`inputs_embeds` (a transformers `LlamaForCausalLM`, a small module of one's own).

The state dict is PEFT's: `{"prompt_embeddings": E}` with `peft_type: "PROMPT_TUNING"`.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import _check
from ._method import Method
from .modules_to_save import applies, check_names, read_field
from ._virtual import (
    TASK_TYPES, check_virtual_sizes,
    refuse_other_virtual_tokens,
    VIRTUAL_TOKENS_ATTR, cached_length, call_kwargs, check_ids, check_not_virtual, config_value, forward_signature,
    load_embeddings, new_tokens, strip_front, switched_off, trainable_dtype,
)

__all__ = [
    "PromptConfig", "SoftPrompt", "apply", "disabled", "state_dict", "load_state_dict", "soft_prompt",
    "peft_config_dict", "config_from_peft", "INITS", "PEFT_TYPE",
]

PEFT_TYPE = "PROMPT_TUNING"
INITS = ("random", "vocab", "text")
STATE_KEY = "prompt_embeddings"
MODULE_NAME = "prompt_encoder"
IGNORE_INDEX = -100
_PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptConfig:
    """What `apply` does. Validated on construction (ValueError naming the field).

    Attributes:
        num_virtual_tokens: P >= 1, the number of learned embeddings.
        init: "random" (N(0, 1), PEFT's RANDOM; may lie off the embedding manifold), "vocab" (rows
            of the embedding table at random token ids, PEFT's SAMPLE_VOCAB) or "text" (the
            embeddings of `init_text`'s tokens, repeated or cut to P, PEFT's TEXT). None: "text"
            when `init_text` is given, else "random".
        init_text: the text for init="text" (needs `apply(..., tokenizer=...)`).
        tokenizer_name_or_path: recorded in adapter_config.json; PEFT accepts a TEXT init only with it.
        modules_to_save: modules trained whole and saved with the prompt (PEFT's field; names equal
            or a dotted suffix); see tinytune/peft/modules_to_save.py.
    """

    num_virtual_tokens: int = 20
    init: str | None = None
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        self.modules_to_save = check_names(self.modules_to_save, "PromptConfig.modules_to_save")
        _check.optional(_check.string, self.tokenizer_name_or_path, "PromptConfig.tokenizer_name_or_path",
                        name="tokenizer_name_or_path")
        P = self.num_virtual_tokens
        if not isinstance(P, int) or isinstance(P, bool) or P < 1:
            raise ValueError(f"PromptConfig.num_virtual_tokens must be an integer >= 1, got {P!r}")
        if self.init is None:
            self.init = "text" if self.init_text is not None else "random"
        if self.init not in INITS:
            raise ValueError(f"PromptConfig.init={self.init!r} is not one of {INITS}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text):
            raise ValueError(f"PromptConfig.init='text' needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"PromptConfig.init_text is given but init={self.init!r}; init_text needs init='text'")


class SoftPrompt(nn.Module):
    """The learned prompt `embedding` (P, d) and the forward hooks that put it in front of the inputs.

    Args:
        weight: (P, d) initial embeddings (copied into the parameter).
        cfg: the `PromptConfig` it was made from (kept for `peft_config_dict`).
        signature: the model's forward signature (positional arguments are bound by it).
        embed_name: dotted name of the model's input embedding, or None to use `get_input_embeddings()`.
    """

    def __init__(self, weight: torch.Tensor, cfg: PromptConfig, signature, embed_name: str | None):
        super().__init__()
        self.embedding = nn.Parameter(weight.detach().clone())
        self.cfg, self._signature, self._embed_name = cfg, signature, embed_name
        self.enabled = True  # set only by tinytune.peft.prompt.disabled()
        self._added, self._length = 0, 0  # what the running call prepended; read by the output hook

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        """The model's token embedding module, looked up afresh (it may have been swapped, e.g. by LoRA)."""
        return model.get_submodule(self._embed_name) if self._embed_name else model.get_input_embeddings()

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs): prompt, mask, positions and labels for P virtual tokens."""
        self._added = 0
        if not self.enabled:
            return None
        kw = call_kwargs(self._signature, args, kwargs)
        B, T, device = new_tokens(kw)
        P = self.embedding.shape[0]
        fresh = cached_length(kw) == 0  # an empty cache (or none): this call starts the sequence
        if fresh:
            kw["inputs_embeds"] = self._prepend(model, kw, B)  # (B, P + T, d)
            kw["input_ids"] = None
            if kw.get("labels") is not None:  # the model computes the loss inside: see `_prompted_labels`
                kw["labels"] = _prompted_labels(kw["labels"], P)
            self._added, self._length = P, P + T
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = _extend_mask(kw["attention_mask"], P, fresh)
        if kw.get("position_ids") is not None:
            positions = kw["position_ids"] + P  # real tokens sit behind the P virtual ones
            if fresh:
                virtual = torch.arange(P, device=device).expand(*positions.shape[:-1], P)
                positions = torch.cat((virtual, positions), dim=-1)
            kw["position_ids"] = positions
        return (), kw

    def _prepend(self, model: nn.Module, kw: dict, B: int) -> torch.Tensor:
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embedding = self.input_embeddings(model)
            check_ids(kw["input_ids"], embedding)  # the model's own forward, which checks ids, sees embeddings
            embeds = embedding(kw["input_ids"])  # (B, T, d)
        if embeds.shape[-1] != self.embedding.shape[1]:
            raise ValueError(f"prompt tuning: input embeddings have width {embeds.shape[-1]}, the prompt "
                             f"{self.embedding.shape[1]}")
        prompt = self.embedding.to(embeds.dtype)[None].expand(B, -1, -1)  # (B, P, d)
        return torch.cat((prompt, embeds), dim=1)

    def post_hook(self, model: nn.Module, args: tuple, output):
        """Forward hook: cut the P virtual positions from the output of a call that prepended them."""
        added, self._added = self._added, 0
        return strip_front(output, added, self._length) if added else None

    def extra_repr(self) -> str:
        """The shapes and switches shown in `print(model)`."""
        return f"num_virtual_tokens={self.embedding.shape[0]}, dim={self.embedding.shape[1]}, enabled={self.enabled}"


def _prompted_labels(labels: torch.Tensor, P: int) -> torch.Tensor:
    """(B, T) labels for the (B, P + T) prompted sequence: the P virtual positions are never scored, and neither
    is the caller's first token, so the scored positions (and the mean a loss takes over them) are the same as
    without the prompt, whatever the method. PEFT scores that first token from the last virtual one; tinytune
    does not, so that `fit`'s count (`labels[:, 1:] != -100`, the data's) is what the model averages over."""
    ignored = labels.new_full((labels.shape[0], P + 1), IGNORE_INDEX)
    return torch.cat((ignored, labels[:, 1:]), dim=1)  # (B, P + T)


def _extend_mask(mask: torch.Tensor, P: int, fresh: bool) -> torch.Tensor:
    """A 2-D (B, S) mask with P ones in front; a boolean 4-D (b, 1, T, T) one as (b, 1, P + T, P + T)."""
    if mask.dim() == 2:
        return torch.cat((mask.new_ones(mask.shape[0], P), mask), dim=1)
    if mask.dim() != 4 or mask.dtype != torch.bool or not fresh:
        raise ValueError(f"prompt tuning extends a 2-D (batch, seq) mask, or a boolean 4-D (batch, 1, T, T) "
                         f"mask without a cache; got {mask.dtype} {tuple(mask.shape)}")
    b, _, T, S = mask.shape
    causal = torch.ones(P, P, dtype=torch.bool, device=mask.device).tril()  # the prompt sees itself causally
    top = torch.cat((causal, causal.new_zeros(P, S)), dim=1).expand(b, 1, P, P + S)
    bottom = torch.cat((mask.new_ones(b, 1, T, P), mask), dim=-1)  # every token sees the whole prompt
    return torch.cat((top, bottom), dim=2)


def _find_embedding(model: nn.Module) -> tuple[nn.Module, str | None]:
    """(the input embedding, its dotted name or None when `get_input_embeddings()` gives it)."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            module = getter()
            if module is not None and hasattr(module, "weight"):
                return module, None
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(found) != 1:
        names = [n for n, _ in found] or "none"
        raise TypeError(f"prompt tuning: {type(model).__name__} has no get_input_embeddings() and not exactly one "
                        f"nn.Embedding (found: {names}); add get_input_embeddings() returning the token embedding")
    return found[0][1], found[0][0]


def _text_ids(cfg: PromptConfig, tokenizer, vocab: int) -> torch.Tensor:
    """init_text's token ids repeated or cut to P, as PEFT's PromptEmbedding does."""
    if tokenizer is None:
        raise ValueError("prompt tuning with init='text' needs the tokenizer: apply(model, cfg, tokenizer=...)")
    ids = list(tokenizer.encode(cfg.init_text))
    if not ids:
        raise ValueError(f"prompt tuning: init_text={cfg.init_text!r} encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(f"prompt tuning: init_text encodes to token id {max(ids)}, beyond the vocabulary ({vocab})")
    P = cfg.num_virtual_tokens
    return torch.tensor((ids * math.ceil(P / len(ids)))[:P])


@torch.no_grad()
def _initial_prompt(cfg: PromptConfig, embed: nn.Module, tokenizer, dtype: torch.dtype) -> torch.Tensor:
    """(P, d): N(0, 1), sampled vocabulary rows, or the init text's embeddings."""
    weight = embed.weight
    vocab, d = weight.shape
    P = cfg.num_virtual_tokens
    if cfg.init == "random":
        return torch.randn(P, d, device=weight.device).to(dtype)
    ids = torch.randint(0, vocab, (P,)) if cfg.init == "vocab" else _text_ids(cfg, tokenizer, vocab)
    return embed(ids.to(weight.device)).to(dtype)


@applies
def apply(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> list[str]:
    """Give `model` a trainable soft prompt, in place, and freeze every other parameter.

    Registers a `SoftPrompt` as `model.prompt_encoder`, forward hooks on `model`, and sets
    `model.num_virtual_tokens = P` (read by `tinytune.generate`).

    Args:
        model: a module whose forward takes `input_ids` and `inputs_embeds` (and `attention_mask`,
            `position_ids` and a cache when it has them), e.g. tinytune's `CausalLM` or a
            transformers causal LM. Its input embedding is `get_input_embeddings()`, or its only
            `nn.Embedding`.
        cfg: a `PromptConfig`.
        tokenizer: anything with `encode(text) -> list[int]`; needed for init="text" only.

    Returns:
        ["prompt_encoder"], the name of the module holding the trainable embeddings.

    Raises:
        TypeError: cfg is not a PromptConfig; the forward lacks `input_ids` or `inputs_embeds`; no
            input embedding is found.
        ValueError: the model already has prompt or prefix tuning; init="text" without a tokenizer,
            or a text that encodes to nothing or to ids outside the vocabulary.
    """
    if not isinstance(cfg, PromptConfig):
        raise TypeError(f"prompt.apply expects a prompt.PromptConfig, got {type(cfg).__name__}")
    check_not_virtual(model, "prompt.apply")
    signature = forward_signature(model, ("input_ids", "inputs_embeds"), "prompt tuning")
    if hasattr(model, MODULE_NAME):
        raise ValueError(f"prompt.apply: {type(model).__name__} already has an attribute {MODULE_NAME!r}")
    embed, embed_name = _find_embedding(model)
    weight = _initial_prompt(cfg, embed, tokenizer, trainable_dtype(model))
    model.requires_grad_(False)
    module = SoftPrompt(weight, cfg, signature, embed_name)
    model.add_module(MODULE_NAME, module)
    module._handles = (model.register_forward_pre_hook(module.pre_hook, with_kwargs=True),
                       model.register_forward_hook(module.post_hook))
    setattr(model, VIRTUAL_TOKENS_ATTR, cfg.num_virtual_tokens)
    model._tinytune_virtual_method = "prompt tuning"
    return [MODULE_NAME]


def soft_prompt(model: nn.Module) -> SoftPrompt:
    """The model's `SoftPrompt`.  Raises: ValueError: `prompt.apply` was not called on it."""
    module = getattr(model, MODULE_NAME, None)
    if not isinstance(module, SoftPrompt):
        raise ValueError(f"{type(model).__name__} has no soft prompt; call prompt.apply(model, cfg) first")
    return module


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes exactly its base (no prompt, no shifted positions or masks).

    Raises: ValueError: the model has no soft prompt.
    """
    with switched_off(model, soft_prompt(model)):
        yield model


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns: `{"prompt_embeddings": E (P, d)}` (PEFT's key), detached, not copied.

    Raises: ValueError: the model has no soft prompt.
    """
    return {STATE_KEY: soft_prompt(model).embedding.detach()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy the prompt from `sd` (`{"prompt_embeddings": (P, d)}`, as PEFT saves it).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: no soft prompt; a mis-shaped prompt; with strict, the key missing or others
            present. Nothing is copied when it raises.
    """
    return load_embeddings(soft_prompt(model).embedding, sd, STATE_KEY, strict, "the prompt-tuning state dict")


def peft_config_dict(model: nn.Module) -> dict:
    """The adapter_config.json dict in PEFT's PROMPT_TUNING format for a model with a soft prompt.

    `prompt_tuning_init` is "TEXT" only when the config names `tokenizer_name_or_path` (PEFT refuses
    TEXT without it); otherwise a text init is written as "RANDOM" (the init no longer matters once
    the trained embeddings are saved). `num_layers` / `num_attention_heads` come from `model.config`
    when it has them (PEFT fills missing ones from the base model).

    Raises: ValueError: the model has no soft prompt.
    """
    module = soft_prompt(model)
    cfg = module.cfg
    text = cfg.init == "text" and cfg.tokenizer_name_or_path is not None
    init = "TEXT" if text else _PEFT_INITS["random" if cfg.init == "text" else cfg.init]
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": module.embedding.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": config_value(model, ("num_heads", "num_attention_heads", "n_head")),
        "num_layers": config_value(model, ("num_layers", "num_hidden_layers", "n_layer")),
        "prompt_tuning_init": init, "prompt_tuning_init_text": cfg.init_text if text else None,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path if text else None, "tokenizer_kwargs": None,
        "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None, "revision": None,
        "auto_mapping": None,
    }


_PEFT_FIELDS = {  # PeftConfig's, PromptLearningConfig's and PromptTuningConfig's fields (peft 0.21)
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "modules_to_save", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
    "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_name_or_path", "tokenizer_kwargs",
}


def config_from_peft(d: dict, path: str | os.PathLike | None = None) -> PromptConfig:
    """The PromptConfig for a PEFT adapter_config.json dict (written by PEFT or by `peft_config_dict`).

    The result is meant for loading trained embeddings right after `apply`: a TEXT init comes back as
    init="random" (the text would need the tokenizer, and the loaded embeddings replace it anyway).

    Args:
        d: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: peft_type is not "PROMPT_TUNING"; a task_type not in `TASK_TYPES`; an unknown
            field; num_transformer_submodules other than 1; an unknown
            prompt_tuning_init; a field of the wrong type or out of range (`_check.FieldError`, also a
            TypeError). Each names the file and the field.
    """
    fields = _check.Fields(d, "adapter_config.json", None if path is None else Path(path) / "adapter_config.json")
    where = f"config_from_peft: {fields.label}"
    if d.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{where}: peft_type={d.get('peft_type')!r}; expected {PEFT_TYPE!r}")
    unknown = sorted(set(d) - _PEFT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown PROMPT_TUNING config fields {unknown}; "
                         f"known: {sorted(_PEFT_FIELDS)}")
    if d.get("task_type") not in TASK_TYPES:
        raise ValueError(f"{where}: task_type={d['task_type']!r}; tinytune's prompt tuning is for decoders: "
                         f"one of {list(TASK_TYPES)}")
    if fields.get("num_transformer_submodules", _check.integer, 1, none=True, default=None) not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules={d['num_transformer_submodules']!r}; "
                         "only 1 (decoder-only models) is supported")
    inits = {v: k for k, v in _PEFT_INITS.items()}
    init = (fields.get("prompt_tuning_init", _check.string, none=True, default=None) or "RANDOM").upper()
    if init not in inits:
        raise ValueError(f"{where}: prompt_tuning_init={init!r} is not one of {sorted(inits)}")
    return PromptConfig(num_virtual_tokens=fields.get("num_virtual_tokens", _check.integer, 1),
                        init="random" if init == "TEXT" else inits[init], modules_to_save=read_field(fields))


def is_applied(model: nn.Module) -> bool:
    """Whether `model` has a soft prompt."""
    return isinstance(getattr(model, MODULE_NAME, None), SoftPrompt)


def _check_compatible(model: nn.Module, cfg: PromptConfig, where) -> None:
    refuse_other_virtual_tokens("prompt tuning", soft_prompt(model).embedding.shape[0], cfg, where)


METHOD = Method(
    peft_type=PEFT_TYPE, name="prompt tuning", config_type=PromptConfig, is_applied=is_applied,
    peft_config_dict=peft_config_dict, config_from_peft=config_from_peft, apply=apply, state_dict=state_dict,
    load_state_dict=load_state_dict, check_sizes=check_virtual_sizes, check_compatible=_check_compatible,
    # PEFT's PeftModel wraps the model itself for prompt learning: a module to save is `base_model.<path>`
    module_prefix="base_model.",
)
