"""The one rule that picks torch or Triton for a hot op (tinytune/ops/backend.py)."""
import pytest
import torch

from tinytune.ops import backend as be


def test_auto_is_torch_on_cpu_and_the_argument_wins_over_the_environment(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(be.ENV_VAR, raising=False)
    assert be.choose_backend(None, cpu) == "torch" and be.choose_backend("auto", cpu) == "torch"
    monkeypatch.setenv(be.ENV_VAR, "torch")
    assert be.choose_backend(None, cpu) == "torch"
    monkeypatch.setattr(be, "triton_installed", lambda: True)
    monkeypatch.setattr(be, "interpreting", lambda: True)
    monkeypatch.setenv(be.ENV_VAR, "triton")
    assert be.choose_backend(None, cpu) == "triton" and be.choose_backend("torch", cpu) == "torch"


def test_bad_names_and_impossible_choices_are_named(monkeypatch):
    cpu = torch.zeros(1)
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of \['auto', 'torch', 'triton'\]"):
        be.choose_backend("cuda", cpu)
    monkeypatch.setenv(be.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"\$TINYTUNE_KERNELS='fast'"):
        be.choose_backend(None, cpu)
    monkeypatch.setattr(be, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        be.choose_backend("triton", cpu)
    monkeypatch.setattr(be, "triton_installed", lambda: True)
    monkeypatch.setattr(be, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        be.choose_backend("triton", cpu)


def test_auto_is_torch_under_torch_compile(monkeypatch):
    monkeypatch.setattr(be, "triton_installed", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cuda_like = torch.zeros(1, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert be.choose_backend("auto", cuda_like) == "torch"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert be.choose_backend("auto", cuda_like) == "triton"
