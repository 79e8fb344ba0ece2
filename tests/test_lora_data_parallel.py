"""LoRA layers under `nn.DataParallel`'s replication (`torch.nn.parallel.replicate`), on the CPU.

A replica holds no parameters: `replicate` sets each parameter's per-device copy with `setattr` under its
registered name ("lora_A", "lora_B_other", ...), which the read-only factor properties used to refuse
(AttributeError on the first multi-GPU forward). Only the CUDA broadcast is replaced here (by views, which keep
the graph to the originals, as Broadcast does); the replication itself is torch's own. Replicas must compute
the original's outputs and, summed, its gradients (float64, to 1e-12).
"""
import sys

import pytest
import torch
import torch.nn as nn

import tinytune as tt

replicate_module = sys.modules["torch.nn.parallel.replicate"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv = nn.Embedding(20, 8), nn.Conv1d(8, 8, 3, padding=1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        h, _ = self.mha(h, h, h)
        return self.q(h) * self.k(h)


@pytest.fixture
def cpu_broadcast(monkeypatch):
    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.view_as(t) for t in tensors] for _ in devices])


@pytest.mark.parametrize("mode", ["off", "on"])
def test_replicas_compute_the_originals_outputs_and_gradients(cpu_broadcast, mode):
    torch.manual_seed(0)
    model = Net().double()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["emb", "conv", "mha", "q", "k"]))
    tt.lora.add_adapter(model, "other", tt.lora.LoraConfig(rank=3, alpha=3, targets=["q", "k"]))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            for name, p in layer.named_parameters(recurse=False):
                if "B" in name:
                    p.normal_(0.0, 0.5)
    tt.lora.share_shrink(model, mode)
    ids = torch.randint(0, 20, (2, 5))
    model(ids)  # sharers learned ("on")
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(model(ids).square().sum(), params)
    replicas = replicate_module.replicate(model, [0, 1])
    outputs = [replica(ids) for replica in replicas]
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    got = torch.autograd.grad(sum(out.square().sum() for out in outputs) / 2, params)
    for p, w, g in zip(params, want, got):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_factor_is_still_read_only_on_a_plain_layer():
    layer = tt.lora.LoRALinear(nn.Linear(4, 4), rank=2, alpha=2)
    with pytest.raises(TypeError, match="cannot assign"):
        layer.lora_A = torch.zeros(2, 4)  # nn.Module's own refusal: lora_A is a registered parameter
    with pytest.raises(AttributeError, match="lora_A of a LoRALinear is the active adapter's parameter"):
        type(layer).lora_A.fset(layer, torch.zeros(2, 4))  # the setter itself, reached where nothing is registered
    assert "lora_A" not in layer.__dict__
