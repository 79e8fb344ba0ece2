"""Load and save Hugging Face checkpoint directories with tinytune's decoder.

Loading builds the model on the meta device, then streams each tensor out of the safetensors
files (memory-mapped) into its parameter, converted to the caller's dtype and device: peak
memory is about one copy of the weights. Saving writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads, merging LoRA first (without changing
the model), sharded above `max_shard_size`, each file written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..peft import adapter, ia3, lora
from ..peft._targets import refuse_shared_merge
from .config import ModelConfig
from .hf_keys import hf_to_ours, is_ignored, ours_to_hf
from .transformer import CausalLM
from .._files import atomic_write, parse_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    return ModelConfig.from_hf(json.loads(config_file.read_text()))


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
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
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


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
    with torch.device("meta"):
        model = CausalLM(cfg)
    _load_weights(model, files, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(device)
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

    Returns:
        (model in eval mode, tokenizer or None when the directory has no tokenizer.json).

    Raises:
        FileNotFoundError: no config or weights. ValueError: an unsupported model_type or
        feature, pickled weights without allow_pickle, or missing / unexpected / mis-shaped keys
        (named).
    """
    from .tokenizer import load_tokenizer

    model = load_model(path, dtype, device, allow_pickle)
    return model, load_tokenizer(path)


def _refuse_unmergeable(model: nn.Module) -> None:
    """A plain checkpoint cannot hold bottleneck adapters, prefixes or soft prompts: say so, never write
    their `.base.` / encoder keys into a file transformers would load wrongly."""
    kinds = [kind for kind, found in (
        ("bottleneck adapters", any(True for _ in adapter.adapter_layers(model))),
        ("prefix tuning", getattr(model, "prefix_encoder", None) is not None),
        ("prompt tuning", getattr(model, "prompt_encoder", None) is not None)) if found]
    if kinds:
        raise ValueError(f"save_pretrained: {kinds[0]} cannot be merged into the weights of a plain checkpoint; "
                         "save it with tt.save_adapter (and the base with tt.save_pretrained before applying it)")


def _fold_ia3(state: dict, name: str, layer: nn.Module) -> None:
    weight, bias = state.pop(f"{name}.base.weight"), state.pop(f"{name}.base.bias", None)
    l = state.pop(f"{name}.ia3_l").float()  # (out, 1) scales rows and the bias; (1, in) scales columns
    if not layer.merged:
        weight = (weight.float() * l).to(weight.dtype)
        if bias is not None and not layer.feedforward:
            bias = (bias.float() * l.reshape(bias.shape)).to(bias.dtype)
    state[f"{name}.weight"] = weight
    if bias is not None:
        state[f"{name}.bias"] = bias


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA and (IA)3 layer folded into plain weights (model unchanged).

    Raises:
        ValueError: the model carries a method that does not merge (adapters, prefixes, soft prompts), or
            a LoRA / (IA)3 layer whose base weight is tied to another module (e.g. lm_head and embeddings).
    """
    _refuse_unmergeable(model)
    refuse_shared_merge(model, [*lora.lora_layers(model), *ia3.ia3_layers(model)], "save_pretrained")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in lora.lora_layers(model):
        state.pop(f"{name}.base.weight")
        state[f"{name}.weight"] = layer.merged_weight()  # W + s B A (DoRA: rescaled); as is when merged
        if f"{name}.base.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
        for key in [k for k in state if k.startswith(f"{name}.lora_")]:
            del state[key]
    for name, layer in ia3.ia3_layers(model):
        _fold_ia3(state, name, layer)
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
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.to("cpu").contiguous() for k, v in ours_to_hf(cfg.model_type, state).items()}
    shards = _shards(tensors, parse_size(max_shard_size))
    _write_shards(path, shards)
    hf = cfg.to_hf()
    hf["dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    _write_json(path / "config.json", hf)
    generation = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    _write_json(path / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _write_json(file: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def _write_shards(path: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if stale.exists():
            os.remove(stale)  # a checkpoint with a different shard count must not mix with this one
    if len(shards) == 1:
        atomic_write(path / SINGLE_FILE, lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(path / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
