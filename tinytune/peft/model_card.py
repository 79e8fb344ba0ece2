"""The model card `save_adapter` writes beside an adapter: `README.md` in the layout of Hugging Face PEFT's
(`PeftModel.create_or_update_model_card`) and the Hub's default template -- YAML front matter
(`base_model`, `library_name`, `tags`, `pipeline_tag`, `datasets`) and then Markdown sections: the model
details (method, base model, task, trainable parameters), the method's hyperparameters (every field of the
adapter_config.json that is written with it), training data and hyperparameters, results, how to load it.

Whose card it is: tinytune's card carries a marker comment holding the SHA-256 of the rest of the card.
A save replaces a README.md only when it is tinytune's and unedited (marker present, hash matching); a
README.md of the user's -- no marker, an edited card, a link, anything else -- is kept unchanged (the
transaction carries it into the new directory). Everything here is deterministic (no dates): two saves of
the same adapter write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

CARD_NAME = "README.md"
CARD_KEYS = ("datasets", "metrics", "training", "description")
MAX_CARD_BYTES = 1 << 20  # a README.md bigger than this is nobody's generated card: kept as it is
_MARKER = "<!-- tinytune model card: rewritten by every save_adapter into this directory; edit anything " \
          "(or delete this line) and your text is kept. sha256:{} -->"
_MARKER_RE = re.compile(r"<!-- tinytune model card: .*? sha256:([0-9a-f]{64}) -->\n")
# adapter_config.json fields that are bookkeeping, not hyperparameters (shown elsewhere or not at all)
_NOT_HYPER = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision"}
_PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
              "TOKEN_CLS": "token-classification", "SEQ_2_SEQ_LM": "text2text-generation"}
# what PEFT itself loads (PeftModel.from_pretrained); tinytune's own types load with tinytune only
_PEFT_TYPES = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"}
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.+/-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def check_card_info(card_info) -> dict:
    """`card_info` as save_adapter takes it, checked: None or a dict with the optional keys "datasets"
    (list of non-empty strings), "metrics" ({name: number}), "training" ({name: JSON value}) and
    "description" (str). Returns a dict (empty for None).

    Raises:
        ValueError: not a dict, an unknown key (named, with the accepted ones), or a value of the wrong
            type (its key and the value named).
    """
    if card_info is None:
        return {}
    if not isinstance(card_info, dict):
        raise ValueError(f"save_adapter: card_info must be a dict with keys among {list(CARD_KEYS)} or None, "
                         f"got {type(card_info).__name__}")
    unknown = [k for k in card_info if k not in CARD_KEYS]
    if unknown:
        raise ValueError(f"save_adapter: card_info has unknown key {unknown[0]!r}; the accepted keys are "
                         f"{list(CARD_KEYS)}")
    info = dict(card_info)
    datasets = info.get("datasets")
    if datasets is not None:
        if not isinstance(datasets, (list, tuple)) or not all(isinstance(d, str) and d.strip() for d in datasets):
            raise ValueError(f"save_adapter: card_info['datasets'] must be a list of non-empty strings, got {datasets!r}")
        info["datasets"] = list(datasets)
    _check_mapping(info.get("metrics"), "metrics", _is_number, "numbers")
    _check_mapping(info.get("training"), "training", _is_json, "JSON values (str, number, bool, None, list, dict)")
    if info.get("description") is not None and not isinstance(info["description"], str):
        raise ValueError(f"save_adapter: card_info['description'] must be a str, got {info['description']!r}")
    return info


def _check_mapping(value, key: str, valid, expected: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"save_adapter: card_info[{key!r}] must be a dict with string keys, got {value!r}")
    for name, item in value.items():
        if not valid(item):
            raise ValueError(f"save_adapter: card_info[{key!r}][{name!r}] = {item!r}; the values must be {expected}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def keeps_existing(directory) -> bool:
    """Whether `directory/README.md` exists and is not an unedited card of tinytune's: it is then the
    user's and a save must leave it as it is (not write its own)."""
    readme = Path(directory) / CARD_NAME
    if readme.is_symlink():
        return True
    if not readme.exists():
        return False
    if not readme.is_file() or readme.stat().st_size > MAX_CARD_BYTES:
        return True
    try:
        text = readme.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return True
    return not is_tinytune_card(text)


def is_tinytune_card(text: str) -> bool:
    """Whether `text` is a card tinytune wrote, unedited: its marker's hash is that of the rest."""
    match = _MARKER_RE.search(text)
    if match is None:
        return False
    rest = text[:match.start()] + text[match.end():]
    return hashlib.sha256(rest.encode("utf-8")).hexdigest() == match.group(1)


