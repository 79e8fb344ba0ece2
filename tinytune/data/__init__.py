"""Data for fine-tuning: JSONL loaders (text, pairs, instructions, chats, classification, NER, preferences) with
bad-record reports, prompt templates, batching (padding, length grouping, packing with per-example masks) and
metrics."""
from .collate import Collator, LengthGroupedSampler, pack_examples, pad_batch, segment_mask
from .datasets import chat_prompt_ids, load_chats, load_instructions, load_pairs, load_text
from .encoding import IGNORE, encode_segments
from .metrics import EntityScores, accuracy, bio_spans, entity_scores, macro_f1, word_predictions
from .preferences import load_preferences, preference_sequences
from .prompts import load_prompts
from .records import BadRecord, Examples, RecordError, build_examples
from .tasks import discover_labels, load_classification, load_ner
from .templates import (ALPACA, CHATML, LLAMA3, TEMPLATES, ChatTemplate, InstructionTemplate, Segment,
                        TokenizerChatTemplate, get_template, has_chat_template, resolve_template)

__all__ = [
    "ALPACA", "BadRecord", "CHATML", "ChatTemplate", "Collator", "EntityScores", "Examples", "IGNORE",
    "InstructionTemplate", "LLAMA3", "LengthGroupedSampler", "RecordError", "Segment", "TEMPLATES",
    "TokenizerChatTemplate", "accuracy", "bio_spans", "build_examples", "chat_prompt_ids", "discover_labels",
    "encode_segments", "entity_scores", "get_template", "has_chat_template", "load_chats", "load_classification",
    "load_instructions", "load_ner", "load_pairs", "load_preferences", "load_prompts", "load_text", "macro_f1",
    "pack_examples", "pad_batch", "preference_sequences", "resolve_template", "segment_mask", "word_predictions",
]
