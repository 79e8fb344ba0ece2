"""The package surface: the contract's names exist, and `import tinytune` stays light."""
import subprocess
import sys

import tinytune as tt


def test_contract_names_exist():
    for name in ("LoraConfig", "LoRALinear", "LoRAEmbedding", "apply", "merge", "unmerge",
                 "merge_and_unload", "disabled", "state_dict", "load_state_dict"):
        assert callable(getattr(tt.lora, name)), name
    for name in ("count_parameters", "save_adapter", "load_adapter"):
        assert callable(getattr(tt, name)), name
    assert set(tt.__all__) <= set(dir(tt))


def test_public_names_have_docstrings():
    public = [getattr(tt.lora, n) for n in tt.lora.__all__ if callable(getattr(tt.lora, n))]
    public += [tt.count_parameters, tt.save_adapter, tt.load_adapter, tt.ops.lora_linear]
    missing = [getattr(obj, "__name__", repr(obj)) for obj in public if not (obj.__doc__ or "").strip()]
    assert not missing


def test_import_is_light_and_does_not_touch_transformers_or_cuda():
    code = (
        "import sys, time; t = time.perf_counter(); import tinytune; dt = time.perf_counter() - t\n"
        "import torch\n"
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules, 'heavy import'\n"
        "heavy = [m for m in ('triton', 'jinja2', 'matplotlib', 'gguf', 'tensorboard', 'wandb') if m in sys.modules]\n"
        "assert not heavy, f'optional packages imported by import tinytune: {heavy}'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "print(dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 10.0  # torch itself dominates; generous bound for slow CI
