"""Run by `test_distributed.py` under `torchrun --nproc_per_node 2`: two CPU processes train with
`fit` (gloo DDP), and rank 0 writes what the test compares against a one-process run.

Also imported by the test for the shared model, data and config, so both runs start identical.
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import tinytune as tt
from tinytune.train import TrainConfig, fit


def model():
    """llama-tiny with rank-4 LoRA on every linear layer; the same weights on every call."""
    m = tt.models.build("llama-tiny")
    torch.manual_seed(1)
    tt.lora.apply(m, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    return m


def data(n: int = 40, seed: int = 0):
    """Counting sequences of varied lengths (so ranks score different numbers of tokens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(0, 16, (1,), generator=gen))
        ids = [(start + k) % 16 for k in range(5 + (i * 7) % 11)]
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def preference_data(n: int = 12, seed: int = 0) -> list[dict]:
    """Preference examples of random ids: pairs and rankings of 3 (so ranks hold different pair counts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 200, (k,), generator=gen).tolist()  # noqa: E731
    out = []
    for i in range(n):
        k = 2 + i % 2
        pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        out.append({"prompt_ids": ids(3 + i % 4), "completion_ids": [ids(2 + (i + j) % 3) + [2] for j in range(k)],
                    "chosen": [a for a, _ in pairs], "rejected": [b for _, b in pairs], "margin": [None] * len(pairs),
                    "group": i})
    return out


def dpo_config(world_size: int) -> "tt.rlhf.DPOConfig":
    """DPO with a global batch of 8 preference examples per step whatever the number of processes."""
    return tt.rlhf.DPOConfig(lr=1e-2, steps=3, batch_size=8 // (2 * world_size), grad_accum=2, log_every=1)


def config(world_size: int, out_dir=None, **kw) -> TrainConfig:
    """The global batch is 8 examples per step whatever the number of processes."""
    base = dict(lr=1e-2, steps=4, batch_size=8 // (2 * world_size), grad_accum=2, log_every=1,
                eval_every=2, out_dir=out_dir, schedule="cosine", warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def trainable(m):
    return {k: v.detach().contiguous() for k, v in m.named_parameters() if v.requires_grad}


def main(out: Path) -> None:
    import torch.distributed as dist
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    # 1) plain run with evaluation, checkpoints and logs in out/plain
    m = model()
    h = fit(m, data(), config(world, out / "plain"), eval_data=data(10, seed=1))
    results["plain"] = {"losses": h.losses, "eval_losses": h.eval_losses, "checkpoint": str(h.checkpoint)}
    if int(os.environ["RANK"]) == 0:
        save_file(trainable(m), str(out / "plain.safetensors"))
    # 2) gradient checkpointing, stopped by a callback at step 2 (checkpoint written) and resumed to 4
    m = model()
    fit(m, data(), config(world, out / "resumed", grad_checkpointing=True, eval_every=0),
        callbacks=[lambda step, history: step == 2])
    m = model()
    h = fit(m, data(), config(world, out / "resumed", grad_checkpointing=True, eval_every=0, resume=True))
    results["resumed"] = {"losses": h.losses}
    rank = int(os.environ["RANK"])
    if rank == 0:
        save_file(trainable(m), str(out / "resumed.safetensors"))
    # 3) FSDP2: every decoder block and the root sharded over the two processes, no checkpoints
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # FSDP2 is public from torch 2.6
        fully_shard = None
    results["fsdp"] = None
    if fully_shard is not None:
        m = model()
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        h = fit(m, data(), config(world), eval_data=data(9, seed=1))  # 9: the ranks hold 5 and 4 examples
        results["fsdp"] = {"losses": h.losses, "eval_losses": h.eval_losses}
        full = {k: v.full_tensor() for k, v in tt.lora.state_dict(m).items()}  # as docs/training.md shows
        if rank == 0:
            save_file(full, str(out / "fsdp.safetensors"))
    # 4) DPO: the policy through DDP, the reference (adapters disabled) through the plain module
    m = model()
    h = tt.rlhf.dpo(m, preference_data(), dpo_config(world))
    results["dpo"] = {"losses": h.losses, "metrics": h.metrics}
    if rank == 0:
        save_file(trainable(m), str(out / "dpo.safetensors"))
    (out / f"results-rank{rank}.json").write_text(json.dumps(results))
    assert dist.is_initialized(), "the group fit created stays up for later fits and the script"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
