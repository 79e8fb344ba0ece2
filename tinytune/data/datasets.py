"""Causal-LM datasets from JSONL: plain text (continued pre-training), input/output pairs, instructions with a
template, and multi-turn chats. Each loader returns `Examples`, a list of `{"input_ids", "labels"}` dicts
(labels aligned with input_ids, -100 = not scored; the loss shifts them, as Hugging Face models do).

Templates (instructions and chats): `template=None`, the default, uses the tokenizer's own chat template when
it has one (`tokenizer.chat_template`, as the checkpoint ships it) and the built-in default otherwise ("alpaca"
for instructions, "chatml" for chats); a built-in name or template object is used as given, even when the
tokenizer has a chat template; "tokenizer" demands the chat template (`templates.resolve_template`). With the
chat template the ids are exactly transformers' `apply_chat_template(messages)` (the template writes BOS; no
BOS is added unless `add_bos=True`) and only the assistant turns are scored.

Bad records (see `records.build_examples`) raise `ValueError("file:line: reason")` with on_error="raise" (the
default) or are skipped and listed in `.bad_records` with on_error="skip". A sequence longer than `max_length`
is a bad record unless `truncate=True`, which cuts it on the right.
"""
from __future__ import annotations

from .encoding import encode_segments, fit_length
from .records import Examples, RecordError, build_examples, list_field, text_field
from .templates import (ChatTemplate, InstructionTemplate, Segment, TokenizerChatTemplate, check_message,
                        resolve_template)


def load_text(path, tokenizer, max_length: int, *, field: str = "text", on_error: str = "raise",
              add_bos: bool | None = None, drop_remainder: bool = False) -> Examples:
    """Plain text for continued pre-training: every token scored, documents packed into rows.

    Each record's text is encoded (BOS first when the tokenizer adds it, or `add_bos`), followed by EOS; the
    documents are joined into one stream cut into rows of exactly `max_length` tokens. A document may span two
    rows, so length is never an error here. Attention may cross documents inside a row, as in GPT-style
    pre-training: the EOS between them marks the boundary.

    Args:
        path: JSONL with records `{field: "some text"}`.
        tokenizer: `encode(text, add_special_tokens=...)`, `bos_token_id`, `eos_token_id`.
        max_length: tokens per row.
        field: the text field's name.
        on_error: "raise" or "skip" (see the module docstring).
        add_bos: prepend BOS to each document; None: as the tokenizer does by default.
        drop_remainder: drop the last, shorter row instead of keeping it (the collator pads it).
    Returns:
        `Examples` of `{"input_ids", "labels"}` with labels == input_ids.
    Raises:
        ValueError: a bad record with on_error="raise"; max_length < 1; a tokenizer without eos_token_id.
    """
    _check_max_length(max_length, required=True)

    def build(record: dict) -> dict:
        ids, _ = encode_segments(tokenizer, [Segment(text_field(record, field))], add_bos, add_eos=True)
        return {"input_ids": ids}

    docs = build_examples(path, build, on_error)
    stream = [token for doc in docs for token in doc["input_ids"]]
    rows = [stream[start:start + max_length] for start in range(0, len(stream), max_length)]
    if drop_remainder and rows and len(rows[-1]) < max_length:
        rows.pop()
    return Examples([{"input_ids": row, "labels": list(row)} for row in rows], docs.bad_records)


def load_pairs(path, tokenizer, *, max_length: int | None = None, truncate: bool = False,
               input_field: str = "input", output_field: str = "output", separator: str = "",
               on_error: str = "raise", add_bos: bool | None = None, add_eos: bool = True) -> Examples:
    """Input/output pairs for a causal LM: the text is input + separator + output, and only the output
    tokens (and the EOS after them) are scored.

    Args:
        path: JSONL with records `{input_field: ..., output_field: ...}`, both non-empty strings.
        tokenizer: see `load_text`.
        max_length: longest allowed example in tokens (None: no limit).
        truncate: cut longer examples instead of reporting them as bad records.
        input_field, output_field: field names.
        separator: unscored text between input and output (e.g. "\\n").
        on_error: "raise" or "skip".
        add_bos: see `encode_segments`; add_eos: append a scored EOS.
    Returns:
        `Examples` of `{"input_ids", "labels"}`.
    Raises:
        ValueError: a bad record with on_error="raise".
    """
    _check_max_length(max_length)

    def build(record: dict) -> dict:
        prompt = text_field(record, input_field) + separator
        segments = [Segment(prompt), Segment(text_field(record, output_field), True)]
        return _example(tokenizer, segments, add_bos, add_eos, max_length, truncate)

    return build_examples(path, build, on_error)


