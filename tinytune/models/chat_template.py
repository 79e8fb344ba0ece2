"""Chat templates as Hugging Face checkpoints ship them (Jinja text), read, written and rendered exactly as
`transformers` 5 does (`transformers/utils/chat_template_utils.py`), for `tinytune.models.Tokenizer`.

Where a checkpoint keeps its templates (transformers' precedence):
  1. `chat_template.jinja` (the "default" template) and `additional_chat_templates/<name>.jinja`; when any of
     these files exists, tokenizer_config.json's `chat_template` is ignored;
  2. else tokenizer_config.json's `chat_template`: a string (the "default" template) or a list of
     `{"name": ..., "template": ...}`.
Saving: a single (default) template goes to chat_template.jinja and not into tokenizer_config.json, as
`save_pretrained` in transformers 5 does. Several named templates go into tokenizer_config.json as the
`[{"name", "template"}]` list (transformers' other save format, which it still reads), because a tinytune
save is a transaction of plain files and transformers' additional_chat_templates/ is a folder.

Rendering: a sandboxed (immutable) Jinja environment with trim_blocks, lstrip_blocks and loop controls, a
`tojson` that does not escape HTML and keeps non-ASCII, `raise_exception(msg)`, `strftime_now(fmt)`, and
transformers' restricted `dict` and `namespace`; `{% generation %}` blocks (TRL's training templates) render
their body. jinja2 is imported on first use only.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .._files import contained_file

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT = "default"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_chat_templates(directory: Path, config: dict, config_file: Path) -> dict[str, tuple[str, str]]:
    """{name: (template text, where it came from)} of a tokenizer directory (precedence: module docstring).

    Raises:
        ValueError: a template file that is not UTF-8 text, or a `chat_template` entry of the wrong shape.
    """
    found = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        found[DEFAULT] = _read_text(directory, CHAT_TEMPLATE_FILE)
    extra = directory / CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.name.removesuffix(".jinja")] = _read_text(directory, f"{CHAT_TEMPLATE_DIR}/{file.name}")
    if found:
        return found
    entry, where = config.get("chat_template"), f"{config_file} 'chat_template'"
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {DEFAULT: (entry, where)}
    if isinstance(entry, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in entry):
        return {t["name"]: (t["template"], f"{where} (name {t['name']!r})") for t in entry}
    raise ValueError(f"{where} should be a string or a list of {{'name': str, 'template': str}}, got {entry!r:.200}")


def _read_text(directory: Path, name: str) -> tuple[str, str]:
    path = contained_file(directory, name, "tokenizer")
    try:
        return Path(path).read_text(encoding="utf-8"), str(directory / name)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"could not read chat template {directory / name}: {err}") from err


def write_chat_templates(directory: Path, templates: dict[str, str]) -> list[dict] | None:
    """Write a lone default template to `directory`/chat_template.jinja; return the tokenizer_config.json
    `chat_template` entry for several named templates (None otherwise). See the module docstring."""
    if set(templates) == {DEFAULT}:
        (directory / CHAT_TEMPLATE_FILE).write_text(templates[DEFAULT], encoding="utf-8")
        return None
    return [{"name": name, "template": text} for name, text in templates.items()] or None


def set_default(templates: dict[str, str], value: str | None) -> None:
    """Set (or, with None, remove) the "default" entry of `templates`.

    Raises:
        TypeError: `value` is neither a str nor None.
    """
    if value is not None and not isinstance(value, str):
        raise TypeError(f"chat_template must be a str (Jinja text) or None, got {type(value).__name__}")
    if value is None:
        templates.pop(DEFAULT, None)
    else:
        templates[DEFAULT] = value


def pick_template(templates: dict[str, str], recorded: dict[str, tuple[str, str]], chat_template: str | None,
                  tools) -> tuple[str, str]:
    """(Jinja text, its source for messages) of the template to use, chosen as transformers'
    `get_chat_template`: `chat_template` as a name in `templates` or as Jinja text; None: "tool_use" when
    `tools` are given and it exists, else "default". `recorded` maps names to (text as read, file).

    Raises:
        ValueError: no template to use.
    """
    if chat_template is not None and chat_template not in templates:
        return chat_template, "the chat_template argument"
    name = chat_template or ("tool_use" if tools is not None and "tool_use" in templates else DEFAULT)
    if name not in templates:
        named = f" (named templates: {sorted(templates)}; pass chat_template=NAME)" if templates else ""
        raise ValueError(f"this tokenizer has no default chat template{named}; set tokenizer.chat_template "
                         "or pass chat_template=")
    text, (read, source) = templates[name], recorded.get(name, (None, None))
    return text, source if read == text else f"tokenizer.chat_templates[{name!r}]"


def render(template: str, source: str, messages, *, add_generation_prompt: bool = False, tools=None,
           documents=None, variables: dict | None = None) -> str:
    """The text `transformers`' `apply_chat_template(..., tokenize=False)` renders for one conversation.

    Args:
        template: the Jinja text; source: where it came from, for error messages.
        messages: a list of message dicts (keys whose value is None are dropped, as transformers does).
        add_generation_prompt, tools, documents: passed to the template; tools must be JSON schemas (dicts).
        variables: further template variables (special tokens, then the caller's keyword arguments).
    Raises:
        ValueError: no messages; the template does not compile, or raises while rendering (`raise_exception`, an
            undefined attribute, ...): the message names `source`.
        TypeError: messages, tools or documents of the wrong type.
    """
    import jinja2

    messages = _check_messages(messages)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise TypeError("tools must be a list of JSON-schema dicts (transformers.utils.get_json_schema(fn) "
                        "converts a Python function)")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **_plain(variables or {}))
    except jinja2.TemplateError as err:
        where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise ValueError(f"chat template from {source}{where}: {err}") from err


def _check_messages(messages) -> list[dict]:
    """Plain copies of the messages, None values dropped and reasoning aliased, as transformers does."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation; give at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} should be a dict, got {type(message).__name__}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value):
    """`value` rebuilt from plain JSON types (what the sandbox may see); anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, bool, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=32)
def _compile(template: str):
    return _environment().from_string(template)


@lru_cache(maxsize=1)
def _environment():
    """The Jinja environment transformers renders chat templates in (module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # dict(...) without attribute access to the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore-prefixed attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    class Generation(jinja2.ext.Extension):  # `{% generation %}...{% endgeneration %}` renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env
