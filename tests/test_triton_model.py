"""A whole LoRA training step on the Triton kernels (under the interpreter here): every kernel in place at once.

The kernel tests (test_triton_lora.py, test_triton_loss.py) check each op alone; this checks them wired into
a model: the LoRA side products on every linear (q/k/v and gate/up through the shared shrink, "auto" on the
Triton backend), the fused cross-entropy of `CausalLM(labels=...)`, the token log-probs RL uses, and
`tt.train.fit`. Against the same step with `TINYTUNE_KERNELS=torch`, without dropout (the two backends draw
different, equally valid, masks): loss to 1e-5 relative, gradients to 1e-4 of their largest entry (fp32;
the kernels and torch sum in other orders). Tiny sizes: the interpreter costs per program, not per flop.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

pytest.importorskip("triton")
import tinytune as tt  # noqa: E402
from tinytune.ops.backend import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                 reason="Triton needs its interpreter (TRITON_INTERPRET=1) or a CUDA device")]
if DEVICE == "cuda":  # compiled kernels: part of benchmarks/gpu_check.sh's `-m gpu` run
    pytestmark.append(pytest.mark.gpu)


def lora_model(dropout: float = 0.0):
    torch.manual_seed(0)
    model = tt.models.build("llama-tiny", num_layers=1).to(DEVICE)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, dropout=dropout, targets="all-linear",
                                            exclude=["lm_head"]))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            layer.lora_B.normal_(0.0, 0.05)
    return model.train()


def step(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_on_the_kernels_equals_the_torch_path(monkeypatch):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TINYTUNE_KERNELS", backend)
        model = lora_model()
        step(model, ids)  # the first step learns the q/k/v and gate/up sharers
        results[backend] = step(model, ids)
        attention = model.model.layers[0].self_attn
        assert attention.q_proj._shrink_group.sharers == ({0, 1, 2} if backend == "triton" else set())
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=0)
    assert grads_k.keys() == grads_t.keys() and len(grads_k) == 14
    for name, want in grads_t.items():
        err = (grads_k[name] - want).abs().max() / want.abs().max()
        assert err <= 1e-4, f"{name}: {err:.1e}"


def test_token_logprobs_on_the_kernels_equal_the_torch_path(monkeypatch):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TINYTUNE_KERNELS", backend)
        model = lora_model()
        logprobs, entropy = tt.rlhf.token_logprobs(model, ids, return_entropy=True)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        out[backend] = (logprobs.detach(), entropy.detach(), model.model.layers[0].mlp.up_proj.lora_A.grad)
    for got, want in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fit_trains_on_the_kernels_with_dropout(monkeypatch):
    monkeypatch.setenv("TINYTUNE_KERNELS", "triton")
    model = lora_model(dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": list(range(3, 15)), "labels": list(range(3, 15))},
            {"input_ids": list(range(20, 32)), "labels": list(range(20, 32))}]
    history = tt.train.fit(model, data, tt.train.TrainConfig(steps=2, batch_size=2, lr=1e-2, log_every=1),
                           stream=open(os.devnull, "w"))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in history.losses) and len(history.losses) == 2
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, name  # adapters trained, the frozen base untouched
