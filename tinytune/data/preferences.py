"""Preference data from JSONL for reward models and DPO: pairs `{"prompt", "chosen", "rejected"[, "margin"]}`
and rankings `{"prompt", "ranked": [best, ..., worst]}`, with text or chat prompts.

One example per record (one prompt group), so that a K-way ranking is one example of the loss, as in
InstructGPT (Ouyang et al., 2022, sec. 3.5: shuffling the K(K-1)/2 pairs of one ranking apart makes the
reward model over-fit after one pass). Each distinct completion is stored once and the pairs are indices
into them: the K completions are scored with K forward passes, not K(K-1).

Example layout:
    prompt_ids:     list[int], the prompt tokenized once (BOS, template, generation header), shared by every
                    sequence of the group.
    completion_ids: list[list[int]], the K distinct completions, best first ([chosen, rejected] for a pair
                    record), each tokenized on its own (as a model generates it after the prompt) and ending
                    with the stop token: EOS for text prompts, the template's end-of-turn for chat prompts.
    chosen, rejected: list[int], P = K(K-1)/2 index pairs into completion_ids: completion chosen[p] is
                    preferred over rejected[p]; for a ranking (0, 1), (0, 2), ..., (K-2, K-1).
    margin:         list[float | None], P entries: the record's "margin" for a pair, None otherwise.
    group:          int, the example's index in the result (kept when pairs are flattened and shuffled).

`preference_sequences(example)` gives the K scored sequences `{"input_ids": prompt + completion, "labels":
-100 on the prompt}`, ready for `pad_batch`: a reward model reads the score at each row's last non-pad token
(the stop token), DPO sums the log-probs where labels != -100.
"""
from __future__ import annotations

import math

from .encoding import IGNORE, encode_segments
from .records import Examples, RecordError, build_examples, check_on_error, list_field, text_field
from .templates import (ChatTemplate, InstructionTemplate, Segment, TokenizerChatTemplate, check_message, get_template,
                        has_chat_template, resolve_template)

PAIR_FIELDS = ("chosen", "rejected")


def load_preferences(path, tokenizer, template=None, max_length: int | None = None,
                     on_error: str = "raise") -> Examples:
    """Preference pairs and rankings from JSONL, one example per record (see the module docstring).

    Records: `{"prompt", "chosen", "rejected"}` with an optional non-negative finite number `"margin"` (the
    reward gap to enforce, as in Llama 2's reward loss), or `{"prompt", "ranked": [best, ..., worst]}` with
    K >= 2 distinct completions. A prompt is a string or a list of chat messages (`{"role", "content"}`, the
    last one not an assistant turn); a completion is a string or a one-message list holding an assistant
    message (the conversational form). Other fields are ignored.

    Templates: `template=None` uses none for text prompts (the completion follows the prompt text directly)
    and, for chat prompts, the tokenizer's own chat template when it has one (else "chatml"); "tokenizer"
    insists on the tokenizer's template. An `InstructionTemplate` (e.g. "alpaca") wraps a text prompt as the
    instruction; a `ChatTemplate` makes a text prompt a user turn. Chat prompts need a chat template.

    Length: a record whose prompt + longest completion exceeds `max_length` is a bad record, never truncated:
    cutting the completion would drop its stop token (where the reward is read) and cutting the prompt from the
    left can drop the question the preference is about. Filter or shorten such records upstream.

    Args:
        path: the JSONL file.
        tokenizer: `encode(text, add_special_tokens=...)`, `bos_token_id`, `eos_token_id` (without an EOS,
            text-prompt completions end with their last token).
        template: None, "tokenizer", a name in `TEMPLATES` or a template object.
        max_length: longest allowed prompt + completion in tokens (None: no limit).
        on_error: "raise": the first bad record raises ValueError("path:line: reason"); "skip": bad records
            are left out and listed in `.bad_records`.
    Returns:
        `Examples` of preference examples.
    Raises:
        ValueError: a bad record with on_error="raise" (missing or ill-typed fields, both forms at once, an
            empty prompt or completion, a tie, a ranking of fewer than 2, a bad margin, too long); a bad
            `template`, `max_length` or `on_error`.
    """
    check_on_error(on_error)
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    template = resolve_template(template, tokenizer, None) if template is not None else None
    groups = [0]

    def build(record: dict) -> dict:
        prompt_ids, completion_ids, names, margin = _encode_record(record, tokenizer, template)
        _check_length(prompt_ids, completion_ids, names, max_length)
        pairs = [(i, j) for i in range(len(completion_ids)) for j in range(i + 1, len(completion_ids))]
        example = {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                   "chosen": [i for i, _ in pairs], "rejected": [j for _, j in pairs],
                   "margin": [margin] * len(pairs), "group": groups[0]}
        groups[0] += 1
        return example

    return build_examples(path, build, on_error)


