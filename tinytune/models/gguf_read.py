"""Read a GGUF file (llama.cpp's format) into a tinytune `CausalLM` and, for byte-level BPE vocabularies,
a `Tokenizer`.

Every tensor is dequantised with `gguf.quants.dequantize` (any type it knows: F32, F16, BF16, Q8_0,
Q4_0, Q4_1, K-quants, ...) and converted to the caller's dtype; the "llama" architecture's q/k rows are
put back into Hugging Face's rotate-half order (`gguf.unpermute`). The whole file is checked (its
metadata, every tensor's name and shape) before the first tensor is dequantised.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .gguf import ARCHITECTURES, SUPPORTED_ARCHITECTURES, gguf_name, import_gguf, unpermute
from .transformer import CausalLM

_REQUIRED = object()
# llama.cpp pre-tokenizer names -> the split regex before byte-level mapping (None: GPT-2's own regex)
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_PRE_REGEX = {"gpt-2": None, "default": None, "smollm": None, "qwen2": _QWEN2, "llama-bpe": _LLAMA3}


def _open(gguf, path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"load_pretrained: {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError, IndexError, KeyError... on damaged bytes
        raise ValueError(f"load_pretrained: {path} is not a readable GGUF file ({type(err).__name__}: {err}); it "
                         "may be truncated or damaged") from None


def _field(reader, path: Path, key: str, kind=int, default=_REQUIRED):
    """Metadata value `key` of type `kind` (ints >= 1, numbers > 0); ValueError naming the file and the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"load_pretrained: {path} lacks the metadata key {key!r}")
        return default
    try:
        value = field.contents()
    except Exception:
        value = None
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          list: lambda v: isinstance(v, list)}[kind]
    if not ok(value):
        raise ValueError(f"load_pretrained: {path} metadata {key!r}={value!r}; expected "
                         f"{ {int: 'an integer >= 1', float: 'a number > 0'}.get(kind, kind.__name__)}")
    return value


def _token_id(reader, path: Path, name: str, vocab: int) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"load_pretrained: {path} metadata {key!r}={value!r}; expected an id in [0, {vocab})")
    return value


def _model_type(reader, path: Path, arch: str) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"load_pretrained: {path} has general.architecture={arch!r}, which tinytune does not "
                         f"load; supported: {SUPPORTED_ARCHITECTURES}")
    if arch != "llama":
        return arch
    name = _field(reader, path, "general.name", str, "")
    return "mistral" if f"{arch}.attention.sliding_window" in reader.fields or "mistral" in name.lower() else "llama"


