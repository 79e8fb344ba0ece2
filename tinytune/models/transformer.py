"""One decoder for the Llama family (llama, mistral, qwen2) and GPT-2, switched by `ModelConfig`.

Module names follow Hugging Face Llama's (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`), so adapters trained on the HF model
need no renaming. GPT-2 uses the same names: its fused `c_attn` is split into q/k/v at load
(see `hf.py`), `c_fc`/`c_proj` become `mlp.up_proj`/`mlp.down_proj`, and `wpe` is
`model.embed_positions`.

The decoder has no dropout: HF's GPT-2 `*_pdrop` settings only act in training mode, and
fine-tuning here regularises through the adapters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .._check import FieldError
from .config import ModelConfig
from .layers import DecoderLayer, KVCache, RotaryEmbedding, make_norm
from .layout import set_decode_layout
from .loss import causal_lm_loss, causal_lm_loss_from_hidden
from .outputs import CausalLMOutput

ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding indexes with


class DecoderModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                                if cfg.positions == "learned" else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.rotary = RotaryEmbedding(cfg) if cfg.positions == "rope" else None
        self.gradient_checkpointing = False


def check_token_ids(input_ids, name: str = "input_ids") -> None:
    """`input_ids` is an integer tensor of token ids: int64 or int32 (floats would be truncated, bools are
    not ids). The shape and the values are checked by the model.

    Raises:
        FieldError (a ValueError and a TypeError): not a tensor, or another dtype (named).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise FieldError(f"{name} must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in ID_DTYPES:
        raise FieldError(f"{name} must be an integer tensor of token ids (torch.int64 or torch.int32), "
                         f"got dtype {input_ids.dtype}")


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values back to the host here: not while torch.compile or
    torch.jit traces (a graph break), not on the meta device, not while a CUDA graph is captured."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or tensor.device.type == "meta":
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def _out_of_vocabulary(input_ids: torch.Tensor, bad: int, cfg: ModelConfig) -> ValueError:
    row, col = (input_ids == bad).nonzero()[0].tolist()
    return ValueError(f"input_ids holds id {bad} at (row {row}, col {col}), outside the vocabulary [0, "
                      f"{cfg.vocab_size}) of this {cfg.model_type} model (vocab_size={cfg.vocab_size})")


def _too_many_positions(what: str, cfg: ModelConfig) -> ValueError:
    # Worded as generate's check of prompt + max_new_tokens, which refuses the same thing up front.
    return ValueError(f"{what} exceeds max_position_embeddings={cfg.max_position_embeddings} of this "
                      f"{cfg.model_type} model")


def _position_ids(attention_mask, past: int, T: int, device) -> torch.Tensor:
    """Positions of the T new tokens: counted over real tokens only, so left padding is harmless."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return positions[:, past:past + T]


def build_attention_mask(attention_mask, past: int, T: int, window: int | None, prefix_len: int, device):
    """Boolean (B, 1, T, P + S) mask, True = may attend; None when plain causal attention suffices.

    Combines causality (with `past` cached tokens before the new ones), key padding, an optional
    sliding window, and `prefix_len` always-visible prefix positions. Every query may attend to
    itself, so rows of padding queries never become all-False (SDPA would return NaN there).
    """
    S = past + T
    # the all-ones shortcut reads the mask on the host, a graph break under torch.compile: there the full
    # mask is built instead (the same attention, computed with an explicit mask)
    no_padding = attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all()))
    if no_padding and prefix_len == 0 and (window is None or S <= window) and (past == 0 or T == 1):
        return None
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    if prefix_len:
        batch = allowed.shape[0]
        visible = torch.ones(batch, 1, T, prefix_len, dtype=torch.bool, device=device)
        allowed = torch.cat((visible, allowed.expand(batch, 1, T, S)), dim=-1)
    return allowed


class CausalLM(nn.Module):
    """A decoder-only language model: `logits = model(input_ids, attention_mask=None)`, or with labels
    `out = model(input_ids, labels=labels)` and `out.loss` (Hugging Face's convention).

    Args (forward):
        input_ids: (B, T) token ids, or None when `inputs_embeds` is given (soft prompts).
        attention_mask: (B, S) with 1 for real tokens, 0 for padding, covering cached + new
            tokens (S = cache.length + T). Left padding is handled: positions count real tokens.
            Or a boolean (B, 1, T, T) mask used as is (True = may attend), e.g. the
            block-diagonal mask of packed examples (`tinytune.data.segment_mask`); pass their
            `position_ids` with it (default: 0..T-1).
        position_ids: (B, T) to override the positions derived from the mask.
        inputs_embeds: (B, T, d) in place of `input_ids`.
        labels: (B, T) next-token targets as in transformers (shifted inside: `labels[:, i]` scores the
            prediction made at position i - 1; -100 = not scored). The call then returns a `CausalLMOutput`
            whose `loss` is the fp32 cross-entropy, computed chunked from the hidden states when the head is
            a plain linear (`chunked_head_weight`): the (B, T, V) logits are never held, and `logits` is
            None unless `return_logits=True`.
        num_items_in_batch: with labels, divide the summed loss by this count (the scored tokens of a
            whole accumulated step, as transformers' Trainer passes it); None: by this batch's own count.
        cache: a `KVCache` to read and extend (generation); advanced by T.
        prefix_kv: per layer a (k, v) pair of shape (B or 1, nkv, P, hd) attended by every query
            (prefix tuning; also with a 4-D mask). Positions are not shifted for it: pass
            `position_ids` (prefix tuning puts real tokens at P, P + 1, ...).
        logits_to_keep: compute logits for the last n positions only (0: all).
        return_hidden: return the final-norm hidden states (B, T or logits_to_keep, d) instead of
            logits, i.e. what `lm_head` would be applied to (for a chunked loss such as
            `tinytune.ops.linear_cross_entropy`).

    Returns:
        logits (B, T or logits_to_keep, vocab) in the compute dtype (hidden states with return_hidden);
        with labels a `CausalLMOutput(loss=..., logits=None or (B, T, V))`.

    Raises (before anything runs, so a refused call leaves the cache as it was):
        ValueError: input_ids not a 2-D int64/int32 tensor (FieldError for the dtype, naming it), an id
            outside [0, vocab_size) (named with its (row, col)), cache.length + T beyond
            `max_position_embeddings` (learned positions and RoPE alike; with `position_ids`, their
            largest value decides), a mask / position_ids / labels of the wrong shape, or labels with
            logits_to_keep / return_hidden. The value checks
            cost one min/max read and are skipped under torch.compile (see `values_checkable`).
    """

    # What adapter files record of the model (read by tinytune.peft, which does not import models):
    # PEFT's task type, and the modules trained whole beside any method (none for a language model).
    peft_task_type = "CAUSAL_LM"
    peft_modules_to_save: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # the checkpoint directory it was loaded from (`load_pretrained` sets it, as transformers does);
        # None for a model built from a config. Adapter files record it as `base_model_name_or_path`.
        self.name_or_path: str | None = None
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding module (Hugging Face's name; soft prompts look it up through it)."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        """The output layer, `lm_head` (Hugging Face's name; "all-linear" targets leave it out)."""
        return self.lm_head

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether per-block activation checkpointing is on."""
        return self.model.gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (non-reentrant: works with a frozen base)."""
        self.model.gradient_checkpointing = bool(enabled)

    def set_decode_layout(self, enabled: bool = True) -> list[str]:
        """Lay out wide linear weights column-major for faster CPU decoding (see `layout.py`).

        Values, shapes and parameter objects are unchanged. Returns the re-laid-out layer names.
        """
        return set_decode_layout(self, enabled)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for `batch` rows and up to `max_len` positions, in the model's dtype."""
        ref = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or ref.dtype, ref.device)

    def chunked_head_weight(self) -> torch.Tensor | None:
        """The (V, d) weight `lm_head` applies when it is a plain bias-free `nn.Linear` without hooks, so
        that a chunked loss or log-prob over `return_hidden=True` states equals the logits path exactly;
        None otherwise (a LoRA-wrapped, biased or hooked head: use the logits)."""
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None or head._forward_hooks or head._forward_pre_hooks:
            return None
        return head.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, cache: KVCache | None = None, prefix_kv=None, logits_to_keep: int = 0,
                return_hidden: bool = False, return_logits: bool = False, num_items_in_batch=None):
        past = cache.length if cache is not None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past)
        if labels is not None:
            self._check_labels(labels, input_ids, inputs_embeds, logits_to_keep, return_hidden, num_items_in_batch)
            labels = labels.long()  # cross_entropy's targets (int32 is accepted, as for input_ids)
        h = self._embed(input_ids, inputs_embeds)
        B, T, _ = h.shape
        block_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # packed rows: (B, 1, T, S) bool
            block_mask, attention_mask = self._check_block_mask(attention_mask, cache, B, T), None
        if position_ids is None:
            position_ids = _position_ids(attention_mask, past, T, h.device).expand(B, T)
        if self.model.embed_positions is not None:
            h = h + self.model.embed_positions(position_ids)
        rope = self.model.rotary(position_ids, h.dtype) if self.model.rotary is not None else None
        prefix_len = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if block_mask is not None and prefix_len:  # every packed token sees the whole prefix
            visible = block_mask.new_ones(block_mask.shape[0], 1, T, prefix_len)
            block_mask = torch.cat((visible, block_mask), dim=-1)  # (B, 1, T, P + T)
        mask = block_mask if block_mask is not None else build_attention_mask(
            attention_mask, past, T, self.config.sliding_window, prefix_len, h.device)
        h = self._run_layers(h, rope, mask, cache, prefix_kv)
        if cache is not None:
            cache.length += T
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.model.norm(h)  # (B, T, d)
        if labels is not None:
            return self._loss_output(h, labels, num_items_in_batch, return_logits)
        return h if return_hidden else self.lm_head(h)

    def _loss_output(self, h: torch.Tensor, labels: torch.Tensor, num_items, return_logits: bool) -> CausalLMOutput:
        """The next-token loss of `labels` on final hidden states `h` (B, T, d): chunked (no (B, T, V) logits)
        when the head allows it and no logits were asked for."""
        weight = None if return_logits else self.chunked_head_weight()
        count = num_items  # an int, a float or a 0-d tensor (transformers' Trainer passes a tensor): divided as given
        if weight is not None:
            return CausalLMOutput(loss=causal_lm_loss_from_hidden(h, weight, labels, count))
        logits = self.lm_head(h)  # (B, T, V)
        return CausalLMOutput(loss=causal_lm_loss(logits, labels, count), logits=logits if return_logits else None)

    def _check_labels(self, labels, input_ids, inputs_embeds, logits_to_keep, return_hidden, num_items) -> None:
        vocab = self.config.vocab_size
        ref = input_ids if input_ids is not None else inputs_embeds
        lead = tuple(ref.shape[:2]) if isinstance(ref, torch.Tensor) else None
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
                or tuple(labels.shape) != lead:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an int64/int32 tensor of shape (batch, seq) = {lead} like input_ids, "
                             f"got {got}")
        if logits_to_keep or return_hidden:
            raise ValueError("labels score every position: they cannot be combined with logits_to_keep or "
                             "return_hidden (pass one or the other)")
        if num_items is not None and not isinstance(num_items, torch.Tensor) and \
                (isinstance(num_items, bool) or not isinstance(num_items, (int, float)) or num_items <= 0):
            raise ValueError(f"num_items_in_batch must be a positive count of scored tokens, got {num_items!r}")
        if labels.numel() and values_checkable(labels):  # one host read, as for input_ids
            scored = labels[labels != -100]
            low, high = (int(v) for v in torch.aminmax(scored)) if scored.numel() else (0, 0)
            if low < 0 or high >= vocab:
                raise ValueError(f"labels hold id {low if low < 0 else high}, outside the vocabulary [0, {vocab}) "
                                 "(-100 marks a position that is not scored)")

    @staticmethod
    def _check_block_mask(mask, cache, B: int, T: int) -> torch.Tensor:
        """A caller-built (B, 1, T, T) boolean mask (e.g. block-diagonal for packed examples)."""
        if cache is not None:
            raise ValueError("a 4-D attention_mask cannot be combined with a KV cache")
        if mask.dtype != torch.bool or tuple(mask.shape) not in ((B, 1, T, T), (1, 1, T, T)):
            raise ValueError(f"a 4-D attention_mask must be bool of shape ({B}, 1, {T}, {T}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past: int) -> None:
        """Everything forward reads, checked before anything runs (so a refused call changes nothing).

        Types and shapes always; ids and positions by one min/max read of their values, skipped where
        reading values back is not allowed (`values_checkable`: under torch.compile, say).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
                shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
                raise ValueError(f"inputs_embeds must be (batch, seq, hidden), got {shape}")
        else:
            check_token_ids(input_ids)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        self._check_mask_and_positions(attention_mask, position_ids, B, T, past)
        if position_ids is None and past + T > self.config.max_position_embeddings:
            what = f"cached ({past}) + new tokens ({T}) = {past + T}" if past else f"sequence length {T}"
            raise _too_many_positions(what, self.config)
        self._check_values(input_ids, position_ids)

    @staticmethod
    def _check_mask_and_positions(attention_mask, position_ids, B: int, T: int, past: int) -> None:
        """Shapes of a 2-D mask (B or 1, past + T) and of position_ids (B or 1, T); 4-D masks: `_check_block_mask`."""
        if attention_mask is not None and attention_mask.dim() != 4:
            shape = tuple(attention_mask.shape)
            if len(shape) != 2 or shape[0] not in (1, B) or shape[1] != past + T:
                raise ValueError(f"attention_mask must be (batch, cached + new tokens) = ({B}, {past + T}) or a "
                                 f"boolean (batch, 1, T, T) mask, got shape {shape}")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
                    position_ids.shape[0] not in (1, B) or position_ids.shape[1] != T:
                shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids)
                raise ValueError(f"position_ids must be (batch, seq) = ({B}, {T}) or (1, {T}), got {shape}")

    def _check_values(self, input_ids, position_ids) -> None:
        """ids in [0, vocab_size) and given positions in [0, max_position_embeddings): one host read."""
        tensors = [t for t in (input_ids, position_ids) if t is not None and t.numel()]
        if not tensors or not values_checkable(tensors[0]):
            return
        values = torch.stack([v.long() for t in tensors for v in torch.aminmax(t)]).tolist()
        cfg = self.config
        if input_ids is not None and input_ids.numel():
            (low, high), values = values[:2], values[2:]
            if low < 0 or high >= cfg.vocab_size:
                raise _out_of_vocabulary(input_ids, low if low < 0 else high, cfg)
        if values:
            low, high = values
            if low < 0:
                raise ValueError(f"position_ids must be >= 0, got {low}")
            if high >= cfg.max_position_embeddings:
                raise _too_many_positions(f"position_ids up to {high} ({high + 1} positions)", cfg)

    def _embed(self, input_ids, inputs_embeds):
        """(B, T, d) input embeddings (arguments checked by `_check_inputs`)."""
        if inputs_embeds is not None:
            return inputs_embeds
        return self.model.embed_tokens(input_ids)

    def _run_layers(self, h, rope, mask, cache, prefix_kv):
        use_checkpoint = self.model.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            prefix = prefix_kv[i] if prefix_kv else None
            if use_checkpoint and cache is None:
                h = checkpoint(layer, h, rope, mask, None, prefix, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache, prefix)
        return h

    def reset_buffers(self, device=None) -> None:
        """Recompute non-persistent buffers (RoPE tables) on `device` (default: the embeddings')."""
        if self.model.rotary is not None:
            self.model.rotary.reset_buffers(device or self.model.embed_tokens.weight.device)