def load_instructions(path, tokenizer, template=None, *, max_length: int | None = None,
                      truncate: bool = False, on_error: str = "raise", instruction_field: str = "instruction",
                      input_field: str = "input", output_field: str = "output", system_field: str = "system",
                      add_bos: bool | None = None) -> Examples:
    """Instruction tuning: records `{"instruction", "input" (optional, may be empty), "output"}` rendered
    with a template, loss on the response only.

    With an `InstructionTemplate` (Alpaca) the prompt is unscored and output + EOS are scored. With a chat
    template (the tokenizer's, ChatML, Llama 3) the record becomes messages [system (when the record has a
    non-empty `system_field`), user (instruction, then a blank line and the input when there is one),
    assistant (output)], scored as in `load_chats`.

    Args:
        path: the JSONL file.
        tokenizer: see `load_text`.
        template: None (the tokenizer's chat template, else "alpaca": see the module docstring), "tokenizer",
            "alpaca", "chatml", "llama3" or a template object.
        max_length, truncate, on_error, add_bos: see `load_pairs`.
        instruction_field, input_field, output_field, system_field: field names (a system field with an
            `InstructionTemplate` is a bad record: Alpaca has no place for it).
    Returns:
        `Examples` of `{"input_ids", "labels"}`.
    Raises:
        ValueError: an unknown template; a bad record with on_error="raise".
    """
    _check_max_length(max_length)
    template = resolve_template(template, tokenizer, "alpaca")
    bos = _chat_bos(template, add_bos)

    def build(record: dict) -> dict:
        instruction = text_field(record, instruction_field)
        extra = text_field(record, input_field, allow_empty=True) if record.get(input_field) is not None else ""
        output = text_field(record, output_field)
        system = text_field(record, system_field, allow_empty=True) if record.get(system_field) is not None else ""
        if isinstance(template, InstructionTemplate):
            if system:
                raise RecordError(f"field {system_field!r} is set, but the {template.name!r} template has no "
                                  "system prompt; use a chat template")
            return _example(tokenizer, template.segments(instruction, extra, output), bos, True, max_length, truncate)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        # end_of_turn is the stop token: no EOS added
        return _example(tokenizer, _template_segments(template, messages), bos, False, max_length, truncate)

    return build_examples(path, build, on_error)


def load_chats(path, tokenizer, template=None, *, max_length: int | None = None, truncate: bool = False,
               on_error: str = "raise", field: str = "messages", add_bos: bool | None = None) -> Examples:
    """Multi-turn chats `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`, loss on
    assistant turns only: each assistant content and its end-of-turn token are scored; system and user turns
    and the role headers are not.

    Args:
        path: the JSONL file.
        tokenizer: see `load_text`.
        template: None (the tokenizer's chat template, else "chatml": see the module docstring), "tokenizer",
            "chatml", "llama3" or a `ChatTemplate`.
        max_length, truncate, on_error, add_bos: see `load_pairs`.
        field: the messages field's name.
    Returns:
        `Examples` of `{"input_ids", "labels"}`.
    Raises:
        ValueError: a template that is not a chat template; a bad record (a message without a known role or
            with empty content, no assistant turn, too long, a chat template that is not prefix-stable) with
            on_error="raise".
    """
    _check_max_length(max_length)
    template = resolve_template(template, tokenizer, "chatml")
    bos = _chat_bos(template, add_bos)
    if not isinstance(template, (ChatTemplate, TokenizerChatTemplate)):
        raise ValueError(f"load_chats needs a chat template (chatml, llama3 or a ChatTemplate), got {template.name!r}")

    def build(record: dict) -> dict:
        messages = list_field(record, field)
        for i, message in enumerate(messages):
            try:
                role, content = check_message(message, i)
            except ValueError as err:
                raise RecordError(str(err)) from None
            if not content.strip():
                raise RecordError(f"message {i} ({role}) has empty content")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("no assistant message: nothing to train on")
        return _example(tokenizer, _template_segments(template, messages), bos, False, max_length, truncate)

    return build_examples(path, build, on_error)


def chat_prompt_ids(tokenizer, messages, template=None) -> list[int]:
    """Token ids of a generation prompt: a chat (a list of messages) or a plain prompt (a str), rendered so
    that the model's reply follows.

    Templates, by `resolve_template`'s rule: with the tokenizer's chat template (template=None when it has
    one, or "tokenizer") the ids are `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`, a
    plain prompt being one user message. Without one: a chat uses "chatml"; a plain prompt is used as is. An
    explicit built-in template is used as given: a `ChatTemplate` makes a plain prompt a user turn, an
    `InstructionTemplate` (e.g. "alpaca") wraps it as the instruction. Built-in templates add BOS as the
    tokenizer does by default; the chat template writes its own.

    Raises:
        ValueError: bad messages; an `InstructionTemplate` for a chat; an error raised by the chat template.
    """
    is_chat = not isinstance(messages, str)
    template = resolve_template(template, tokenizer, "chatml" if is_chat else None)
    if is_chat:
        for i, message in enumerate(messages):
            check_message(message, i)
    elif not isinstance(template, InstructionTemplate) and template is not None:
        messages = [{"role": "user", "content": messages}]
    if isinstance(template, TokenizerChatTemplate):
        return tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False)
    if isinstance(template, ChatTemplate):
        segments = template.segments(messages, add_generation_prompt=True)
    elif isinstance(template, InstructionTemplate):
        if is_chat:
            raise ValueError(f"a chat (a list of messages) needs a chat template, got {template.name!r}")
        segments = [Segment(template.prompt(messages))]
    else:
        segments = [Segment(messages)]
    return encode_segments(tokenizer, segments)[0]


def _chat_bos(template, add_bos: bool | None) -> bool | None:
    """`add_bos` for `encode_segments`: with the tokenizer's chat template, None means none added (the
    template writes BOS itself, and transformers encodes its text without special tokens)."""
    return False if add_bos is None and isinstance(template, TokenizerChatTemplate) else add_bos


def _template_segments(template, messages: list[dict]) -> list[Segment]:
    """`template.segments(messages)`; a template error (e.g. not prefix-stable) is a bad record."""
    try:
        return template.segments(messages)
    except ValueError as err:
        raise RecordError(str(err)) from None


def _example(tokenizer, segments, add_bos, add_eos, max_length, truncate) -> dict:
    ids, labels = encode_segments(tokenizer, segments, add_bos, add_eos)
    return fit_length({"input_ids": ids, "labels": labels}, max_length, truncate)


def _check_max_length(max_length, required: bool = False) -> None:
    if max_length is None and not required:
        return
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive int{'' if required else ' or None'}, got {max_length!r}")
