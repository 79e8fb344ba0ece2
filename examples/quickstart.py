"""LoRA on a small model in a few lines: the parameter table, a few training steps, merge, and
outputs that agree before and after merging. Runs in seconds on a CPU.

    python examples/quickstart.py
"""
import torch
import torch.nn as nn

import tinytune as tt


class Block(nn.Module):
    """A user's own module: attention-style projections and an MLP."""

    def __init__(self, d=64):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.q_proj(x)) * self.v_proj(x))


def main():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(64, 8))
    x, target = torch.randn(256, 64), torch.randint(0, 8, (256,))

    names = tt.lora.apply(model, tt.lora.LoraConfig(rank=8, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"]))
    print(f"LoRA on {len(names)} modules: {names}\n")
    print(tt.count_parameters(model), "\n")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 31):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        before = model(x)
        tt.lora.merge_and_unload(model)
        after = model(x)
    diff = (after - before).abs().max().item()
    print(f"\nmerged into plain nn.Linear layers: max |merged - unmerged| = {diff:.2e} "
          f"(output scale {before.abs().max().item():.2f})")
    assert diff <= 1e-5 * before.abs().max().item(), "merged output differs"
    print("outputs equal: OK")


if __name__ == "__main__":
    main()
