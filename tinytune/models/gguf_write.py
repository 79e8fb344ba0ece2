"""Write a tinytune `CausalLM` as a GGUF file that llama.cpp runs and transformers' GGUF loader reads.

Metadata and tensor names are what llama.cpp's `convert_hf_to_gguf.py` writes for the architecture
(see `gguf.py`); LoRA and (IA)3 are merged first through `merged_state_dict` (the model is unchanged).
The file is written beside its destination, fsynced, then renamed onto it (`_files.atomic_write`): a
failed save leaves the previous file whole.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write
from .gguf import ARCHITECTURES, gguf_name, import_gguf, permute
from .transformer import CausalLM

DTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's LlamaFileType for each dtype (general.file_type)
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _check_model(model, dtype: str) -> None:
    """What llama.cpp's architectures can express; ValueError naming the field otherwise."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_gguf expects a tinytune CausalLM, got {type(model).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"save_gguf: dtype={dtype!r}; expected one of {DTYPES}")
    cfg = model.config
    if cfg.rope_scaling is not None:
        raise ValueError(f"save_gguf: rope_scaling={cfg.rope_scaling!r} is not written (llama.cpp stores llama3 "
                         "scaling as a rope_freqs tensor, which tinytune does not produce); only plain RoPE models")
    want_act = "gelu_tanh" if cfg.model_type == "gpt2" else "silu"
    if cfg.act != want_act:
        raise ValueError(f"save_gguf: act={cfg.act!r}; llama.cpp's {ARCHITECTURES[cfg.model_type]} architecture "
                         f"computes {want_act!r} only")


def _tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order = torch order), merged, permuted and fused as llama.cpp wants."""
    from .hf import merged_state_dict

    cfg = model.config
    state = merged_state_dict(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    arrays = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}
    out, gpt2 = {}, cfg.model_type == "gpt2"
    for key, value in arrays.items():
        name = gguf_name(key)
        if name is None:
            raise ValueError(f"save_gguf: no GGUF name for tinytune tensor {key!r}")
        if gpt2 and (".attn_k." in name or ".attn_v." in name):
            continue  # fused into attn_qkv with q below
        if gpt2 and ".attn_q." in name:
            parts = [arrays[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[name.replace(".attn_q.", ".attn_qkv.")] = np.concatenate(parts, axis=0)
            continue
        if ARCHITECTURES[cfg.model_type] == "llama" and (".attn_q." in name or ".attn_k." in name):
            value = permute(value, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        out[name] = np.ascontiguousarray(value)
    return out


def _encode(gguf, array: np.ndarray, dtype: str):
    """(data, raw_dtype) for the writer: 1-D tensors stay F32 (as convert_hf_to_gguf.py does); Q8_0 falls
    back to F16 where a row is not a multiple of its 32-value block."""
    Q = gguf.GGMLQuantizationType
    if array.ndim <= 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(array, Q.BF16), Q.BF16
    return array.astype(np.float16), None


def _model_metadata(writer, model: CausalLM, dtype: str, name: str) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.model_type == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        if ARCHITECTURES[cfg.model_type] == "llama":
            writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
    writer.add_file_type(_FILE_TYPES[dtype])


def _backend_json(tokenizer) -> dict:
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise ValueError(f"save_gguf: only byte-level BPE tokenizers (GGUF tokenizer.ggml.model 'gpt2') are "
                         f"written; this one has model {model.get('type')!r}, pre_tokenizer "
                         f"{(data.get('pre_tokenizer') or {}).get('type')!r}")
    return data


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for the known byte-level layouts."""
    kinds = [p.get("type") for p in (pre.get("pretokenizers") or [pre])] if pre else []
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    warnings.warn(f"save_gguf: pre-tokenizer {kinds} has no llama.cpp name known to tinytune; writing 'default', "
                  "which llama.cpp may split differently", stacklevel=3)
    return "default"


def vocab_metadata(tokenizer, vocab_size: int) -> dict:
    """tokens, token types, merges, pre-tokenizer name and special ids of a byte-level BPE tokenizer, padded
    with "[PADn]" tokens (type UNUSED) up to the model's `vocab_size`, as convert_hf_to_gguf.py pads them."""
    data = _backend_json(tokenizer)
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"save_gguf: the tokenizer has id {max(by_id)}, outside the model's vocab_size={vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]
    return {"tokens": tokens, "types": [types.get(i, UNUSED) for i in range(vocab_size)], "merges": merges,
            "pre": _pre_name(data.get("pre_tokenizer"))}


def _vocab(writer, model: CausalLM, tokenizer, vocab: dict | None) -> None:
    cfg = model.config
    if tokenizer is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_add_bos_token(bool(tokenizer.adds_bos_token))
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            writer.add_chat_template(template)
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
           for name in ("bos", "eos", "pad", "unk")}
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    ids = {"bos": ids["bos"] if ids["bos"] is not None else cfg.bos_token_id,
           "eos": ids["eos"] if ids["eos"] is not None else eos,
           "pad": ids["pad"] if ids["pad"] is not None else cfg.pad_token_id, "unk": ids["unk"]}
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if ids[name] is not None:
            add(int(ids[name]))


def save_gguf(model: CausalLM, path, dtype: str = "f16", tokenizer=None) -> Path:
    """Write `model` as one GGUF file for llama.cpp (LoRA / (IA)3 merged in; the model is unchanged).

    Args:
        model: a tinytune `CausalLM` of model_type llama or mistral (GGUF architecture "llama", q/k rows
            permuted as llama.cpp expects), qwen2 ("qwen2") or gpt2 ("gpt2"), with plain RoPE.
        path: the .gguf file to write; replaced as a whole, and only once the new file is on disk.
        dtype: "f32", "f16", "bf16" or "q8_0" for the matrices (Q8_0 rows not a multiple of 32 values
            fall back to F16); vectors (norms, biases) are always F32, as llama.cpp's converter writes them.
        tokenizer: a byte-level BPE `tinytune.models.Tokenizer`: its tokens,
            types, merges, bos/eos/pad/unk ids, add_bos flag and, when it has a str `chat_template`
            attribute, the chat template. Without one only the model config's special ids are written.

    Returns:
        path.

    Raises:
        ImportError: the `gguf` package is missing. TypeError: not a CausalLM. ValueError: a dtype,
            activation, rope scaling, tokenizer type or unmergeable method llama.cpp cannot hold (named),
            before anything is written. OSError: writing failed (the previous file, if any, is intact).
    """
    gguf = import_gguf("save_gguf")
    _check_model(model, dtype)
    if tokenizer is not None and not hasattr(tokenizer, "backend"):
        raise TypeError(f"save_gguf: tokenizer must be a tinytune.models.Tokenizer, got {type(tokenizer).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_gguf: {path} is a directory; pass the .gguf file to write")
    tensors = {k: _encode(gguf, v, dtype) for k, v in _tensors(model).items()}
    arch = ARCHITECTURES[model.config.model_type]
    # transformers 5 reads a "llama" file whose general.name holds "mistral" as mistral, then fails in gguf-py
    # (which has no such architecture): a model without a directory name is named after its architecture
    name = Path(model.name_or_path).name if model.name_or_path else f"tinytune-{arch}"
    # the tokenizer is read before the temporary file exists: its errors leave the directory untouched
    vocab = vocab_metadata(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _model_metadata(writer, model, dtype, name)
        _vocab(writer, model, tokenizer, vocab)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (data, raw_dtype) in tensors.items():
            writer.add_tensor(key, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()  # atomic_write then fsyncs the file and the directory, and renames it

    atomic_write(path, write)
    return path
