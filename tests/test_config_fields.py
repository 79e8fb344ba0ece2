"""Every value a user or a file gives is typed and bounded at the boundary, and the message names it.

One table: (kind, patch, regex). `kind` says which config is built or which file is written and read;
`patch` corrupts one field of a valid one (DROP removes it); the error must match `regex` (which names
the field), and for files it must also name the file's path. GOOD rows build or read valid variants,
so the table fails both ways (a check too loose or too strict). Kinds:

    llama / gpt2 / mistral   config.json from a preset's `to_hf()`, read by ModelConfig.from_hf(source=)
    model                    ModelConfig(**preset fields, **patch)
    train                    TrainConfig(**patch)
    lora, ia3, adapter, prefix, prompt, freeze         the method config dataclasses
    lora-file, ia3-file, adapter-file, prefix-file, prompt-file, freeze-file
                             adapter_config.json dicts as PEFT (or tinytune) writes them, read by
                             config_from_peft(d, path) / freeze.apply_peft_config(model, d, path)
    cli-toml / cli-json      a `tinytune finetune --config` file read by cli.options.read_config
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch.nn as nn

import tinytune as tt
from tinytune._check import FieldError
from tinytune.cli import commands
from tinytune.cli.options import FILE_VALUES, ConfigFileError, read_config
from tinytune.models import ModelConfig
from tinytune.models.presets import PRESETS
from tinytune.peft import adapter, freeze, ia3, lora, prefix, prompt
from tinytune.peft.lora import files as lora_config_io
from tinytune.train import TrainConfig

DROP = object()  # a patch value: remove the field
INF, NAN = math.inf, math.nan
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# adapter_config.json as peft 0.21 writes it (LoraConfig / IA3Config / PromptTuningConfig / PrefixTuningConfig
# .to_dict(), trimmed of fields at their defaults that the readers ignore)
PEFT_FILES = {
    "lora-file": {"peft_type": "LORA", "task_type": None, "auto_mapping": None, "peft_version": "0.21.2",
                  "base_model_name_or_path": None, "revision": None, "inference_mode": False, "r": 4,
                  "target_modules": ["q_proj", "v_proj"], "exclude_modules": None, "lora_alpha": 8,
                  "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
                  "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
                  "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
                  "layer_replication": None, "lora_bias": False, "target_parameters": None},
    "ia3-file": {"peft_type": "IA3", "task_type": None, "auto_mapping": None, "peft_version": "0.21.2",
                 "base_model_name_or_path": None, "revision": None, "inference_mode": False,
                 "target_modules": ["down_proj", "k_proj"], "exclude_modules": None,
                 "feedforward_modules": ["down_proj"],
                 "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True},
    "prompt-file": {"task_type": "CAUSAL_LM", "peft_type": "PROMPT_TUNING", "auto_mapping": None,
                    "peft_version": "0.21.2",
                    "base_model_name_or_path": None, "revision": None, "inference_mode": False, "num_virtual_tokens": 4,
                    "token_dim": None, "num_transformer_submodules": None, "num_attention_heads": None,
                    "num_layers": None, "modules_to_save": None, "prompt_tuning_init": "RANDOM",
                    "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None},
    "prefix-file": {"task_type": "CAUSAL_LM", "peft_type": "PREFIX_TUNING", "auto_mapping": None,
                    "peft_version": "0.21.2",
                    "base_model_name_or_path": None, "revision": None, "inference_mode": False, "num_virtual_tokens": 4,
                    "token_dim": None, "num_transformer_submodules": None, "num_attention_heads": None,
                    "num_layers": None, "modules_to_save": None, "init_weights": None, "encoder_hidden_size": None,
                    "prefix_projection": False},
    "adapter-file": adapter.peft_config_dict(adapter.AdapterConfig()),
    "freeze-file": {"peft_type": "FREEZE", "task_type": None, "trainable_parameters": ["0.weight"],
                    "base_model_name_or_path": None, "inference_mode": True},
}
CLI_BASE = {"checkpoint": "llama-tiny", "data": "data.jsonl", "out": "runs/x", "steps": 2}
HF_PRESET = {"llama": "llama-tiny", "gpt2": "gpt2-tiny", "mistral": "mistral-tiny"}


def _patched(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _toml_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value)  # str, int, float, bool and lists of them read the same in TOML


def _write_cli(tmp_path: Path, kind: str, patch: dict) -> Path:
    """A config file: CLI_BASE with the patch; a key "table.key" goes into [table]."""
    options = _patched(CLI_BASE, patch)
    file = tmp_path / ("run.json" if kind == "cli-json" else "run.toml")
    top = {k: v for k, v in options.items() if "." not in k}
    tables: dict = {}
    for key, value in options.items():
        if "." in key:
            table, _, name = key.partition(".")
            tables.setdefault(table, {})[name] = value
    if kind == "cli-json":
        file.write_text(json.dumps({**top, **tables}))
    else:
        lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
        for table, values in tables.items():
            lines += [f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        file.write_text("\n".join(lines) + "\n")
    return file


def _config_json(tmp_path: Path, kind: str, patch: dict) -> tuple[dict, Path]:
    hf = tt.models.build(HF_PRESET[kind]).config.to_hf()
    data = patch["__file__"] if "__file__" in patch else _patched(hf, patch)
    file = tmp_path / "config.json"
    file.write_text(json.dumps(data))  # Infinity / NaN as Python's json writes them (and json reads them back)
    return json.loads(file.read_text()), file


def _method_config(kind: str, patch: dict):
    classes = {"lora": lora.LoraConfig, "ia3": ia3.IA3Config, "adapter": adapter.AdapterConfig,
               "prefix": prefix.PrefixConfig, "prompt": prompt.PromptConfig, "freeze": freeze.FreezeConfig}
    return classes[kind](**patch)


def _peft_file(tmp_path: Path, kind: str, patch: dict):
    data = patch["__file__"] if "__file__" in patch else _patched(PEFT_FILES[kind], patch)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps(data))
    data = json.loads(file.read_text())
    if kind == "freeze-file":
        return freeze.apply_peft_config(nn.Sequential(nn.Linear(2, 2)), data, tmp_path), file
    reader = {"lora-file": lora_config_io, "ia3-file": ia3, "adapter-file": adapter, "prefix-file": prefix,
              "prompt-file": prompt}[kind]
    return reader.config_from_peft(data, tmp_path), file


def build(kind: str, patch: dict, tmp_path: Path):
    """(the config or reader result, the file it came from or None)."""
    if kind in HF_PRESET:
        data, file = _config_json(tmp_path, kind, patch)
        return ModelConfig.from_hf(data, source=file), file
    if kind == "model":
        return ModelConfig(**{**PRESETS["llama-tiny"], **patch}), None
    if kind == "train":
        return TrainConfig(**patch), None
    if kind.endswith("-file"):
        return _peft_file(tmp_path, kind, patch)
    if kind.startswith("cli-"):
        file = _write_cli(tmp_path, kind, patch)
        return read_config(str(file), commands.FINETUNE_KEYS), file
    return _method_config(kind, patch), None


def _rows(kind: str, *rows):
    return [pytest.param(kind, patch, regex, id=f"{kind}-{'-'.join(map(str, patch))}-{i}")
            for i, (patch, regex) in enumerate(rows)]


def _file_field(field: str, expected: str) -> str:
    """The regex for a config.json / adapter_config.json field message."""
    return rf"field '{re.escape(field)}' must be {expected}"


INT1, INT0 = "(None or )?an integer >= 1", "(None or )?an integer >= 0"
NUM_POS = r"(None or )?a finite number > 0"
BOOL = "(None, )?true or false"

LLAMA = _rows(
    "llama",
    ({"hidden_size": "64"}, _file_field("hidden_size", r"an integer >= 1, got '64' \(str\)")),
    ({"hidden_size": True}, _file_field("hidden_size", r"an integer >= 1, got True \(bool\)")),
    ({"hidden_size": 64.0}, _file_field("hidden_size", INT1)),
    ({"hidden_size": 0}, _file_field("hidden_size", INT1)),
    ({"hidden_size": DROP}, r"lacks the field 'hidden_size'"),
    ({"intermediate_size": -1}, _file_field("intermediate_size", INT1)),
    ({"intermediate_size": None}, _file_field("intermediate_size", INT1)),
    ({"num_hidden_layers": 2.5}, _file_field("num_hidden_layers", INT1)),
    ({"num_hidden_layers": "2"}, _file_field("num_hidden_layers", INT1)),
    ({"num_attention_heads": "4"}, _file_field("num_attention_heads", INT1)),
    ({"num_attention_heads": 0}, _file_field("num_attention_heads", INT1)),
    ({"num_key_value_heads": 0}, _file_field("num_key_value_heads", INT1)),
    ({"num_key_value_heads": "2"}, _file_field("num_key_value_heads", INT1)),
    ({"num_key_value_heads": 3}, r"num_heads=4 is not a multiple of num_kv_heads=3"),
    ({"head_dim": 0}, _file_field("head_dim", INT1)),
    ({"head_dim": 16.0}, _file_field("head_dim", INT1)),
    ({"vocab_size": -1}, _file_field("vocab_size", INT1)),
    ({"vocab_size": "256"}, _file_field("vocab_size", INT1)),
    ({"max_position_embeddings": 0}, _file_field("max_position_embeddings", INT1)),
    ({"max_position_embeddings": "512"}, _file_field("max_position_embeddings", INT1)),
    ({"rms_norm_eps": "x"}, _file_field("rms_norm_eps", NUM_POS)),
    ({"rms_norm_eps": 0}, _file_field("rms_norm_eps", NUM_POS)),
    ({"rms_norm_eps": -1e-6}, _file_field("rms_norm_eps", NUM_POS)),
    ({"rms_norm_eps": INF}, _file_field("rms_norm_eps", NUM_POS + r", got inf")),
    ({"rms_norm_eps": NAN}, _file_field("rms_norm_eps", NUM_POS + r", got nan")),
    ({"rope_theta": INF}, _file_field("rope_theta", NUM_POS)),
    ({"rope_theta": "1e4"}, _file_field("rope_theta", NUM_POS)),
    ({"rope_theta": 0}, _file_field("rope_theta", NUM_POS)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": INF}},
     _file_field("rope_parameters.rope_theta", NUM_POS)),
    ({"rope_parameters": [1]}, _file_field("rope_parameters", "None or a JSON object")),
    ({"rope_parameters": {**LLAMA3, "factor": "8"}}, _file_field("rope_parameters.factor", NUM_POS)),
    ({"rope_parameters": {**LLAMA3, "factor": INF}}, _file_field("rope_parameters.factor", NUM_POS)),
    ({"rope_parameters": {**LLAMA3, "low_freq_factor": 0}}, _file_field("rope_parameters.low_freq_factor", NUM_POS)),
    ({"rope_parameters": {**LLAMA3, "high_freq_factor": 0.5}},
     r"rope_parameters.low_freq_factor'=1.0 must be less than"),
    ({"rope_parameters": {**LLAMA3, "original_max_position_embeddings": 64.5}},
     _file_field("rope_parameters.original_max_position_embeddings", INT1)),
    ({"rope_parameters": None, "rope_scaling": {**LLAMA3, "factor": "x"}}, _file_field("rope_scaling.factor", NUM_POS)),
    ({"rope_parameters": None, "rope_scaling": "llama3"}, _file_field("rope_scaling", "None or a JSON object")),
    ({"partial_rotary_factor": "1"}, _file_field("partial_rotary_factor", "a finite number")),
    ({"attention_bias": "no"}, _file_field("attention_bias", BOOL)),
    ({"attention_bias": 1}, _file_field("attention_bias", BOOL)),
    ({"mlp_bias": "false"}, _file_field("mlp_bias", BOOL)),
    ({"tie_word_embeddings": "yes"}, _file_field("tie_word_embeddings", BOOL)),
    ({"tie_word_embeddings": 0}, _file_field("tie_word_embeddings", BOOL)),
    ({"hidden_act": 5}, _file_field("hidden_act", "a string")),
    ({"hidden_act": "mish"}, r"hidden_act='mish' is not supported"),
    ({"eos_token_id": "2"}, _file_field("eos_token_id", r"None or an integer >= 0 or a non-empty list")),
    ({"eos_token_id": [2, "3"]}, _file_field("eos_token_id", r"None or an integer >= 0 or a non-empty list")),
    ({"eos_token_id": []}, _file_field("eos_token_id", r"None or an integer >= 0 or a non-empty list")),
    ({"eos_token_id": -1}, _file_field("eos_token_id", r"None or an integer >= 0")),
    ({"eos_token_id": 2.0}, _file_field("eos_token_id", r"None or an integer >= 0")),
    ({"bos_token_id": -3}, _file_field("bos_token_id", INT0)),
    ({"bos_token_id": "1"}, _file_field("bos_token_id", INT0)),
    ({"bos_token_id": True}, _file_field("bos_token_id", INT0)),
    ({"pad_token_id": -2}, _file_field("pad_token_id", INT0)),
    ({"pad_token_id": "0"}, _file_field("pad_token_id", INT0)),
    ({"pad_token_id": 1.5}, _file_field("pad_token_id", INT0)),
    ({"num_local_experts": 8}, r"num_local_experts=8 is not supported"),
    ({"model_type": "falcon"}, r"model_type='falcon' is not supported"),
    ({"__file__": [1, 2]}, r"config.json \(.*\) must be a JSON object"),
)
MISTRAL = _rows(
    "mistral",
    ({"sliding_window": 0}, _file_field("sliding_window", INT1)),
    ({"sliding_window": "64"}, _file_field("sliding_window", INT1)),
    ({"sliding_window": 1.5}, _file_field("sliding_window", INT1)),
)
GPT2 = _rows(
    "gpt2",
    ({"n_embd": "64"}, _file_field("n_embd", INT1)),
    ({"n_embd": DROP}, r"lacks the field 'n_embd'"),
    ({"n_layer": 0}, _file_field("n_layer", INT1)),
    ({"n_head": 4.0}, _file_field("n_head", INT1)),
    ({"n_positions": -1}, _file_field("n_positions", INT1)),
    ({"n_inner": "256"}, _file_field("n_inner", INT1)),
    ({"n_inner": 0}, _file_field("n_inner", INT1)),
    ({"vocab_size": None}, _file_field("vocab_size", INT1)),
    ({"layer_norm_epsilon": "1e-5"}, _file_field("layer_norm_epsilon", NUM_POS)),
    ({"layer_norm_epsilon": NAN}, _file_field("layer_norm_epsilon", NUM_POS)),
    ({"activation_function": 3}, _file_field("activation_function", "a string")),
    ({"activation_function": "swiglu"}, r"activation_function='swiglu' is not supported"),
    ({"tie_word_embeddings": "true"}, _file_field("tie_word_embeddings", BOOL)),
    ({"eos_token_id": "50256"}, _file_field("eos_token_id", "None or an integer >= 0")),
    ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True"),
)
MODEL = _rows(
    "model",
    ({"hidden_size": "64"}, r"ModelConfig.hidden_size must be an integer >= 1, got hidden_size='64' \(str\)"),
    ({"num_layers": 2.5}, r"ModelConfig.num_layers must be an integer >= 1, got num_layers=2.5"),
    ({"vocab_size": True}, r"ModelConfig.vocab_size must be an integer >= 1"),
    ({"intermediate_size": 0}, r"ModelConfig.intermediate_size must be an integer >= 1"),
    ({"num_heads": "4"}, r"ModelConfig.num_heads must be an integer >= 1"),
    ({"max_position_embeddings": 0}, r"ModelConfig.max_position_embeddings must be an integer >= 1"),
    ({"head_dim": 0}, r"ModelConfig.head_dim must be None or an integer >= 1"),
    ({"num_kv_heads": "2"}, r"ModelConfig.num_kv_heads must be None or an integer >= 1"),
    ({"sliding_window": 0}, r"ModelConfig.sliding_window must be None or an integer >= 1"),
    ({"norm_eps": "x"}, r"ModelConfig.norm_eps must be a finite number > 0"),
    ({"norm_eps": 0.0}, r"ModelConfig.norm_eps must be a finite number > 0"),
    ({"rope_theta": INF}, r"ModelConfig.rope_theta must be a finite number > 0, got rope_theta=inf"),
    ({"tie_word_embeddings": "yes"}, r"ModelConfig.tie_word_embeddings must be true or false"),
    ({"gated_mlp": 1}, r"ModelConfig.gated_mlp must be true or false"),
    ({"qkv_bias": None}, r"ModelConfig.qkv_bias must be true or false"),
    ({"o_bias": "no"}, r"ModelConfig.o_bias must be true or false"),
    ({"mlp_bias": 0}, r"ModelConfig.mlp_bias must be true or false"),
    ({"bos_token_id": -1}, r"ModelConfig.bos_token_id must be None or an integer >= 0"),
    ({"eos_token_id": [1, "2"]}, r"ModelConfig.eos_token_id must be None or an integer >= 0 or a non-empty list"),
    ({"pad_token_id": 1.0}, r"ModelConfig.pad_token_id must be None or an integer >= 0"),
    ({"rope_scaling": "llama3"}, r"ModelConfig.rope_scaling must be None or a JSON object"),
    ({"rope_scaling": {**LLAMA3, "factor": NAN}}, r"ModelConfig.rope_scaling\['factor'\] must be a finite number > 0"),
    ({"hf_config": []}, r"ModelConfig.hf_config must be a JSON object"),
    ({"norm": "batch"}, r"ModelConfig.norm='batch'; expected one of"),
    ({"act": 3}, r"ModelConfig.act=3; expected one of"),
    ({"positions": "alibi"}, r"ModelConfig.positions='alibi'; expected one of"),
    ({"model_type": 5}, r"model_type=5 is not supported"),
)
TRAIN = _rows(
    "train",
    ({"lr": "1e-3"}, r"TrainConfig.lr must be a finite number > 0, got '1e-3' \(str\)"),
    ({"lr": 0}, r"TrainConfig.lr must be a finite number > 0"),
    ({"lr": -1.0}, r"TrainConfig.lr must be a finite number > 0"),
    ({"lr": INF}, r"TrainConfig.lr must be a finite number > 0, got inf"),
    ({"lr": NAN}, r"TrainConfig.lr must be a finite number > 0, got nan"),
    ({"lr": True}, r"TrainConfig.lr must be a finite number > 0, got True \(bool\)"),
    ({"steps": "10"}, r"TrainConfig.steps must be an int >= 1, got '10' \(str\)"),
    ({"steps": 0}, r"TrainConfig.steps must be an int >= 1"),
    ({"steps": 2.5}, r"TrainConfig.steps must be an int >= 1"),
    ({"steps": True}, r"TrainConfig.steps must be an int >= 1, got True \(bool\)"),
    ({"batch_size": 0}, r"TrainConfig.batch_size must be an int >= 1"),
    ({"batch_size": "8"}, r"TrainConfig.batch_size must be an int >= 1"),
    ({"grad_accum": 0}, r"TrainConfig.grad_accum must be an int >= 1"),
    ({"grad_accum": 1.0}, r"TrainConfig.grad_accum must be an int >= 1"),
    ({"warmup_steps": -1}, r"TrainConfig.warmup_steps must be an int >= 0"),
    ({"warmup_steps": 1.5}, r"TrainConfig.warmup_steps must be an int >= 0"),
    ({"eval_every": -1}, r"TrainConfig.eval_every must be an int >= 0"),
    ({"save_every": "1"}, r"TrainConfig.save_every must be an int >= 0"),
    ({"log_every": 0}, r"TrainConfig.log_every must be an int >= 1"),
    ({"seed": -1}, r"TrainConfig.seed must be an int >= 0"),
    ({"seed": "0"}, r"TrainConfig.seed must be an int >= 0"),
    ({"early_stopping_patience": 0}, r"TrainConfig.early_stopping_patience must be None or an int >= 1"),
    ({"early_stopping_patience": 1.5}, r"TrainConfig.early_stopping_patience must be None or an int >= 1"),
    ({"max_bad_steps": 0}, r"TrainConfig.max_bad_steps must be an int >= 1"),
    ({"pad_token_id": -1}, r"TrainConfig.pad_token_id must be an int >= 0"),
    ({"keep_checkpoints": 0}, r"TrainConfig.keep_checkpoints must be None or an int >= 1, got 0"),
    ({"keep_checkpoints": 2.0}, r"TrainConfig.keep_checkpoints must be None or an int >= 1"),
    ({"keep_checkpoints": "3"}, r"TrainConfig.keep_checkpoints must be None or an int >= 1"),
    ({"keep_checkpoints": True}, r"TrainConfig.keep_checkpoints must be None or an int >= 1"),
    ({"weight_decay": INF}, r"TrainConfig.weight_decay must be a finite number >= 0, got inf"),
    ({"weight_decay": NAN}, r"TrainConfig.weight_decay must be a finite number >= 0, got nan"),
    ({"weight_decay": -0.1}, r"TrainConfig.weight_decay must be a finite number >= 0"),
    ({"weight_decay": "0.1"}, r"TrainConfig.weight_decay must be a finite number >= 0"),
    ({"weight_decay": 1e4}, r"TrainConfig.weight_decay=10000.0 .* lr \* weight_decay = 2 >= 1"),
    ({"weight_decay": 1.0, "lr": 0.1, "loraplus_lr_ratio": 16}, r"TrainConfig.weight_decay=1.0 .* >= 1"),
    ({"eps": 0}, r"TrainConfig.eps must be a finite number > 0"),
    ({"eps": INF}, r"TrainConfig.eps must be a finite number > 0"),
    ({"eps": "1e-8"}, r"TrainConfig.eps must be a finite number > 0"),
    ({"betas": (0.9,)}, r"TrainConfig.betas must be two numbers in \[0, 1\)"),
    ({"betas": "ab"}, r"TrainConfig.betas must be two numbers in \[0, 1\)"),
    ({"betas": (0.9, 1.0)}, r"TrainConfig.betas\[1\] must be a finite number in \[0, 1\)"),
    ({"betas": (0.9, NAN)}, r"TrainConfig.betas\[1\] must be a finite number in \[0, 1\), got nan"),
    ({"betas": (True, 0.9)}, r"TrainConfig.betas\[0\] must be a finite number"),
    ({"betas": ("0.9", 0.99)}, r"TrainConfig.betas\[0\] must be a finite number"),
    ({"max_grad_norm": 0}, r"TrainConfig.max_grad_norm must be None or a finite number > 0"),
    ({"max_grad_norm": INF}, r"TrainConfig.max_grad_norm must be None or a finite number > 0"),
    ({"max_grad_norm": "1"}, r"TrainConfig.max_grad_norm must be None or a finite number > 0"),
    ({"loraplus_lr_ratio": 0}, r"TrainConfig.loraplus_lr_ratio must be None or a finite number > 0"),
    ({"loraplus_lr_ratio": INF}, r"TrainConfig.loraplus_lr_ratio must be None or a finite number > 0"),
    ({"loraplus_lr_ratio": "16"}, r"TrainConfig.loraplus_lr_ratio must be None or a finite number > 0"),
    ({"grad_checkpointing": 1}, r"TrainConfig.grad_checkpointing must be true or false, got 1 \(int\)"),
    ({"grad_checkpointing": "yes"}, r"TrainConfig.grad_checkpointing must be true or false"),
    ({"shuffle": "no"}, r"TrainConfig.shuffle must be true or false, got 'no' \(str\)"),
    ({"shuffle": None}, r"TrainConfig.shuffle must be true or false"),
    ({"out_dir": 3}, r"TrainConfig.out_dir must be None or a path"),
    ({"out_dir": ""}, r"TrainConfig.out_dir must be None or a path"),
    ({"resume": 3}, r"TrainConfig.resume must be True, False, None or a path"),
    ({"resume": ""}, r"TrainConfig.resume must be True, False, None or a path"),
    ({"dtype": "fp8"}, r"TrainConfig.dtype='fp8' is not one of"),
    ({"dtype": 16}, r"TrainConfig.dtype=16 is not one of"),
    ({"schedule": "step"}, r"TrainConfig.schedule='step' is not one of"),
    ({"device": "tpu"}, r"TrainConfig.device='tpu' is not one of"),
    ({"task": "regression"}, r"TrainConfig.task='regression' is not one of"),
    ({"base_dtype": "fp16"}, r"TrainConfig.base_dtype='fp16' is not one of"),
)
METHODS = _rows(
    "lora",
    ({"rank": "4"}, r"LoraConfig.rank must be an integer >= 1, got rank='4' \(str\)"),
    ({"rank": 0}, r"LoraConfig.rank must be an integer >= 1, got rank=0"),
    ({"rank": 2.5}, r"LoraConfig.rank must be an integer >= 1, got rank=2.5"),
    ({"rank": True}, r"LoraConfig.rank must be an integer >= 1, got rank=True \(bool\)"),
    ({"alpha": INF}, r"LoraConfig.alpha must be a finite number > 0, got alpha=inf"),
    ({"alpha": NAN}, r"LoraConfig.alpha must be a finite number > 0, got alpha=nan"),
    ({"alpha": 0}, r"LoraConfig.alpha must be a finite number > 0, got alpha=0"),
    ({"alpha": "16"}, r"LoraConfig.alpha must be a finite number > 0, got alpha='16'"),
    ({"alpha": True}, r"LoraConfig.alpha must be a finite number > 0, got alpha=True"),
    ({"dropout": 1.0}, r"LoraConfig.dropout must be a finite number in \[0, 1\), got dropout=1.0"),
    ({"dropout": -0.1}, r"LoraConfig.dropout must be a finite number in \[0, 1\)"),
    ({"dropout": NAN}, r"LoraConfig.dropout must be a finite number in \[0, 1\)"),
    ({"dropout": "0.1"}, r"LoraConfig.dropout must be a finite number in \[0, 1\)"),
    ({"rslora": "yes"}, r"LoraConfig.rslora must be true or false, got rslora='yes'"),
    ({"rslora": 1}, r"LoraConfig.rslora must be true or false"),
    ({"train_bias": "no"}, r"LoraConfig.train_bias must be true or false"),
    ({"dora": "yes"}, r"dora must be True or False, got dora='yes'"),
    ({"dora": 1}, r"dora must be True or False, got dora=1"),
    ({"init": "xavier"}, r"init='xavier'; expected one of 'kaiming', 'gaussian', 'pissa'"),
    ({"init": 3}, r"init=3; expected one of"),
    ({"targets": 5}, r"LoraConfig.targets must be a list of names"),
    ({"targets": None}, r"LoraConfig.targets is None"),
    ({"targets": "q_proj("}, r"LoraConfig.targets='q_proj\(' is not a valid regular expression"),
    ({"targets": [""]}, r"LoraConfig.targets entries must be non-empty strings"),
    ({"exclude": 5}, r"LoraConfig.exclude must be a list of names"),
) + _rows(
    "ia3",
    ({"targets": None}, r"IA3Config.targets is None"),
    ({"targets": 5}, r"IA3Config.targets must be a list of names"),
    ({"targets": "k_proj("}, r"IA3Config.targets='k_proj\(' is not a valid regular expression"),
    ({"feedforward": 3}, r"IA3Config.feedforward must be"),
    ({"exclude": [1]}, r"IA3Config.exclude entries must be non-empty strings"),
    ({"init_ones": "yes"}, r"IA3Config.init_ones must be True or False, got init_ones='yes'"),
    ({"init_ones": 1}, r"IA3Config.init_ones must be True or False"),
    ({"targets": ["k_proj"], "feedforward": ["down_proj"]}, r"feedforward entries \['down_proj'\] are not in targets"),
) + _rows(
    "adapter",
    ({"bottleneck": 0}, r"bottleneck must be an integer >= 1, got bottleneck=0"),
    ({"bottleneck": "64"}, r"bottleneck must be an integer >= 1, got bottleneck='64'"),
    ({"bottleneck": 2.5}, r"bottleneck must be an integer >= 1"),
    ({"bottleneck": True}, r"bottleneck must be an integer >= 1"),
    ({"placement": "serial"}, r"placement='serial'; expected one of 'houlsby', 'pfeiffer', 'parallel'"),
    ({"placement": 5}, r"AdapterConfig.placement must be a string, got placement=5"),
    ({"activation": "swish"}, r"activation='swish'; expected one of 'relu', 'gelu', 'silu', 'tanh'"),
    ({"activation": ["relu"]}, r"AdapterConfig.activation must be a string"),
    ({"scaling": 0}, r"scaling must be a finite number > 0"),
    ({"scaling": INF}, r"scaling must be a finite number > 0"),
    ({"scaling": "1"}, r"scaling must be a finite number > 0"),
    ({"scaling": True}, r"scaling must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": "0.1"}, r"AdapterConfig.dropout must be a finite number, got dropout='0.1'"),
    ({"dropout": NAN}, r"AdapterConfig.dropout must be a finite number"),
    ({"reduction_factor": 0}, r"AdapterConfig.reduction_factor must be an integer >= 1"),
    ({"reduction_factor": 2.5}, r"AdapterConfig.reduction_factor must be an integer >= 1"),
    ({"hidden_size": -2}, r"AdapterConfig.hidden_size must be an integer >= 1"),
    ({"hidden_size": "64"}, r"AdapterConfig.hidden_size must be an integer >= 1"),
    ({"targets": 5}, r"AdapterConfig.targets must be a list of names"),
    ({"exclude": 5}, r"AdapterConfig.exclude must be a list of names"),
) + _rows(
    "prefix",
    ({"num_virtual_tokens": 0}, r"PrefixConfig.num_virtual_tokens must be an integer >= 1, got num_virtual_tokens=0"),
    ({"num_virtual_tokens": "20"}, r"PrefixConfig.num_virtual_tokens must be an integer >= 1"),
    ({"num_virtual_tokens": 2.0}, r"PrefixConfig.num_virtual_tokens must be an integer >= 1"),
    ({"num_virtual_tokens": True}, r"PrefixConfig.num_virtual_tokens must be an integer >= 1"),
    ({"reparam_hidden": 0}, r"PrefixConfig.reparam_hidden must be an integer >= 1 or None"),
    ({"reparam_hidden": "8"}, r"PrefixConfig.reparam_hidden must be an integer >= 1 or None"),
    ({"reparam_hidden": 1.5}, r"PrefixConfig.reparam_hidden must be an integer >= 1 or None"),
) + _rows(
    "prompt",
    ({"num_virtual_tokens": 0}, r"PromptConfig.num_virtual_tokens must be an integer >= 1"),
    ({"num_virtual_tokens": "4"}, r"PromptConfig.num_virtual_tokens must be an integer >= 1"),
    ({"num_virtual_tokens": 2.0}, r"PromptConfig.num_virtual_tokens must be an integer >= 1"),
    ({"num_virtual_tokens": True}, r"PromptConfig.num_virtual_tokens must be an integer >= 1"),
    ({"init": "zeros"}, r"PromptConfig.init='zeros' is not one of"),
    ({"init": 3}, r"PromptConfig.init=3 is not one of"),
    ({"init_text": 5}, r"PromptConfig.init='text' needs a non-empty init_text, got 5"),
    ({"init": "text"}, r"PromptConfig.init='text' needs a non-empty init_text"),
    ({"init": "vocab", "init_text": "hi"}, r"PromptConfig.init_text is given but init='vocab'"),
    ({"tokenizer_name_or_path": 5}, r"PromptConfig.tokenizer_name_or_path must be None or a string"),
) + _rows(
    "freeze",
    ({"mode": "lora"}, r"FreezeConfig.mode='lora'; expected one of"),
    ({"mode": 3}, r"FreezeConfig.mode=3; expected one of"),
    ({"mode": "last_blocks", "n_blocks": 0}, r"FreezeConfig.n_blocks must be an integer >= 1, got n_blocks=0"),
    ({"mode": "last_blocks", "n_blocks": "2"}, r"FreezeConfig.n_blocks must be an integer >= 1"),
    ({"mode": "last_blocks", "n_blocks": 1.5}, r"FreezeConfig.n_blocks must be an integer >= 1"),
    ({"mode": "last_blocks", "n_blocks": True}, r"FreezeConfig.n_blocks must be an integer >= 1"),
    ({"mode": "last_blocks", "n_blocks": 1, "blocks": 3}, r"FreezeConfig.blocks must be a dotted module name"),
    ({"mode": "targets", "targets": 5}, r"FreezeConfig.targets must be a list of names"),
    ({"mode": "targets"}, r"FreezeConfig.targets is None"),
)
PEFT = _rows(
    "lora-file",
    ({"r": "four"}, _file_field("r", r"an integer >= 1, got 'four' \(str\)")),
    ({"r": "4"}, _file_field("r", r"an integer >= 1, got '4' \(str\)")),
    ({"r": 0}, _file_field("r", INT1)),
    ({"r": 4.5}, _file_field("r", INT1)),
    ({"r": True}, _file_field("r", INT1)),
    ({"r": DROP}, r"lacks the field 'r'"),
    ({"lora_alpha": "Infinity"}, _file_field("lora_alpha", NUM_POS + r", got 'Infinity' \(str\)")),
    ({"lora_alpha": INF}, _file_field("lora_alpha", NUM_POS + ", got inf")),
    ({"lora_alpha": NAN}, _file_field("lora_alpha", NUM_POS + ", got nan")),
    ({"lora_alpha": 0}, _file_field("lora_alpha", NUM_POS)),
    ({"lora_alpha": -8}, _file_field("lora_alpha", NUM_POS)),
    ({"lora_alpha": "16"}, _file_field("lora_alpha", NUM_POS)),
    ({"lora_alpha": True}, _file_field("lora_alpha", NUM_POS)),
    ({"lora_dropout": 1.0}, _file_field("lora_dropout", r"None or a finite number in \[0, 1\)")),
    ({"lora_dropout": "0.1"}, _file_field("lora_dropout", r"None or a finite number in \[0, 1\)")),
    ({"lora_dropout": NAN}, _file_field("lora_dropout", r"None or a finite number in \[0, 1\)")),
    ({"target_modules": 5}, _file_field("target_modules", "a string or a list of strings")),
    ({"target_modules": [1]}, _file_field("target_modules", "a string or a list of strings")),
    ({"target_modules": ""}, _file_field("target_modules", "a string or a list of strings")),
    ({"target_modules": None}, r"lacks the field 'target_modules'"),
    ({"exclude_modules": 5}, _file_field("exclude_modules", "None or a string or a list of strings")),
    ({"use_rslora": "false"}, _file_field("use_rslora", BOOL)),
    ({"use_rslora": 1}, _file_field("use_rslora", BOOL)),
    ({"use_dora": "yes"}, _file_field("use_dora", BOOL)),
    ({"bias": "some"}, r"field 'bias'='some' is not one of \['none', 'all', 'lora_only'\]"),
    ({"bias": 1}, _file_field("bias", "None or a string")),
    ({"init_lora_weights": 3}, _file_field("init_lora_weights", "true, false or the name of an init")),
    ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq' in .* is not supported"),
    ({"peft_type": "IA3"}, r"peft_type='IA3'; this loader reads 'LORA'"),
    ({"fan_in_fan_out": "yes"}, _file_field("fan_in_fan_out", BOOL)),
    ({"lora_bias": True}, r"lora_bias=True in .* is not supported"),
    ({"modules_to_save": "lm_head"}, _file_field("modules_to_save", "None or a list of strings")),
    ({"__file__": [1]}, r"adapter_config.json \(.*\) must be a JSON object"),
) + _rows(
    "ia3-file",
    ({"target_modules": 5}, _file_field("target_modules", "None or a string or a list of strings")),
    ({"target_modules": [1]}, _file_field("target_modules", "None or a string or a list of strings")),
    ({"target_modules": None}, r"'target_modules' is missing or null"),
    ({"feedforward_modules": 5}, _file_field("feedforward_modules", "None or a string or a list of strings")),
    ({"exclude_modules": [2]}, _file_field("exclude_modules", "None or a string or a list of strings")),
    ({"init_ia3_weights": "false"}, _file_field("init_ia3_weights", BOOL)),
    ({"init_ia3_weights": 0}, _file_field("init_ia3_weights", BOOL)),
    ({"fan_in_fan_out": "no"}, _file_field("fan_in_fan_out", BOOL)),
    ({"modules_to_save": "lm_head"}, _file_field("modules_to_save", "None or a list of strings")),
    ({"modules_to_save": [""]}, _file_field("modules_to_save", "None or a list of strings")),
    ({"r": 8}, r"unknown IA3 config fields \['r'\]"),
    ({"peft_type": "LORA"}, r"peft_type='LORA'; expected 'IA3'"),
) + _rows(
    "adapter-file",
    ({"bottleneck_size": "64"}, _file_field("bottleneck_size", INT1)),
    ({"bottleneck_size": 0}, _file_field("bottleneck_size", INT1)),
    ({"bottleneck_size": 1.5}, _file_field("bottleneck_size", INT1)),
    ({"reduction_factor": "16", "bottleneck_size": None}, _file_field("reduction_factor", INT1)),
    ({"reduction_factor": 0, "bottleneck_size": None}, _file_field("reduction_factor", INT1)),
    ({"placement": 5}, _file_field("placement", "None or a string")),
    ({"placement": "serial"}, r"field 'placement'='serial' is not one of \['houlsby', 'pfeiffer', 'parallel'\]"),
    ({"activation": "swish"}, r"field 'activation'='swish' is not one of"),
    ({"activation": 1}, _file_field("activation", "None or a string")),
    ({"scaling": "1.0"}, _file_field("scaling", NUM_POS)),
    ({"scaling": INF}, _file_field("scaling", NUM_POS)),
    ({"scaling": 0}, _file_field("scaling", NUM_POS)),
    ({"dropout": 1.0}, _file_field("dropout", r"None or a finite number in \[0, 1\)")),
    ({"dropout": "0.1"}, _file_field("dropout", r"None or a finite number in \[0, 1\)")),
    ({"hidden_size": "64"}, _file_field("hidden_size", INT1)),
    ({"target_modules": 5}, _file_field("target_modules", "None or a string or a list of strings")),
    ({"exclude_modules": [1]}, _file_field("exclude_modules", "None or a string or a list of strings")),
    ({"r": 8}, r"unknown BOTTLENECK_ADAPTER config fields \['r'\]"),
    ({"bottleneck_size": None}, r"neither bottleneck_size nor reduction_factor"),
) + _rows(
    "prefix-file",
    ({"num_virtual_tokens": "20"}, _file_field("num_virtual_tokens", r"an integer >= 1, got '20' \(str\)")),
    ({"num_virtual_tokens": 0}, _file_field("num_virtual_tokens", INT1)),
    ({"num_virtual_tokens": 2.5}, _file_field("num_virtual_tokens", INT1)),
    ({"num_virtual_tokens": DROP}, r"lacks the field 'num_virtual_tokens'"),
    ({"num_transformer_submodules": "1"}, _file_field("num_transformer_submodules", INT1)),
    ({"num_transformer_submodules": True}, _file_field("num_transformer_submodules", INT1)),
    ({"num_transformer_submodules": 2}, r"num_transformer_submodules=2; only 1"),
    ({"modules_to_save": "x"}, _file_field("modules_to_save", "None or a list of strings")),
    ({"task_type": "SEQ_2_SEQ_LM"}, r"task_type='SEQ_2_SEQ_LM'"),
    ({"r": 8}, r"unknown PREFIX_TUNING config fields \['r'\]"),
) + _rows(
    "prompt-file",
    ({"num_virtual_tokens": "4"}, _file_field("num_virtual_tokens", INT1)),
    ({"num_virtual_tokens": 0}, _file_field("num_virtual_tokens", INT1)),
    ({"num_virtual_tokens": True}, _file_field("num_virtual_tokens", INT1)),
    ({"prompt_tuning_init": 5}, _file_field("prompt_tuning_init", "None or a string")),
    ({"prompt_tuning_init": "ZEROS"}, r"prompt_tuning_init='ZEROS' is not one of"),
    ({"num_transformer_submodules": 1.0}, _file_field("num_transformer_submodules", INT1)),
    ({"modules_to_save": 3}, _file_field("modules_to_save", "None or a list of strings")),
    ({"peft_type": "LORA"}, r"peft_type='LORA'; expected 'PROMPT_TUNING'"),
) + _rows(
    "freeze-file",
    ({"trainable_parameters": "0.weight"}, _file_field("trainable_parameters", "a non-empty list of strings")),
    ({"trainable_parameters": []}, _file_field("trainable_parameters", "a non-empty list of strings")),
    ({"trainable_parameters": [1]}, _file_field("trainable_parameters", "a non-empty list of strings")),
    ({"trainable_parameters": DROP}, r"lacks the field 'trainable_parameters'"),
    ({"trainable_parameters": ["nope.weight"]}, r"Sequential has no parameters \['nope.weight'\]"),
    ({"peft_type": "LORA"}, r"peft_type='LORA'; expected 'FREEZE'"),
)


def _cli_rows(kind: str):
    key = lambda k: rf"--config .*run\.(toml|json): key '{k}' must be"  # noqa: E731
    return _rows(
        kind,
        ({"rnak": 4}, r"unknown key\(s\) \['rnak'\] \(did you mean 'rank'\?\); known keys: \["),
        ({"lora.rnak": 4}, r"unknown key\(s\) \['rnak'\]"),
        ({"rank": "4"}, key("rank") + r" an integer >= 1, got '4' \(str\)"),
        ({"rank": 0}, key("rank") + " an integer >= 1"),
        ({"lora.rank": 2.5}, key("rank") + " an integer >= 1"),
        ({"alpha": "16"}, key("alpha") + " a finite number > 0"),
        ({"alpha": INF}, key("alpha") + " a finite number > 0, got inf"),
        ({"dropout": 1.0}, key("dropout") + r" a finite number in \[0, 1\)"),
        ({"lr": "1e-3"}, key("lr") + " a finite number > 0"),
        ({"train.lr": NAN}, key("lr") + " a finite number > 0"),
        ({"steps": DROP, "train.steps": True}, key("steps") + " an integer >= 1, got True"),
        ({"batch-size": 0}, key("batch_size") + " an integer >= 1"),
        ({"grad_accum": 1.5}, key("grad_accum") + " an integer >= 1"),
        ({"warmup_steps": -1}, key("warmup_steps") + " an integer >= 0"),
        ({"seed": "0"}, key("seed") + " an integer >= 0"),
        ({"log_every": 0}, key("log_every") + " an integer >= 1"),
        ({"max_length": 0}, key("max_length") + " None or an integer >= 1"),
        ({"bottleneck": "64"}, key("bottleneck") + " an integer >= 1"),
        ({"num_virtual_tokens": 0}, key("num_virtual_tokens") + " an integer >= 1"),
        ({"grad_checkpointing": "yes"}, key("grad_checkpointing") + " true or false"),
        ({"rslora": 1}, key("rslora") + " true or false"),
        ({"method": "loha"}, r"key 'method'='loha' is not one of \['lora', 'dora'"),
        ({"task": "poems"}, r"key 'task'='poems' is not one of"),
        ({"template": "vicuna"}, r"key 'template'='vicuna' is not one of"),
        ({"on_error": "ignore"}, r"key 'on_error'='ignore' is not one of \['raise', 'skip'\]"),
        ({"dtype": 16}, key("dtype") + " a string"),
        ({"schedule": "step"}, r"key 'schedule'='step' is not one of"),
        ({"device": 0}, key("device") + " a string"),
        ({"targets": 5}, key("targets") + " a string or a list of strings"),
        ({"placement": 3}, key("placement") + " a string"),
        ({"checkpoint": 3}, key("checkpoint") + " None or a string"),
        ({"out": ["a"]}, key("out") + " None or a string"),
        ({"rank": 4, "lora.rank": 4}, r"key 'rank' is given twice \('rank' and 'lora.rank'\)"),
        ({"resume": 3}, key("resume") + " true, false, None or a directory"),
        ({"resume": ""}, key("resume") + " true, false, None or a directory"),
    )


CLI = _cli_rows("cli-toml") + _cli_rows("cli-json")
# modules_to_save (PEFT's field) on every method config that has it, and in every PEFT reader
_MTS = {"lora": "LoraConfig", "ia3": "IA3Config", "adapter": "AdapterConfig", "prefix": "PrefixConfig",
        "prompt": "PromptConfig"}
MODULES_TO_SAVE = sum([_rows(kind, ({"modules_to_save": "score"}, rf"{name}.modules_to_save must be None or a list of "
                                    r"module names, got 'score' \(str\): write \['score'\]"),
                             ({"modules_to_save": [""]}, rf"{name}.modules_to_save must be a list of strings"),
                             ({"modules_to_save": [3]}, rf"{name}.modules_to_save must be a list of strings"))
                       for kind, name in _MTS.items()], []) + sum(
    [_rows(f"{kind}-file", ({"modules_to_save": 5}, _file_field("modules_to_save", "None or a list of strings")))
     for kind in _MTS], [])
BAD = LLAMA + MISTRAL + GPT2 + MODEL + TRAIN + METHODS + PEFT + CLI + MODULES_TO_SAVE


@pytest.mark.parametrize("kind, patch, regex", BAD)
def test_bad_field_is_refused_naming_the_field_and_the_file(kind, patch, regex, tmp_path):
    with pytest.raises(ValueError, match=regex) as info:
        build(kind, patch, tmp_path)
    if kind in HF_PRESET or kind.endswith("-file") or kind.startswith("cli-"):
        file = tmp_path / {"cli-toml": "run.toml", "cli-json": "run.json"}.get(
            kind, "config.json" if kind in HF_PRESET else "adapter_config.json")
        assert str(file) in str(info.value), str(info.value)
    if isinstance(info.value, FieldError):
        assert isinstance(info.value, TypeError)  # callers catching either keep working
    if kind.startswith("cli-"):
        assert isinstance(info.value, ConfigFileError)


GOOD = sum([
    _rows("llama", ({}, None), ({"pad_token_id": -1}, None), ({"eos_token_id": [1, 2]}, None),
          ({"head_dim": None}, None),
          ({"rope_parameters": LLAMA3}, None), ({"rope_parameters": None, "rope_scaling": LLAMA3}, None),
          ({"rms_norm_eps": 1}, None), ({"attention_bias": None}, None)),
    _rows("gpt2", ({}, None), ({"n_inner": None}, None)),
    _rows("mistral", ({}, None), ({"sliding_window": None}, None)),
    _rows("model", ({}, None), ({"eos_token_id": [1, 2], "rope_theta": 500000}, None)),
    _rows("train", ({}, None), ({"lr": 1, "steps": 1, "weight_decay": 0.5}, None), ({"keep_checkpoints": None}, None),
          ({"betas": [0.0, 0.5], "max_grad_norm": None, "resume": False, "out_dir": Path("x")}, None)),
    _rows("lora", ({}, None),
          ({"rank": 1, "alpha": 0.5, "dropout": 0.99, "rslora": True, "targets": "all-linear"}, None)),
    _rows("ia3", ({}, None)),
    _rows("adapter", ({}, None), ({"reduction_factor": 4}, None)),
    _rows("prefix", ({}, None), ({"reparam_hidden": 8}, None)),
    _rows("prompt", ({}, None), ({"init_text": "hi"}, None)),
    _rows("freeze", ({}, None), ({"mode": "last_blocks", "n_blocks": 1}, None)),
    _rows("lora-file", ({}, None), ({"lora_dropout": None}, None), ({"lora_dropout": DROP}, None),
          ({"target_modules": "q_proj|v_proj"}, None), ({"lora_alpha": 16.0}, None),
          ({"use_dora": None, "use_rslora": DROP, "bias": "lora_only", "init_lora_weights": "gaussian"}, None)),
    _rows("ia3-file", ({}, None), ({"feedforward_modules": None, "init_ia3_weights": DROP}, None)),
    _rows("adapter-file", ({}, None), ({"reduction_factor": 16, "bottleneck_size": None}, None)),
    _rows("prefix-file", ({}, None), ({"num_transformer_submodules": 1}, None)),
    _rows("prompt-file", ({}, None), ({"prompt_tuning_init": "SAMPLE_VOCAB"}, None)),
    _rows("freeze-file", ({}, None)),
    sum([_rows(kind, ({"modules_to_save": ["score"]}, None), ({"modules_to_save": ("a", "b.c")}, None),
               ({"modules_to_save": []}, None)) for kind in _MTS], []),
    sum([_rows(f"{kind}-file", ({"modules_to_save": ["classifier", "score"]}, None), ({"modules_to_save": []}, None),
               ({"task_type": "SEQ_CLS", "base_model_name_or_path": "/ckpt"}, None)) for kind in _MTS], []),
    _rows("cli-toml", ({}, None), ({"steps": DROP, "lora.alpha": 8, "train.steps": 2, "targets": ["q_proj"]}, None),
          ({"resume": True, "lr": 1e-3, "rank": 4}, None)),
    _rows("cli-json", ({}, None), ({"batch-size": 2, "template": None, "max_length": None, "resume": "runs/x"}, None)),
], [])


@pytest.mark.parametrize("kind, patch, _", GOOD)
def test_good_values_still_work(kind, patch, _, tmp_path):
    result, _file = build(kind, patch, tmp_path)
    assert result is not None


def test_checked_values_arrive_unchanged(tmp_path):
    hf = tt.models.build("llama-tiny").config.to_hf()
    assert ModelConfig.from_hf({**hf, "pad_token_id": -1}).pad_token_id is None  # older Llama configs: "no pad"
    cfg = lora_config_io.config_from_peft({**PEFT_FILES["lora-file"], "lora_dropout": None, "r": 2, "lora_alpha": 3})
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets) == (2, 3.0, 0.0, ["q_proj", "v_proj"])
    for kind, name in _MTS.items():  # a tuple arrives as a list; the file's list as written ([] as None)
        assert _method_config(kind, {"modules_to_save": ("score",)}).modules_to_save == ["score"], name
        assert _peft_file(tmp_path, f"{kind}-file", {"modules_to_save": ["a.b"]})[0].modules_to_save == ["a.b"]
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert TrainConfig().to_dict()["keep_checkpoints"] == 3
    assert TrainConfig(keep_checkpoints=None).keep_checkpoints is None


def test_every_cli_key_has_a_file_type():
    keys = commands.FINETUNE_KEYS | commands.PARAMS_KEYS | commands.BENCH_KEYS
    assert keys <= set(FILE_VALUES), sorted(keys - set(FILE_VALUES))


def test_load_pretrained_names_the_field(tmp_path):
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    with pytest.raises(ValueError, match=r"config.json.* field 'hidden_size' must be an integer >= 1, got '64'"):
        tt.load_pretrained(tmp_path)


def test_load_pretrained_names_the_file(tmp_path):
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": -1}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + r"\) field 'vocab_size'"):
        tt.load_pretrained(tmp_path)


@pytest.mark.parametrize("patch, regex", [
    ({"r": "four"}, _file_field("r", r"an integer >= 1, got 'four' \(str\)")),
    ({"lora_alpha": INF}, _file_field("lora_alpha", NUM_POS + ", got inf")),
    ({"use_rslora": "yes"}, _file_field("use_rslora", BOOL)),
])
def test_load_adapter_names_the_file_and_field(tmp_path, patch, regex):
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    tt.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **patch}))
    for manifest in tmp_path.glob("*manifest*.json"):  # a recorded size/hash would refuse the edit first
        manifest.unlink()
    fresh = tt.models.build("llama-tiny")
    with pytest.raises(ValueError, match=re.escape(str(file)) + r"\) " + regex):
        tt.load_adapter(fresh, tmp_path)
    assert not any(True for _ in tt.lora.lora_layers(fresh))  # nothing was applied
