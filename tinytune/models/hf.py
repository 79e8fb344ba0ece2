"""Load and save Hugging Face checkpoint directories with tinytune's decoder.

Loading builds the model on the meta device, then streams each tensor out of the safetensors
files (memory-mapped) into its parameter, converted to the caller's dtype and device: peak
memory is about one copy of the weights. Every file named by the shard index must lie inside the
directory, and a directory tinytune wrote is checked against its manifest first.

Saving writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads, merging
LoRA first (without changing the model), sharded above `max_shard_size`, as one transaction
(`tinytune._transaction`): the old checkpoint stays complete until the new one is on disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..peft.methods import METHODS
from .config import ModelConfig
from .hf_keys import hf_to_ours, is_ignored, ours_to_hf
from .transformer import CausalLM
from .. import _check
from .._files import contained_file, parse_size, read_json
from .._manifest import verify
from .._transaction import describe_missing, directory_transaction

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (every field typed and bounded; errors name the file).

    Raises:
        FileNotFoundError: no config.json. ValueError: invalid JSON, or a field of the wrong type,
            out of range or unsupported (named).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face checkpoint directory"
                                + describe_missing(path))
    config_file = contained_file(path, "config.json", "load_pretrained")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    hf = _check.mapping(read_json(config_file, "load_pretrained"), f"load_pretrained: {config_file}")
    return ModelConfig.from_hf(hf, source=config_file)


def _index_files(path: Path) -> list[Path]:
    """The shard files `model.safetensors.index.json` names, each checked to lie inside `path`."""
    index_file = contained_file(path, INDEX_FILE, "load_pretrained")
    index = _check.mapping(read_json(index_file, "load_pretrained"), f"load_pretrained: {index_file}")
    weight_map = _check.mapping(index.get("weight_map"), f"load_pretrained: {index_file} field 'weight_map'")
    names = set()
    for key, name in weight_map.items():
        _check.string(name, f"load_pretrained: {index_file} weight_map[{key!r}]")
        names.add(name)
    files = [contained_file(path, name, f"load_pretrained: {index_file}") for name in sorted(names)]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"load_pretrained: {index_file} names {file.name}, which is not in {path}")
    return files


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        return _index_files(path)
    if (path / SINGLE_FILE).is_file():
        return [contained_file(path, SINGLE_FILE, "load_pretrained")]
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if pickled and allow_pickle:
        return pickled
    if pickled:
        raise ValueError(
            f"{path} holds only pickled weights ({pickled[0].name}); tinytune does not execute pickles by "
            "default. Convert them to safetensors, or pass allow_pickle=True to read them with "
            "torch.load(weights_only=True)"
        )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _iter_tensors(files: list[Path]):
    """(key, tensor) for every tensor in the files, one at a time."""
    for file in files:
        if file.suffix == ".bin":
            yield from _read_pickled(file).items()
            continue
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"load_pretrained: {file} is not a readable safetensors file ({err}); it may be "
                             "truncated or damaged") from None
        with handle as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _read_pickled(file: Path) -> dict:
    """A `pytorch_model*.bin` through torch's restricted unpickler (tensors and plain containers only)."""
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"load_pretrained: {file} was refused by torch.load(weights_only=True) ({first}); it "
                         "holds something other than tensors, or is damaged") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load_pretrained: {file} does not hold a dict of tensors")
    return state


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[name] = nn.Parameter(tensor, requires_grad=True)


