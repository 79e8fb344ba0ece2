"""Prompt templates as plain data: each renders text, split into segments that say which parts are scored.

A `Segment` list is what the dataset builders tokenise: `"".join(s.text for s in segments)` is the rendered
text, and `s.scored` says whether the model is trained to produce that part (assistant turns, responses).

Formats (checked in tests against the published templates):
- Alpaca: tatsu-lab/stanford_alpaca `PROMPT_DICT` (prompt ends with "### Response:", output follows directly).
- ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; generation prompt `<|im_start|>assistant\\n`.
- Llama 3 chat: `<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`
  per message; generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.

A checkpoint's own Jinja chat template (`tokenizer.chat_template`) is used through `TokenizerChatTemplate`;
which template a loader uses is decided by `resolve_template`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `scored` pieces get labels, the rest get -100."""

    text: str
    scored: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    """A turn-based chat format.

    Each message renders as `bos_text` (first message only) + `header.format(role=...)` + content +
    `end_of_turn` + `separator`. For assistant turns the content and `end_of_turn` are scored (the model must
    learn to stop), the header and separator are not.

    Attributes:
        name: for messages.
        header: text before the content, with a `{role}` field.
        end_of_turn: text closing a turn (its token is what generation stops on).
        separator: unscored text after `end_of_turn`.
        bos_text: text before the first message (the BOS token written out, as the published template does).
        strip_content: strip whitespace around each content (Llama 3's `| trim`).
    """

    name: str
    header: str
    end_of_turn: str
    separator: str = ""
    bos_text: str = ""
    strip_content: bool = False

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation as segments (see the class docstring for what is scored).

        Raises:
            ValueError: a message that is not a dict with a known `role` and a string `content`.
        """
        out = [Segment(self.bos_text)] if self.bos_text else []
        for i, message in enumerate(messages):
            role, content = check_message(message, i)
            content = content.strip() if self.strip_content else content
            scored = role == "assistant"
            out += [Segment(self.header.format(role=role)), Segment(content + self.end_of_turn, scored)]
            if self.separator:
                out.append(Segment(self.separator))
        if add_generation_prompt:
            out.append(Segment(self.header.format(role="assistant")))
        return [s for s in out if s.text]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as one string."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))


def check_message(message, index: int) -> tuple[str, str]:
    """(role, content) of a chat message; ValueError naming the message index otherwise."""
    if not isinstance(message, dict):
        raise ValueError(f"message {index} should be an object, got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"message {index} has no {key!r} (keys: {sorted(message)})")
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
        raise ValueError(f"message {index} should have a string 'role', got {type(role).__name__} {role!r}")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; roles: {ROLES}")
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({role}) should have a string 'content', got {type(content).__name__}")
    return role, content


CHATML = ChatTemplate("chatml", header="<|im_start|>{role}\n", end_of_turn="<|im_end|>", separator="\n")
LLAMA3 = ChatTemplate("llama3", header="<|start_header_id|>{role}<|end_header_id|>\n\n", end_of_turn="<|eot_id|>",
                      bos_text="<|begin_of_text|>", strip_content=True)


@dataclass(frozen=True)
class InstructionTemplate:
    """A single-turn instruction format: a prompt (two variants, with or without an input) and a response.

    Attributes:
        name: for messages.
        prompt_input: prompt with `{instruction}` and `{input}` fields.
        prompt_no_input: prompt with `{instruction}` only, used when the input is empty or absent.
    """

    name: str
    prompt_input: str
    prompt_no_input: str

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text the model sees before its response."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def segments(self, instruction: str, input: str = "", output: str | None = None) -> list[Segment]:
        """[prompt (unscored), output (scored)]; just the prompt when `output` is None (for generation)."""
        out = [Segment(self.prompt(instruction, input))]
        return out + [Segment(output, True)] if output is not None else out

    def render(self, instruction: str, input: str = "", output: str = "") -> str:
        return self.prompt(instruction, input) + output


# Verbatim from github.com/tatsu-lab/stanford_alpaca train.py PROMPT_DICT.
ALPACA = InstructionTemplate(
    "alpaca",
    prompt_input=("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"),
    prompt_no_input=("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"),
)

TEMPLATES: dict[str, ChatTemplate | InstructionTemplate] = {"alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3}


def get_template(template) -> ChatTemplate | InstructionTemplate:
    """A template object from a name in `TEMPLATES` or a template object itself.

    Raises:
        ValueError: an unknown name or a value of another type.
    """
    if isinstance(template, (ChatTemplate, InstructionTemplate)):
        return template
    if isinstance(template, str) and template in TEMPLATES:
        return TEMPLATES[template]
    raise ValueError(f"unknown template {template!r}; built-in templates: {sorted(TEMPLATES)}, {USE_TOKENIZER!r} "
                     "(the tokenizer's chat template), or pass a ChatTemplate / InstructionTemplate")


USE_TOKENIZER = "tokenizer"  # the `template` value that asks for the tokenizer's own chat template


@dataclass(frozen=True)
class TokenizerChatTemplate:
    """The tokenizer's Jinja chat template (`tokenizer.apply_chat_template`), split into segments so that
    exactly the assistant turns are scored.

    Each assistant message i is located by rendering prefixes: the text of `messages[:i]` with the generation
    prompt ends where its turn starts, the text of `messages[:i + 1]` (less trailing whitespace, e.g. ChatML's
    newline after <|im_end|>) ends where it stops. Its content and end-of-turn token are scored; everything
    the template writes around them is not.

    Attributes:
        tokenizer: any object with `chat_template` and `apply_chat_template(messages, add_generation_prompt=,
            tokenize=False, **kwargs)` (tinytune's `Tokenizer`, or a transformers tokenizer).
        kwargs: extra template variables (e.g. `{"date_string": "26 Jul 2024"}` for Llama 3.1).
    """

    tokenizer: object
    kwargs: dict = field(default_factory=dict)
    name: str = "tokenizer"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template renders it."""
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **self.kwargs)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as segments, assistant turns scored (class docstring).

        Raises:
            ValueError: the first message is an assistant turn, or the template is not prefix-stable (what it
                renders for the first i messages is not how the whole conversation starts), naming the index.
        """
        full = self.render(messages, add_generation_prompt)
        out, pos = [], 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            if i == 0:
                raise ValueError("message 0 is an assistant turn: with a chat template the conversation must "
                                 "start with a system or user message")
            start, end = self.render(messages[:i], True), self.render(messages[:i + 1])
            if not (end.startswith(start) and full.startswith(end) and len(start) >= pos):
                raise ValueError(f"the chat template is not prefix-stable at message {i}: rendering the first "
                                 f"{i} messages (with the generation prompt) and the first {i + 1} does not give "
                                 "the start of the whole conversation, so the assistant turn cannot be located")
            stop = max(len(end.rstrip()), len(start))
            out += [Segment(full[pos:len(start)]), Segment(full[len(start):stop], True)]
            pos = stop
        out.append(Segment(full[pos:]))
        return [s for s in out if s.text]


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` carries a Jinja chat template (a non-empty `chat_template` string)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(template) and hasattr(tokenizer, "apply_chat_template")


def resolve_template(template, tokenizer, default):
    """The template a loader uses, by one rule:

    - None: the tokenizer's own chat template when it has one (a `TokenizerChatTemplate`), else `default`;
    - "tokenizer": the tokenizer's chat template, which must exist;
    - a built-in name or a template object: that template, even when the tokenizer has its own.

    Args:
        template: None, "tokenizer", a name in `TEMPLATES` or a template object.
        tokenizer: the loader's tokenizer.
        default: a built-in name, or None for no template.
    Raises:
        ValueError: "tokenizer" with a tokenizer without a chat template; an unknown name.
    """
    if isinstance(template, TokenizerChatTemplate):
        return template
    if template == USE_TOKENIZER or (template is None and has_chat_template(tokenizer)):
        if not has_chat_template(tokenizer):
            raise ValueError(f"template={USE_TOKENIZER!r} needs a tokenizer with a chat template "
                             "(tokenizer.chat_template is not set)")
        return TokenizerChatTemplate(tokenizer)
    if template is None:
        return None if default is None else get_template(default)
    return get_template(template)
