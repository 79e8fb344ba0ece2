"""The `generate` subcommand: completions of a base (with an adapter) for prompts, plain or chat.

    tinytune generate CHECKPOINT --adapter runs/x/adapter --prompt "Reverse: abc" --max-new-tokens 16
    tinytune generate CHECKPOINT --chat conversation.json --template chatml
    tinytune generate CHECKPOINT --prompts prompts.jsonl --temperature 0.7 --top-p 0.9 --seed 1

Prompts are encoded by `tt.data.chat_prompt_ids`: with the tokenizer's own chat template (when it has one
and no --template is given) or a built-in chat --template, a plain --prompt is a user turn; without any chat
template a plain prompt is used as it is (BOS added as the tokenizer does) and a chat uses chatml; an
instruction --template (alpaca) wraps a plain prompt as the instruction. All prompts run as one batch,
left padded, through `tt.generate` (KV cache), stopping at the tokenizer's EOS ids and the template's
end-of-turn token; each completion (new tokens only, decoded) is printed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import _check
from .. import data as ttdata
from ..models import generate as tt_generate
from .options import TEMPLATES, CLIError
from .setup import check_device, load_model, seed_option, stop_token_ids


def _read_prompts_file(path: Path) -> list:
    """--prompts: one JSON object per line, {"prompt": text or [messages]} (or {"messages": [...]})."""
    if not path.is_file():
        raise CLIError(f"--prompts: {'not a file' if path.exists() else 'file not found'}: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise CLIError(f"--prompts {path}:{number}: not JSON ({err})") from None
        value = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
        if not (isinstance(value, str) and value) and not isinstance(value, list):
            raise CLIError(f"--prompts {path}:{number}: expected {{\"prompt\": text or [messages]}} or "
                           f"{{\"messages\": [...]}}, got {line[:80]!r}")
        prompts.append(value)
    if not prompts:
        raise CLIError(f"--prompts {path}: no prompts")
    return prompts


def _read_chat(path: Path) -> list:
    """--chat: a JSON file holding one conversation, a list of messages (or {"messages": [...]})."""
    if not path.is_file():
        raise CLIError(f"--chat: {'not a file' if path.exists() else 'file not found'}: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CLIError(f"--chat {path}: not JSON ({err})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise CLIError(f"--chat {path}: expected a list of messages [{{\"role\", \"content\"}}, ...] or "
                       "{\"messages\": [...]}")
    return [messages]


def prompt_list(opts: dict) -> list:
    """The prompts (each a string or a list of messages) of --prompt, --prompts or --chat (exactly one)."""
    given = [flag for flag, key in (("--prompt", "prompt"), ("--prompts", "prompts"), ("--chat", "chat"))
             if opts.get(key)]
    if len(given) != 1:
        raise CLIError(f"give exactly one of --prompt TEXT, --prompts FILE.jsonl or --chat FILE.json (got "
                       f"{' and '.join(given) if given else 'none'})")
    if opts.get("prompt"):
        return list(opts["prompt"])
    if opts.get("prompts"):
        return _read_prompts_file(Path(opts["prompts"]))
    return _read_chat(Path(opts["chat"]))


def encode_prompt(tokenizer, prompt, template: str | None, system: str | None) -> list[int]:
    """A prompt's ids by `tt.data.chat_prompt_ids` (a plain prompt becomes a user turn under a chat template;
    without any it is used as is); --system puts a system message first."""
    if system is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
            prompt = [{"role": "system", "content": system}] + messages
    try:
        return list(ttdata.chat_prompt_ids(tokenizer, prompt, template=template))
    except (ValueError, TypeError, KeyError) as err:
        raise CLIError(f"prompt {_short(prompt)}: {err}") from None


def _short(prompt) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _sampling(opts: dict) -> dict:
    try:
        return {"max_new_tokens": _check.integer(opts["max_new_tokens"], "--max-new-tokens", 1),
                "temperature": _check.number(opts["temperature"], "--temperature", 0),
                "top_k": _check.integer(opts["top_k"], "--top-k", 1, none=True),
                "top_p": _check.number(opts["top_p"], "--top-p", 0, 1, low_open=True)}
    except _check.FieldError as err:
        raise CLIError(str(err)) from None


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest), the rows right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def generate(opts: dict, out=print) -> list[str]:
    """`tinytune generate`: print each prompt's completion (decoded new tokens, up to the first stop token).

    With several prompts each completion is preceded by a `--- N ---` line; --json prints one JSON object
    per prompt ({"prompt", "completion"}). Returns the completions.
    """
    from .inference import HEADS, load_adapted
    sampling = _sampling(opts)
    seed = seed_option(opts["seed"]) if opts.get("seed") is not None else None
    check_device(opts["device"])
    template = opts.get("template")
    if template is not None and template not in TEMPLATES:
        raise CLIError(f"--template: unknown template {template!r}; choose from {list(TEMPLATES)}")
    prompts = prompt_list(opts)
    if opts.get("adapter"):
        run = load_adapted(opts["checkpoint"], opts["adapter"], opts.get("tokenizer"))
        if run.task in HEADS:
            raise CLIError(f"--adapter {opts['adapter']}: a --task {run.task} adapter (a classifier) does not "
                           "generate text; use tinytune eval")
        model, tokenizer = run.model, run.tokenizer
    else:
        model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    rows = [encode_prompt(tokenizer, p, template, opts.get("system")) for p in prompts]
    stops = stop_token_ids(tokenizer, template, any(isinstance(p, list) for p in prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    ids, mask = left_padded(rows, pad)
    model = model.to(opts["device"]).eval()
    new = tt_generate(model, ids, attention_mask=mask, eos_token_id=stops, pad_token_id=pad, seed=seed,
                      **sampling)[:, ids.shape[1]:]
    completions = [decode_completion(tokenizer, row.tolist(), stops) for row in new]
    for i, (prompt, text) in enumerate(zip(prompts, completions), start=1):
        if opts.get("json"):
            out(json.dumps({"prompt": prompt, "completion": text}))
        else:
            out(f"--- {i} ---\n{text}" if len(prompts) > 1 else text)
    return completions


def decode_completion(tokenizer, ids: list[int], stops: list[int]) -> str:
    """The text of generated ids up to (without) the first stop token."""
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)