def preference_sequences(example: dict) -> list[dict]:
    """The K scored sequences of one preference example, in `completion_ids` order.

    Returns:
        `[{"input_ids": prompt_ids + completion, "labels": -100 on the prompt, the completion's ids on it}]`.
    """
    prompt = example["prompt_ids"]
    return [{"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}
            for completion in example["completion_ids"]]


def _encode_record(record: dict, tokenizer, template) -> tuple[list[int], list[list[int]], list[str], float | None]:
    """(prompt ids, completion ids best first, their names for messages, margin) of one record; RecordError
    saying why it is bad."""
    texts, margin = _completion_texts(record)
    segments, template, messages = _prompt_segments(record, template, tokenizer)
    prompt_ids = encode_prompt(tokenizer, segments, template)
    completions = [_encode_completion(tokenizer, text, template, messages) for text in texts]
    ranked = "ranked" in record
    names = [f"ranked[{i}]" for i in range(len(texts))] if ranked else [f"{name!r}" for name in PAIR_FIELDS]
    _check_distinct(completions, names)
    return prompt_ids, completions, names, margin


def _prompt_segments(record: dict, template, tokenizer=None) -> tuple[list[Segment], object, list[dict] | None]:
    """The prompt rendered as segments (a chat one with the generation prompt), the template used, and the
    prompt as chat messages (None for a text prompt used as text).

    A chat prompt with `template=None` goes through the tokenizer's own chat template when it has one (as TRL
    applies it to conversational examples only), else through "chatml"; a text prompt stays text unless a
    template is given."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        if template is None:
            template = TokenizerChatTemplate(tokenizer) if has_chat_template(tokenizer) else get_template("chatml")
        if not isinstance(template, (ChatTemplate, TokenizerChatTemplate)):
            raise RecordError(f"field 'prompt' is a chat (a list of messages), which needs a chat template "
                              f"(chatml, llama3, the tokenizer's or a ChatTemplate), got {template.name!r}")
        messages = _check_messages(prompt)
        return _chat_segments(template, messages), template, messages
    if "prompt" in record and not isinstance(prompt, str):
        raise RecordError(f"field 'prompt' should be a string or a list of chat messages, got {type(prompt).__name__}")
    text = text_field(record, "prompt")
    if isinstance(template, InstructionTemplate):
        return [Segment(template.prompt(text))], template, None
    if isinstance(template, (ChatTemplate, TokenizerChatTemplate)):
        messages = [{"role": "user", "content": text}]
        return _chat_segments(template, messages), template, messages
    return [Segment(text)], template, None


def _chat_segments(template, messages: list[dict]) -> list[Segment]:
    if isinstance(template, TokenizerChatTemplate):  # a template error is a bad record, named
        try:
            return [Segment(template.render(messages, add_generation_prompt=True))]
        except ValueError as err:
            raise RecordError(str(err)) from None
    return template.segments(messages, add_generation_prompt=True)


def encode_prompt(tokenizer, segments: list[Segment], template) -> list[int]:
    """The prompt's ids: BOS as the tokenizer adds it, except with the tokenizer's chat template, which writes
    its own (transformers encodes the rendered text without special tokens)."""
    add_bos = False if isinstance(template, TokenizerChatTemplate) else None
    return encode_segments(tokenizer, segments, add_bos=add_bos)[0]


def _completion_texts(record: dict) -> tuple[list[str], float | None]:
    """The completion texts, best first, and the margin, from either record form."""
    has_pair = [name for name in PAIR_FIELDS if name in record]
    if "ranked" in record:
        if has_pair:
            raise RecordError(f"both 'ranked' and {' and '.join(map(repr, has_pair))}: a record is a pair "
                              "(chosen, rejected) or a ranking, not both")
        if record.get("margin") is not None:
            raise RecordError(f"field 'margin' ({record['margin']!r}) is for pairs only, not for a 'ranked' record")
        ranked = list_field(record, "ranked")
        if len(ranked) < 2:
            raise RecordError("field 'ranked' holds 1 completion: a ranking needs at least 2")
        return [_completion_text(value, f"ranked[{i}]") for i, value in enumerate(ranked)], None
    if not has_pair:
        raise RecordError(f"missing fields: need 'chosen' and 'rejected', or 'ranked' (fields: {sorted(record)})")
    texts = [_completion_text(record[name], f"field {name!r}") if name in record else text_field(record, name)
             for name in PAIR_FIELDS]
    return texts, _margin(record)


def _completion_text(value, where: str) -> str:
    """A completion given as a string or as `[{"role": "assistant", "content": ...}]`."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(f"{where} should be a string or one assistant message, got a list of {len(value)}")
        try:
            role, value = check_message(value[0], 0)
        except ValueError as err:
            raise RecordError(f"{where}: {err}") from None
        if role != "assistant":
            raise RecordError(f"{where} should be an assistant message, got role {role!r}")
    if not isinstance(value, str):
        raise RecordError(f"{where} should be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where} is empty")
    return value


def _margin(record: dict) -> float | None:
    """The optional margin: absent or null, or a finite number >= 0."""
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"field 'margin' should be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise RecordError(f"field 'margin' should be a finite number >= 0, got {value!r}")
    return float(value)


def _check_messages(messages: list) -> list:
    """Chat prompt messages: known roles, non-empty contents, not ending with an assistant turn."""
    if not messages:
        raise RecordError("field 'prompt' is an empty list of messages")
    for i, message in enumerate(messages):
        try:
            role, content = check_message(message, i)
        except ValueError as err:
            raise RecordError(f"field 'prompt': {err}") from None
        if not content.strip():
            raise RecordError(f"field 'prompt': message {i} ({role}) has empty content")
    if messages[-1]["role"] == "assistant":
        raise RecordError("field 'prompt' ends with an assistant message; the completions are the assistant's reply")
    return messages


def _encode_completion(tokenizer, text: str, template, messages: list[dict] | None) -> list[int]:
    """A completion's ids, encoded on its own, ending with the stop token (end-of-turn in a chat, else EOS).

    With the tokenizer's chat template the completion is what the template writes for an assistant turn
    after the prompt (content and end-of-turn; trailing whitespace is not part of it)."""
    if isinstance(template, TokenizerChatTemplate):
        start = template.render(messages, add_generation_prompt=True)
        full = template.render(messages + [{"role": "assistant", "content": text}])
        if not full.startswith(start):
            raise RecordError("the chat template is not prefix-stable: the prompt rendered with the generation "
                              "prompt is not how the prompt plus a reply starts, so the reply cannot be located")
        return tokenizer.encode(full[len(start):].rstrip(), add_special_tokens=False)
    if isinstance(template, ChatTemplate):
        text = (text.strip() if template.strip_content else text) + template.end_of_turn
        ids, _ = encode_segments(tokenizer, [Segment(text, True)], add_bos=False)
        return ids
    eos = getattr(tokenizer, "eos_token_id", None)
    ids, _ = encode_segments(tokenizer, [Segment(text, True)], add_bos=False, add_eos=eos is not None)
    return ids


def _check_distinct(completions: list[list[int]], names: list[str]) -> None:
    """RecordError on two completions with the same ids (compared as tokenized, so e.g. Llama 3's content
    strip counts): a tie says nothing about which is better."""
    first: dict[tuple, int] = {}
    for i, ids in enumerate(completions):
        j = first.setdefault(tuple(ids), i)
        if j != i:
            raise RecordError(f"{names[j]} and {names[i]} are the same completion (a tie: no preference)")


def _check_length(prompt_ids: list[int], completion_ids: list[list[int]], names: list[str],
                  max_length: int | None) -> None:
    """RecordError when prompt + the longest completion is over `max_length` (never truncated)."""
    if max_length is None:
        return
    longest = max(range(len(completion_ids)), key=lambda i: len(completion_ids[i]))
    total = len(prompt_ids) + len(completion_ids[longest])
    if total > max_length:
        raise RecordError(f"prompt ({len(prompt_ids)} tokens) + longest completion ({names[longest]}, "
                          f"{len(completion_ids[longest])} tokens) = {total} tokens, more than "
                          f"max_length={max_length} (preference records are not truncated)")
