"""Tokenizer: a thin wrapper over the `tokenizers` library that reads and writes Hugging Face tokenizer
directories (tokenizer.json plus its json configs) and encodes as `transformers.AutoTokenizer` does for the
same directory. How special tokens are resolved: see `Tokenizer.from_dir`."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import tokenizers
import torch

from .._transaction import directory_transaction
from . import chat_template as _chat
from .tokenizer_files import (_NAMES, TOKENIZER_FILE, _config_ids, _load_backend, _named_tokens, _read_json,
                              _template_tokens)

_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", _chat.CHAT_TEMPLATE_FILE,
          _chat.CHAT_TEMPLATE_DIR)
_SIDES = ("left", "right")
_PADDINGS = (True, "longest", "max_length", False)
# transformers writes int(1e30) as model_max_length to mean "no limit"; anything this big is unset.
_NO_LIMIT = 10**12


class _SpecialId:
    """A special-token id attribute: an int in [0, vocab_size) or None, checked on every assignment."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__.get(self.name)

    def __set__(self, obj, value):
        if value is not None and not (_is_int(value) and 0 <= value < obj.vocab_size):
            raise ValueError(f"{self.name} must be None or an int in [0, {obj.vocab_size}), got {value!r}")
        obj.__dict__[self.name] = value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and padding rules a fine-tuning loop needs.

    Special tokens come only from the backend's post-processor, as in `transformers.AutoTokenizer`: Llama
    files add BOS through a TemplateProcessing, GPT-2 files add nothing, and BOS is never added twice.

    Args:
        backend: the `tokenizers.Tokenizer`; its own padding/truncation are switched off (they are per call).
        bos_token_id, eos_token_id, pad_token_id, unk_token_id: ids or None (checked on every assignment).
        extra_eos_token_ids: further ids that end generation (e.g. Llama 3's <|eot_id|>).
        padding_side, truncation_side: "left" or "right".
        model_max_length: default `max_length` for `truncation=True`; None for no limit.
        chat_template: the Jinja chat template (see `apply_chat_template`), or None. `chat_templates` holds
            every named template, {name: Jinja text}; its "default" entry is `chat_template`.
    """

    bos_token_id = _SpecialId()
    eos_token_id = _SpecialId()
    pad_token_id = _SpecialId()
    unk_token_id = _SpecialId()

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, unk_token_id=None, extra_eos_token_ids=(), padding_side="right",
                 truncation_side="right", model_max_length: int | None = None, chat_template: str | None = None):
        self.backend = backend  # the wrapped `tokenizers.Tokenizer`, public for anything not wrapped here
        backend.no_padding()
        backend.no_truncation()
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self._extra_eos = [i for i in extra_eos_token_ids if 0 <= i < self.vocab_size]
        self.padding_side = _check_side(padding_side, "padding_side")
        self.truncation_side = _check_side(truncation_side, "truncation_side")
        self.model_max_length = _check_max_length(model_max_length)
        self._layout = self._special_layout()  # the post-processor is fixed, so probe it once
        self.chat_templates: dict[str, str] = {}  # public: {name: Jinja text}
        self._template_sources: dict[str, tuple[str, str]] = {}  # name -> (text as read, file it came from)
        self._template_tokens: dict[str, str] = {}  # {"sep_token": ...}: strings only, for chat templates
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (needs `tokenizer.json`).

        Special tokens, strongest source first:
          1. token strings (plain or AddedToken dicts with "content"): special_tokens_map.json over
             tokenizer_config.json (the map is ignored when the config has `added_tokens_decoder`), then the
             pad token of tokenizer.json's padding. transformers resolves them so too, hence ids, padding and
             `skip_special_tokens` agree with AutoTokenizer. A token missing from the vocabulary is ignored
             with a warning (transformers would append it, past the end of the model's embedding).
          2. ids still unset come from generation_config.json, then config.json (`bos_token_id`,
             `pad_token_id`, `eos_token_id`, whose first entry counts when it is a list).
          3. `eos_token_ids` is `eos_token_id` plus every other eos id listed in those two files.
        `add_bos_token`/`add_eos_token` are informational: as in transformers 5, tokenizer.json's
        post-processor decides; a disagreement warns. `padding_side`, `truncation_side`, `model_max_length`
        come from tokenizer_config.json. Chat templates: see `tinytune.models.chat_template`.

        Raises:
            FileNotFoundError: the directory or its `tokenizer.json` is missing.
            ValueError: a file cannot be parsed, or a special-token entry has the wrong type.
        """
        directory = Path(path)
        backend = _load_backend(directory)
        json_pad = backend.padding  # read before __init__ switches it off
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file)
        try:
            tok = cls(backend, padding_side=config.get("padding_side") or (json_pad or {}).get("direction", "right"),
                      truncation_side=config.get("truncation_side", "right"),
                      model_max_length=config.get("model_max_length"))
        except ValueError as err:
            raise ValueError(f"{config_file}: {err}") from err
        tok._set_named_tokens(_named_tokens(directory, config, json_pad), directory)
        tok._template_tokens = _template_tokens(directory, config)
        tok._template_sources = _chat.read_chat_templates(directory, config, config_file)
        tok.chat_templates = {name: text for name, (text, _) in tok._template_sources.items()}
        tok._fill_from_config_ids(_config_ids(directory))
        tok._warn_on_flag_mismatch(config, config_file)
        return tok

    def _set_named_tokens(self, named: dict[str, tuple[str, str]], directory: Path) -> None:
        """Set ids from token strings; mark each named token special in the backend, as transformers does,
        so that `skip_special_tokens` drops it and text containing it maps to the single id."""
        for name, (token, file) in named.items():
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                warnings.warn(f"{name}_token {token!r} from {directory / file} is not in the vocabulary; ignored")
                continue
            setattr(self, f"{name}_token_id", token_id)
            if token_id not in self.backend.get_added_tokens_decoder():
                self.backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])

    def _fill_from_config_ids(self, per_file: list[tuple[str, dict[str, list]]]) -> None:
        """Fill unset ids and collect every eos id; out-of-range ids (old Llama configs say -1) are skipped."""
        for file, ids in per_file:
            for name, values in ids.items():
                valid = [v for v in values if _is_int(v) and 0 <= v < self.vocab_size]
                if len(valid) < len(values):
                    warnings.warn(f"ignoring {name}_token_id {values} in {file}: not ids in [0, {self.vocab_size})")
                if valid and getattr(self, f"{name}_token_id") is None:
                    setattr(self, f"{name}_token_id", valid[0])
                if name == "eos":
                    self._extra_eos += [v for v in valid if v not in self._extra_eos]

    def _warn_on_flag_mismatch(self, config: dict, config_file: Path) -> None:
        for flag, actual in (("add_bos_token", self.adds_bos_token), ("add_eos_token", self.adds_eos_token)):
            if flag in config and bool(config[flag]) != actual:
                warnings.warn(f"{config_file} says {flag}={config[flag]}, but the post-processor in "
                              f"{TOKENIZER_FILE} {'adds' if actual else 'does not add'} it; following {TOKENIZER_FILE}")

    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja text), None when the tokenizer has none; settable (None removes it)."""
        return self.chat_templates.get(_chat.DEFAULT)

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        _chat.set_default(self.chat_templates, value)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True, *,
                            tools=None, documents=None, chat_template: str | None = None, **kwargs):
        """Render a conversation with the chat template, as `transformers`' `apply_chat_template` does.

        The template sees `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens as
        strings (`bos_token`, `eos_token`, ...) and every extra keyword argument (overriding a special token of
        the same name), e.g. Llama 3.1's `date_string`.

        Args:
            messages: a list of {"role", "content", ...} dicts.
            add_generation_prompt: end with the header that starts an assistant turn.
            tokenize: return ids (the text encoded without adding special tokens, as transformers does).
            tools, documents: lists of dicts (JSON schemas for tools) for templates that use them.
            chat_template: a name in `chat_templates` or Jinja text; None: the "tool_use" template when `tools`
                are given and there is one, else the default.
        Returns: list[int] when `tokenize`, else str.
        Raises:
            ValueError: no chat template; an error raised by the template (`raise_exception`), naming its file.
        """
        text, source = _chat.pick_template(self.chat_templates, self._template_sources, chat_template, tools)
        variables = {**self._token_strings(), **kwargs}
        rendered = _chat.render(text, source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                documents=documents, variables=variables)
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _token_strings(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...}: the set special tokens, then the config's sep/cls/mask strings."""
        return {**{f"{n}_token": self.id_to_token(getattr(self, f"{n}_token_id"))
                   for n in _NAMES if getattr(self, f"{n}_token_id") is not None}, **self._template_tokens}

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`, not its `vocab_size`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: `eos_token_id` first, then the extra ones from the configs."""
        first = [self.eos_token_id] if self.eos_token_id is not None else []
        return first + [i for i in self._extra_eos if i != self.eos_token_id]

    @property
    def adds_bos_token(self) -> bool:
        """Whether `encode(text)` starts with BOS (decided by the post-processor in tokenizer.json)."""
        return self.bos_token_id is not None and self.bos_token_id in self._layout[0]

    @property
    def adds_eos_token(self) -> bool:
        """Whether `encode(text)` ends with EOS."""
        return self.eos_token_id is not None and self.eos_token_id in self._layout[1]

    def _special_layout(self) -> tuple[list[int], list[int]]:
        """(ids before the text, ids after it) that the post-processor adds to a single sequence."""
        try:
            full = self.backend.encode("a", add_special_tokens=True)
        except Exception:  # e.g. a WordLevel model without "a" or an unk token: report nothing added
            return [], []
        text_at = [i for i, s in enumerate(full.sequence_ids) if s is not None]  # None on special tokens
        first, last = (text_at[0], text_at[-1] + 1) if text_at else (len(full.ids), len(full.ids))
        return full.ids[:first], full.ids[last:]

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of `token_id`, or None when out of range."""
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string, with the post-processor's special tokens when `add_special_tokens`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for lists")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], **kwargs) -> dict:
        """`encode_batch`; one string gives tensors of shape (1, T), or flat lists with return_tensors=None."""
        if isinstance(text, str):
            out = self.encode_batch([text], **kwargs)
            return out if kwargs.get("return_tensors", "pt") else {k: v[0] for k, v in out.items()}
        return self.encode_batch(text, **kwargs)

    def encode_batch(self, texts: list[str], padding: bool | str = True, max_length: int | None = None,
                     truncation: bool = False, padding_side: str | None = None,
                     return_tensors: str | None = "pt", add_special_tokens: bool = True) -> dict:
        """Encode, truncate and pad a batch of strings.

        Args:
            padding: True / "longest" pads to the longest row; "max_length" pads to `max_length`; False none.
            max_length: length limit for truncation and for padding="max_length", special tokens included.
            truncation: cut rows longer than `max_length` (or `model_max_length`) on `truncation_side`;
                the post-processor's special tokens are kept, as in transformers.
            padding_side: "left" or "right"; defaults to `self.padding_side`.
            return_tensors: "pt" for (batch, seq) LongTensors, None for lists of lists.
        Returns:
            {"input_ids": ..., "attention_mask": ...} with mask 1 on tokens and 0 on padding.
        Raises:
            ValueError: bad arguments; padding several rows (or to max_length) with no pad token; a row
                over max_length with padding="max_length" and no truncation; ragged rows as tensors.
        """
        side = _check_side(padding_side or self.padding_side, "padding_side")
        limit = self._check_batch_args(texts, padding, max_length, truncation, return_tensors)
        rows = self._encode_rows(texts, add_special_tokens, limit if truncation else None)
        if padding is not False:
            target = max_length if padding == "max_length" else max(len(r) for r in rows)
            rows, masks = self._pad(rows, target, side, needs_pad=len(rows) > 1 or padding == "max_length")
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": masks}
        if len({len(r) for r in rows}) > 1:  # only possible with padding=False
            raise ValueError(f"rows have lengths {[len(r) for r in rows]}: return_tensors='pt' needs "
                             "padding=True (or return_tensors=None)")
        return {"input_ids": torch.tensor(rows, dtype=torch.long),
                "attention_mask": torch.tensor(masks, dtype=torch.long)}

    def _check_batch_args(self, texts, padding, max_length, truncation, return_tensors) -> int | None:
        """Validate `encode_batch` arguments; return the truncation length (or None)."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
        if (i := next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)) is not None:
            raise TypeError(f"texts[{i}] must be a str, got {type(texts[i]).__name__}")
        if padding not in _PADDINGS or _is_int(padding):  # 1 == True, so 0 and 1 would slip through
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if max_length is not None and not (_is_int(max_length) and max_length >= 1):
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        limit = max_length if max_length is not None else self.model_max_length
        if truncation and limit is None:
            raise ValueError("truncation=True needs max_length (tokenizer.model_max_length is unset)")
        return limit

    def _encode_rows(self, texts, add_special_tokens: bool, limit: int | None) -> list[list[int]]:
        if limit is None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        processor = self.backend.post_processor
        n_special = processor.num_special_tokens_to_add(False) if processor and add_special_tokens else 0
        if limit <= n_special:
            raise ValueError(f"max_length={limit} leaves no room for text next to the {n_special} special "
                             "token(s) the post-processor adds")
        # Truncate before the post-processor so that its special tokens survive, as tokenizers/transformers do.
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        rows = []
        for enc in encodings:
            enc.truncate(limit - n_special, direction=self.truncation_side)
            rows.append(self.backend.post_process(enc, add_special_tokens=add_special_tokens).ids)
        return rows

    def _pad(self, rows, target: int, side: str, needs_pad: bool):
        """Pad every row to `target` on `side`; return (rows, attention masks)."""
        if needs_pad and self.pad_token_id is None:
            raise ValueError("padding needs a pad token but pad_token_id is None; set one, e.g. "
                             "`tokenizer.pad_token_id = tokenizer.eos_token_id`, or pass padding=False")
        ids_out, masks = [], []
        for i, row in enumerate(rows):
            gap = target - len(row)
            if gap < 0:
                raise ValueError(f"texts[{i}] has {len(row)} tokens, more than max_length={target}; "
                                 "pass truncation=True")
            fill, zeros, ones = [self.pad_token_id] * gap, [0] * gap, [1] * len(row)
            ids_out.append(fill + row if side == "left" else row + fill)
            masks.append(zeros + ones if side == "left" else ones + zeros)
        return ids_out, masks

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a list / 1-D tensor of ids (or one int); no space clean-up (transformers skips it for BPE)."""
        return self.backend.decode(self._as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        """`decode` for each row of a list of id lists or a 2-D tensor."""
        if isinstance(rows, torch.Tensor) and rows.dim() != 2:
            raise ValueError(f"batch_decode expects a 2-D tensor, got shape {tuple(rows.shape)}")
        return [self.decode(row, skip_special_tokens) for row in rows]

    def _as_id_list(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}; use batch_decode")
            ids = ids.reshape(-1).tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # the backend would silently drop them; -100 is the usual culprit (an ignored-label marker)
            raise ValueError(f"decode got ids outside [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def save(self, path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja into
        `path` (made if needed; other files kept) as one transaction, so that transformers' AutoTokenizer encodes
        and renders identically (see `tinytune.models.chat_template`); extra eos ids go in generation_config.json."""
        with directory_transaction(path, owned=_FILES, what="Tokenizer.save") as staging:
            self.write_files(staging)

    def write_files(self, directory: Path) -> None:
        """Write the tokenizer's files into the existing `directory` (inside a caller's transaction)."""
        directory = Path(directory)
        self.backend.save(str(directory / TOKENIZER_FILE))
        tokens = self._token_strings()
        added = {str(i): t.__getstate__() for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        # "PreTrainedTokenizerFast" makes every transformers version load the generic tokenizers-backed class
        # instead of a model-specific one that rebuilds the pipeline (and, for Llama in v5, pads on the left).
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                  "add_bos_token": self.adds_bos_token, "add_eos_token": self.adds_eos_token,
                  "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                  "clean_up_tokenization_spaces": False, "added_tokens_decoder": added}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if (named := _chat.write_chat_templates(directory, self.chat_templates)) is not None:
            config["chat_template"] = named
        for file, data in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
            (directory / file).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_max_length(value) -> int | None:
    """`model_max_length` as an int, or None for unset (None, 0, or transformers' huge "no limit" value)."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:  # NaN fails `>= 1`
        raise ValueError(f"model_max_length must be a number >= 1 or null, got {value!r}")
    return int(value) if value < _NO_LIMIT else None


def _check_side(side, what: str) -> str:
    if side not in _SIDES:
        raise ValueError(f"{what} must be 'left' or 'right', got {side!r}")
    return side


def load_tokenizer(path) -> Tokenizer | None:
    """`Tokenizer.from_dir(path)`, or None when the directory has no tokenizer.json (a missing directory
    raises FileNotFoundError)."""
    directory = Path(path)
    if directory.is_dir() and not (directory / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer.from_dir(directory)
