"""Shared test set-up: seeded RNG, default dtype restored, small model builders, the demo run once."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

# Without a GPU the Triton kernels are tested in Triton's interpreter, which must be chosen before anything
# imports triton (torch._dynamo does, when the first compile test runs): so here, once, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_restore_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def full_demo(tmp_path_factory):
    """`python -m tinytune demo` as a user runs it (pre-training included, ~25 s on 2 cores), once per
    session: (its stdout, the cache directory holding the pre-trained base, the output directory)."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TINYTUNE_CACHE": str(root / "cache")}
    cmd = [sys.executable, "-m", "tinytune", "demo", "--out", str(root / "out")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout, root / "cache", root / "out"


class TinyAttention(nn.Module):
    """A user's own module tree with Llama-style names."""

    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.o_proj(att @ v)


class TinyLM(nn.Module):
    """Embedding -> 2 blocks (attention + MLP) -> tied-free lm_head."""

    def __init__(self, vocab=32, d=16, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"self_attn": TinyAttention(d), "mlp": nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))})
            for _ in range(layers)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["self_attn"](h)
            h = h + layer["mlp"](h)
        return self.lm_head(h)


@pytest.fixture
def tiny_lm():
    return TinyLM()
