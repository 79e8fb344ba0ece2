"""Prompts from JSONL for online RL (PPO, GRPO): `{"prompt": str | [chat messages], ...}`, one example per record.

Prompts are rendered exactly as `load_preferences` renders its prompts (the same helper): a text prompt as is,
wrapped as an instruction by an `InstructionTemplate` or as a user turn by a `ChatTemplate`; a chat prompt
through its chat template (the tokenizer's own when it has one, else "chatml") with the generation prompt, so the model's reply follows.

Example layout:
    prompt_ids: list[int], the rendered prompt tokenized (BOS when the tokenizer adds it), what
                `tt.rlhf.generate_rollouts` samples completions after.
    prompt:     the record's "prompt" as given (text or messages), for reward functions that read it.
    every other field of the record, as is: e.g. "answer", the reference a verifiable reward compares with.
"""
from __future__ import annotations

from .preferences import _prompt_segments, encode_prompt
from .records import Examples, RecordError, build_examples, check_on_error
from .templates import resolve_template

RESERVED = ("prompt_ids",)  # example keys the loader writes; a record may not bring its own


def load_prompts(path, tokenizer, template=None, max_length: int | None = None,
                 on_error: str = "raise") -> Examples:
    """Prompts from JSONL, one example per record (see the module docstring).

    Records: `{"prompt": str}` or `{"prompt": [{"role", "content"}, ...]}` (the last message not an assistant
    turn), with any other fields (e.g. `"answer"`) kept as they are in the example.

    Templates: `template=None` uses none for text prompts and, for chat prompts, the tokenizer's own chat
    template when it has one (else "chatml"); "tokenizer" insists on the tokenizer's template; an
    `InstructionTemplate` (e.g. "alpaca") wraps a text prompt as the instruction; a `ChatTemplate` makes a text
    prompt a user turn. Chat prompts need a chat template.

    Length: a record whose prompt is longer than `max_length` tokens is a bad record, never truncated (cutting
    a prompt can drop the question the reward is about).

    Args:
        path: the JSONL file.
        tokenizer: `encode(text, add_special_tokens=...)`, `bos_token_id`.
        template: None, "tokenizer", a name in `TEMPLATES` or a template object.
        max_length: longest allowed prompt in tokens (None: no limit).
        on_error: "raise": the first bad record raises ValueError("path:line: reason"); "skip": bad records
            are left out and listed in `.bad_records`.
    Returns:
        `Examples` of `{"prompt_ids", "prompt", **other fields}`.
    Raises:
        ValueError: a bad record with on_error="raise" (no or an ill-typed or empty prompt, bad chat messages,
            a reserved field, too long); a bad `template`, `max_length` or `on_error`.
    """
    check_on_error(on_error)
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    template = resolve_template(template, tokenizer, None) if template is not None else None

    def build(record: dict) -> dict:
        reserved = [name for name in RESERVED if name in record]
        if reserved:
            raise RecordError(f"field {reserved[0]!r} is reserved (the loader writes it from 'prompt')")
        segments, used, _ = _prompt_segments(record, template, tokenizer)
        prompt_ids = encode_prompt(tokenizer, segments, used)
        if max_length is not None and len(prompt_ids) > max_length:
            raise RecordError(f"prompt is {len(prompt_ids)} tokens, more than max_length={max_length} "
                              "(prompts are not truncated)")
        return {**record, "prompt_ids": prompt_ids, "prompt": record["prompt"]}

    return build_examples(path, build, on_error)