def read_config(reader, path: Path) -> ModelConfig:
    """The `ModelConfig` a GGUF file describes (metadata plus which bias / output tensors it holds)."""
    arch = _field(reader, path, "general.architecture", str)
    model_type = _model_type(reader, path, arch)
    names = {t.name: t for t in reader.tensors}
    scaling = _field(reader, path, f"{arch}.rope.scaling.type", str, "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"load_pretrained: {path} uses rope scaling ({arch}.rope.scaling.type={scaling!r}, "
                         f"rope_freqs tensor: {'rope_freqs.weight' in names}), which tinytune does not read from GGUF")
    if "token_embd.weight" not in names:
        raise ValueError(f"load_pretrained: {path} lacks the tensor 'token_embd.weight'")
    vocab = int(names["token_embd.weight"].shape[-1])  # ggml order: (n_embd, n_vocab)
    def get(key, kind=int, default=_REQUIRED):
        return _field(reader, path, f"{arch}.{key}", kind, default)
    heads = get("attention.head_count")
    values = dict(
        vocab_size=vocab, hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"), num_heads=heads, max_position_embeddings=get("context_length"),
        qkv_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        o_bias="blk.0.attn_output.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        **{n: _token_id(reader, path, g, vocab) for n, g in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                                                             ("pad_token_id", "padding"))})
    if arch == "gpt2":
        values.update(norm="layer", norm_eps=get("attention.layer_norm_epsilon", float), act="gelu_tanh",
                      gated_mlp=False, positions="learned")
    else:
        head_dim = get("attention.key_length", int, None) or get("rope.dimension_count", int, None)
        values.update(num_kv_heads=get("attention.head_count_kv", int, heads), head_dim=head_dim,
                      norm_eps=get("attention.layer_norm_rms_epsilon", float),
                      rope_theta=get("rope.freq_base", float, 10000.0),
                      sliding_window=get("attention.sliding_window", int, None) if model_type == "mistral" else None)
    try:
        return ModelConfig(model_type=model_type, **values)
    except ValueError as err:
        raise type(err)(f"load_pretrained: {path}: {err}") from None


def _expected(model: CausalLM) -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """GGUF name -> (numpy shape, the tinytune keys it fills); GPT-2's q/k/v come fused as attn_qkv."""
    cfg = model.config
    out: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(key)
        if cfg.model_type == "gpt2" and any(f".attn_{p}." in name for p in "qkv"):
            name = name.replace(name.split(".")[2], "attn_qkv")
            shape, keys = out.get(name, ((0, *value.shape[1:]), []))
            out[name] = ((shape[0] + value.shape[0], *shape[1:]), keys + [key])
        else:
            out[name] = (tuple(value.shape), [key])
    return out


def _check_tensors(reader, path: Path, expected: dict) -> None:
    found = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected)
    misshaped = [f"{n}: file {found[n]} vs model {expected[n][0]}" for n in expected
                 if n in found and found[n] != expected[n][0]]
    problems = [f"{label}: {items}" for label, items in (("missing tensors", missing), ("unexpected tensors",
                unexpected), ("mis-shaped tensors", misshaped)) if items]
    if problems:
        raise ValueError(f"load_pretrained: cannot load {path}; " + "; ".join(problems))


def _load_weights(gguf, reader, path: Path, model: CausalLM, dtype, device) -> None:
    cfg = model.config
    expected = _expected(model)
    _check_tensors(reader, path, expected)
    for tensor in reader.tensors:
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = array.reshape(expected[tensor.name][0])
        except Exception as err:
            raise ValueError(f"load_pretrained: {path} tensor {tensor.name!r} ({tensor.tensor_type.name}) cannot "
                             f"be dequantised ({type(err).__name__}: {err}); the file may be damaged") from None
        if ARCHITECTURES[cfg.model_type] == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            array = unpermute(array, cfg.num_heads if ".attn_q." in tensor.name else cfg.num_kv_heads)
        keys = expected[tensor.name][1]
        pieces = np.split(array, len(keys), axis=0) if len(keys) > 1 else [array]  # GPT-2: q, k, v
        for key, piece in zip(keys, pieces):
            module_name, _, name = key.rpartition(".")
            value = torch.from_numpy(np.array(piece, dtype=np.float32)).to(device=device, dtype=dtype)
            model.get_submodule(module_name)._parameters[name] = torch.nn.Parameter(value)


def _backend(tokens: list[str], types: list[int], merges: list[str], pre: str, bos: int | None, add_bos: bool):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    backend = Backend(bpe)
    regex = _PRE_REGEX.get(pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps + [byte_level]) if steps else byte_level
    backend.decoder = decoders.ByteLevel()
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B:1", special_tokens=[(tokens[bos], bos)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return backend


def read_tokenizer(reader, path: Path, vocab: int):
    """A `Tokenizer` for a "gpt2" (byte-level BPE) vocabulary; None for any other tokenizer.ggml.model."""
    from .tokenizer import Tokenizer

    if _field(reader, path, "tokenizer.ggml.model", str, None) != "gpt2":
        return None
    tokens = _field(reader, path, "tokenizer.ggml.tokens", list)
    types = _field(reader, path, "tokenizer.ggml.token_type", list, [1] * len(tokens))
    merges = _field(reader, path, "tokenizer.ggml.merges", list, [])
    if len(tokens) != len(types) or len(tokens) > vocab:
        raise ValueError(f"load_pretrained: {path} has {len(tokens)} tokenizer.ggml.tokens, {len(types)} token "
                         f"types and a {vocab}-row token_embd; expected as many types as tokens, at most {vocab}")
    pre = _field(reader, path, "tokenizer.ggml.pre", str, "default")
    if pre not in _PRE_REGEX:
        warnings.warn(f"load_pretrained: {path} names pre-tokenizer {pre!r}, unknown to tinytune; splitting as "
                      "GPT-2 does, which may tokenize some text differently from llama.cpp", stacklevel=3)
    ids = {n: _token_id(reader, path, n, len(tokens)) for n in ("bos", "eos", "padding", "unknown")}
    add_bos = _field(reader, path, "tokenizer.ggml.add_bos_token", bool, False)
    backend = _backend(tokens, types, merges, pre, ids["bos"], add_bos)
    tokenizer = Tokenizer(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
                          unk_token_id=ids["unknown"])
    template = _field(reader, path, "tokenizer.chat_template", str, None)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_gguf(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a GGUF file: `(model, tokenizer)` (what `tt.load_pretrained("file.gguf")` returns).

    Args:
        path: a .gguf file of architecture "llama" (read as llama, or mistral when the file has a sliding
            window or its general.name says mistral), "qwen2" or "gpt2", with plain RoPE.
        dtype, device: where the dequantised weights go.

    Returns:
        (model in eval mode, tokenizer): a `Tokenizer` (byte-level BPE built from tokenizer.ggml.tokens /
        merges, with bos/eos/pad/unk ids, the add_bos flag and `chat_template` when present) for
        tokenizer.ggml.model "gpt2"; None for other vocabulary types (SentencePiece "llama", "bert", ...)
        or none.

    Raises:
        ImportError: no `gguf` package. FileNotFoundError: no such file. ValueError: an unreadable or
            truncated file, an unsupported architecture or rope scaling, a missing or malformed metadata key,
            or missing / unexpected / mis-shaped tensors (each named with the file), before a model is returned.
    """
    gguf = import_gguf("load_pretrained(.gguf)")
    path = Path(path)
    reader = _open(gguf, path)
    cfg = read_config(reader, path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    _load_weights(gguf, reader, path, model, dtype, device)
    tokenizer = read_tokenizer(reader, path, cfg.vocab_size)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(device)
    model.name_or_path = str(path)
    return model.eval(), tokenizer