def render(config: dict, trainable: int, total: int, file_values: int, file_tensors: int,
           card_info: dict | None = None) -> str:
    """The README.md text of an adapter.

    Args:
        config: the adapter_config.json dict (its `peft_type`, `task_type`, `base_model_name_or_path`
            and every hyperparameter).
        trainable, total: the model's trainable and total parameter counts (`count_parameters`).
        file_values, file_tensors: how many numbers and tensors the adapter file holds.
        card_info: as checked by `check_card_info`.
    """
    info = card_info or {}
    front = _front_matter(config, info)
    from .. import __version__
    rest = ["", *_details(config, trainable, total, file_values, file_tensors, info), *_hyperparameters(config),
            *_training(info), *_results(info), *_how_to_load(config),
            "## Framework versions", "", f"- tinytune {__version__}", ""]
    unmarked = "\n".join(front) + "\n" + "\n".join(rest)
    digest = hashlib.sha256(unmarked.encode("utf-8")).hexdigest()
    # the marker goes right after the front matter, which must open the file; the hash is of the rest
    return "\n".join(front) + "\n" + _MARKER.format(digest) + "\n" + "\n".join(rest)


def _front_matter(config: dict, info: dict) -> list[str]:
    base, peft_type = config.get("base_model_name_or_path"), str(config.get("peft_type"))
    tags = ["tinytune", peft_type.lower().replace("_", "-")]
    if base:
        tags.append(f"base_model:adapter:{base}")
    lines = ["---"]
    if base:
        lines.append(f"base_model: {_yaml(base)}")
    lines.append(f"library_name: {'peft' if peft_type in _PEFT_TYPES else 'tinytune'}")
    lines += ["tags:", *(f"- {_yaml(t)}" for t in tags)]
    pipeline = _PIPELINES.get(config.get("task_type"))
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    if info.get("datasets"):
        lines += ["datasets:", *(f"- {_yaml(d)}" for d in info["datasets"])]
    return lines + ["---"]


def _yaml(text: str) -> str:
    """A YAML scalar for `text`: plain when it cannot read as anything but that string, else
    double-quoted (JSON's escapes are YAML's)."""
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _details(config: dict, trainable: int, total: int, values: int, tensors: int, info: dict) -> list[str]:
    base, task, peft_type = (config.get(k) for k in ("base_model_name_or_path", "task_type", "peft_type"))
    lines = [f"# {peft_type} adapter" + (f" for {_inline(base)}" if base else ""), ""]
    if info.get("description"):
        lines += [info["description"].strip(), ""]
    share = f" ({100.0 * trainable / total:.4g}% of {total:,})" if total else ""
    lines += ["## Model details", "",
              f"- **Method:** `{peft_type}`, trained with tinytune",
              f"- **Base model:** {f'`{_inline(base)}`' if base else 'not recorded'}",
              f"- **Task type:** {f'`{task}`' if task else 'not recorded'}",
              f"- **Trainable parameters:** {trainable:,}{share}",
              f"- **Adapter file:** {values:,} values in {tensors:,} tensors (`adapter_model.safetensors`)", ""]
    return lines


def _hyperparameters(config: dict) -> list[str]:
    rows = [(k, v) for k, v in sorted(config.items()) if k not in _NOT_HYPER and v is not None]
    lines = ["### Method hyperparameters", "", "As in `adapter_config.json`:", ""]
    return lines + _table(("field", "value"), [(k, _value(v)) for k, v in rows]) + [""]


def _training(info: dict) -> list[str]:
    lines = ["## Training details", "", "### Training data", ""]
    datasets = info.get("datasets")
    lines += [f"- `{_inline(d)}`" for d in datasets] if datasets else ["Not recorded."]
    lines += ["", "### Training hyperparameters", ""]
    training = info.get("training")
    lines += _table(("name", "value"), [(k, _value(v)) for k, v in training.items()]) if training else ["Not recorded."]
    return lines + [""]


def _results(info: dict) -> list[str]:
    metrics = info.get("metrics")
    if not metrics:
        return []
    rows = [(k, repr(float(v)) if isinstance(v, float) else str(v)) for k, v in metrics.items()]  # exact
    return ["## Evaluation", "", "### Results", "", *_table(("metric", "value"), rows), ""]


def _how_to_load(config: dict) -> list[str]:
    base = config.get("base_model_name_or_path") or "<base model>"
    lines = ["## How to load", "", "```python", "import tinytune as tt", "",
             f"model = tt.models.load_pretrained({json.dumps(base)})",
             'tt.load_adapter(model, "path/to/this/directory")', "```", ""]
    if config.get("peft_type") in _PEFT_TYPES:
        lines += ["The layout is Hugging Face PEFT's: `peft.PeftModel.from_pretrained(base_model, "
                  '"path/to/this/directory")` loads it too.', ""]
    return lines


def _table(header: tuple[str, str], rows) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|",
            *(f"| {_inline(str(k))} | {_inline(v)} |" for k, v in rows)]


def _value(value) -> str:
    """A config or training value for a table cell: JSON in backticks; a long list shortened."""
    if isinstance(value, list) and len(value) > 16:
        shown = ", ".join(json.dumps(v) for v in value[:8])
        return f"`[{shown}, ...]` ({len(value)} in all)"
    text = json.dumps(value, sort_keys=True)
    return text if "`" in text else f"`{text}`"


def _inline(text: str) -> str:
    """`text` on one line, safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")