def _load_weights(model: CausalLM, files, dtype, device) -> None:
    cfg = model.config
    expected = {k: v.shape for k, v in model.state_dict().items()}
    loaded, unexpected, misshaped = set(), [], []
    for hf_key, tensor in _iter_tensors(files):
        mapped = hf_to_ours(cfg.model_type, hf_key, tensor)
        if mapped is None:
            if not is_ignored(cfg.model_type, hf_key):
                unexpected.append(hf_key)
            continue
        for key, value in mapped.items():
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if key not in expected:
                unexpected.append(hf_key)
            elif value.shape != expected[key]:
                misshaped.append(f"{hf_key}: file {tuple(value.shape)} vs model {tuple(expected[key])}")
                loaded.add(key)  # present, just wrong: reported as mis-shaped, not missing
            else:
                _set_tensor(model, key, value.to(device=device, dtype=dtype))
                loaded.add(key)
    missing = sorted(k for k in expected if k not in loaded and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    problems = [f"{label}: {items}" for label, items in
                (("missing keys", missing), ("unexpected keys", sorted(unexpected)), ("mis-shaped keys", misshaped)) if items]
    if problems:
        raise ValueError(f"cannot load the checkpoint in {files[0].parent}; " + "; ".join(problems))


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False) -> CausalLM:
    """Build a `CausalLM` from a Hugging Face checkpoint directory (see `load_pretrained`)."""
    path = Path(path)
    cfg = read_config(path)
    files = _weight_files(path, allow_pickle)
    # a directory tinytune wrote: every file as the save recorded it, the ones read here listed
    verify(path, "load_pretrained", listed=["config.json", *(f.name for f in files)])
    with torch.device("meta"):
        model = CausalLM(cfg)
    _load_weights(model, files, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(device)
    model.name_or_path = str(path)  # adapter files record it (PEFT's base_model_name_or_path)
    return model.eval()


def load_pretrained(path, dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False):
    """Load a Hugging Face checkpoint directory: `(model, tokenizer)`.

    Args:
        path: a directory with `config.json` and `model.safetensors`, or sharded
            `model-0000x-of-0000n.safetensors` plus `model.safetensors.index.json`; and
            `tokenizer.json` when there is a tokenizer.
        dtype, device: where the weights go (converted tensor by tensor).
        allow_pickle: read `pytorch_model*.bin` files with `torch.load(weights_only=True)` when no
            safetensors exist (refused by default).

        A path to a `.gguf` file is read by `tinytune.models.gguf_read.load_gguf` instead (llama,
        mistral, qwen2, gpt2; any quantisation, dequantised; tokenizer for byte-level BPE vocabularies).

    Returns:
        (model in eval mode, tokenizer or None when the directory has no tokenizer.json).

    Raises:
        FileNotFoundError: no config or weights. ValueError: an unsupported model_type or
        feature, pickled weights without allow_pickle, or missing / unexpected / mis-shaped keys
        (named).
    """
    from .tokenizer import load_tokenizer

    if str(path).lower().endswith(".gguf") and not Path(path).is_dir():  # llama.cpp's single-file format
        from .gguf_read import load_gguf

        return load_gguf(path, dtype, device)
    model = load_model(path, dtype, device, allow_pickle)
    return model, load_tokenizer(path)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every mergeable PEFT method (LoRA, (IA)3) folded into plain weights
    (the model is unchanged).

    Raises:
        ValueError: the model carries a method that does not merge (adapters, prefixes, soft prompts), or
            a layer whose base weight is tied to another module (e.g. lm_head and embeddings).
    """
    applied = [m for m in METHODS if m.is_applied(model)]
    for method in applied:
        if method.merged_state is None:
            raise ValueError(f"save_pretrained: {method.name} cannot be merged into the weights of a plain checkpoint; "
                             "save it with tt.save_adapter (and the base with tt.save_pretrained before applying it)")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for method in applied:
        for path, plain in method.merged_state(model).items():
            for key in [k for k in state if k.startswith(path + ".")]:
                del state[key]  # the layer's own keys (`.base.weight`, `.lora_A`, ...) give way to the plain ones
            state.update({f"{path}.{k}": v for k, v in plain.items()})
    return state


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    return shards + [current]


def save_pretrained(model: CausalLM, path, tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint directory (LoRA and (IA)3 merged in; the model is unchanged).

    Writes `config.json`, `generation_config.json`, the weights as `model.safetensors` or, above
    `max_shard_size` (bytes, or a string like "2GB"), as `model-0000x-of-0000n.safetensors` with
    `model.safetensors.index.json`; and the tokenizer's files when one is given. Returns path.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_pretrained expects a tinytune CausalLM, got {type(model).__name__}")
    cfg = model.config
    shard_bytes = parse_size(max_shard_size)
    state = merged_state_dict(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.to("cpu").contiguous() for k, v in ours_to_hf(cfg.model_type, state).items()}
    hf = cfg.to_hf()
    hf["dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    generation = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    path = Path(path)
    # one transaction: old weights (of any shard count) stay whole until the new set is complete on disk
    # a new tokenizer supersedes the old one's chat template file too (it may have none)
    owned = _OWNED + (("chat_template.jinja",) if tokenizer is not None else ())
    with directory_transaction(path, owned=owned, what="save_pretrained") as staging:
        _write_shards(staging, _shards(tensors, shard_bytes))
        _write_json(staging / "config.json", hf)
        _write_json(staging / "generation_config.json", generation)
        if tokenizer is not None:
            tokenizer.write_files(staging)
    return path


# what a previous checkpoint in the directory held that this save supersedes (not carried over):
# weights of any shard count or format, and the configs
_OWNED = (SINGLE_FILE, "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors", INDEX_FILE,
          "pytorch_model.bin", "pytorch_model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].bin",
          "pytorch_model.bin.index.json", "config.json", "generation_config.json")


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_shards(directory: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
