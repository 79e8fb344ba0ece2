"""GGUF (llama.cpp's file format): what the writer (`gguf_write.save_gguf`) and the reader
(`gguf_read.load_gguf`) share: the lazy import of the optional `gguf` package, the tensor-name table,
and llama.cpp's q/k row permutation.

Names and metadata follow llama.cpp's `convert_hf_to_gguf.py`: the architecture is "llama" for
tinytune's llama and mistral models, "qwen2" for qwen2 and "gpt2" for gpt2; tensors are called
`token_embd.weight`, `blk.N.attn_q.weight`, `output_norm.weight`, ... For the "llama" architecture
llama.cpp stores q_proj / k_proj rows permuted from Hugging Face's rotate-half RoPE layout to its
interleaved one (`permute`); transformers' GGUF loader and `gguf_read` undo it (`unpermute`).
"""
from __future__ import annotations

import numpy as np

# tinytune model_type -> llama.cpp architecture (general.architecture)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")

# tinytune name inside a block (model.layers.N.<ours>) -> GGUF name inside it (blk.N.<theirs>)
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# tinytune name outside the blocks -> GGUF name
TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.embed_positions": "position_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def import_gguf(what: str):
    """The `gguf` module; ImportError naming `what` and how to install it when it is missing."""
    try:
        import gguf
        import gguf.quants  # noqa: F401  (dequantize / quantize)
    except ImportError:
        raise ImportError(f"{what} needs the optional `gguf` package (llama.cpp's gguf-py): "
                          "pip install gguf  (or: pip install tinytune[gguf])") from None
    return gguf


def gguf_name(key: str) -> str | None:
    """The GGUF tensor name of a tinytune state-dict key (GPT-2's q/k/v: see `gguf_write`); None if unknown."""
    module, _, param = key.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{param}"
    parts = module.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in BLOCK_NAMES:
        return f"blk.{parts[2]}.{BLOCK_NAMES[parts[3]]}.{param}"
    return None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows (or bias) -> llama.cpp's order: per head, the two rotate-half halves interleaved.

    (n_head * hd, ...) viewed as (n_head, 2, hd/2, ...), axes 1 and 2 swapped: as convert_hf_to_gguf.py's
    `LlamaModel.permute` (n_head is the kv head count for k).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute` (transformers' `_reverse_permute_weights`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
