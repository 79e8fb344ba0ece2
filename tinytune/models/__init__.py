"""Decoder-only language models: one decoder for the Llama family and GPT-2, HF checkpoints in
and out, a tokenizer, and generation."""
from .config import ModelConfig
from .generate import generate
from .heads import SequenceClassifier, TokenClassifier, hidden_states
from .gguf_write import save_gguf
from .hf import load_model, load_pretrained, merged_state_dict, save_pretrained
from .layers import KVCache
from .loss import IGNORE_INDEX, causal_lm_loss, causal_lm_loss_from_hidden, classification_loss, token_classification_loss
from .outputs import CausalLMOutput, ModelOutput, SequenceClassifierOutput, TokenClassifierOutput
from .presets import PRESETS, build, preset_config
from .tokenizer import Tokenizer, load_tokenizer
from .transformer import CausalLM

__all__ = [
    "CausalLM", "KVCache", "generate", "ModelConfig", "PRESETS", "build", "load_model", "load_pretrained",
    "merged_state_dict", "preset_config", "save_gguf", "save_pretrained", "Tokenizer", "load_tokenizer",
    "SequenceClassifier", "TokenClassifier", "hidden_states",
    "CausalLMOutput", "ModelOutput", "SequenceClassifierOutput", "TokenClassifierOutput",
    "IGNORE_INDEX", "causal_lm_loss", "causal_lm_loss_from_hidden", "classification_loss", "token_classification_loss",
]
