"""Multi-process data parallelism for `fit`: who this process is, and the few collectives the loop needs.

`fit` calls `setup(device)`. Launched by `torchrun` (WORLD_SIZE > 1 in the environment), or with a process
group already initialised by the caller, it trains with `DistributedDataParallel`: every rank sees the
same example order, takes its own slice of each optimizer step's global batch, and gradients are summed
across ranks in backward. Otherwise `setup` returns a single-process `Distributed` whose collectives do
nothing, so the loop has one code path.

Backends: gloo on the CPU, nccl on CUDA (each rank on `cuda:LOCAL_RANK`). A group `setup` creates stays
initialised after `fit` returns (a second `fit` reuses it, and the script may call collectives such as
`torch.distributed.barrier()`), and ends with the process (or the script's own
`torch.distributed.destroy_process_group()`). It is not torn down after each run because re-creating a
group under torchrun's store after destroying one can hang.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Distributed:
    """This process's place in the run.

    Attributes:
        rank: this process's index, 0..world_size-1.
        world_size: processes training together (1: plain single-process training).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in `DistributedDataParallel` when several processes train; `model` itself otherwise.

        DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts equal.
        A model already sharded by FSDP (`torch.distributed.fsdp.fully_shard`) syncs its own gradients
        and is returned as it is.
        """
        if not self.active or is_fsdp(model):
            return model
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def my_slice(self, items: list) -> list:
        """This rank's contiguous share of a global batch (`len(items)` is a multiple of world_size)."""
        per = len(items) // self.world_size
        return items[self.rank * per:(self.rank + 1) * per]

    def sum(self, values: list[float], device: str = "cpu") -> list[float]:
        """Elementwise sum of `values` over all ranks (one all-reduce; `values` itself when alone)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled over the group; small objects only)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing when alone)."""
        if self.active:
            dist.barrier()


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` (or a submodule) was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _collective_device(device: str) -> str:
    # nccl reduces CUDA tensors only; gloo prefers CPU ones.
    return "cuda" if device == "cuda" and dist.get_backend() == "nccl" else "cpu"


def setup(device: str = "cpu") -> Distributed:
    """This process's `Distributed`, initialising the process group when launched by `torchrun`.

    Args:
        device: the run's `TrainConfig.device`; "cuda" picks nccl and `cuda:LOCAL_RANK`.

    Raises:
        RuntimeError: WORLD_SIZE > 1 but RANK / MASTER_ADDR are missing (not started by `torchrun`).
    """
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} not set: start multi-process training with "
                           f"`torchrun --nproc_per_node {world} script.py`")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def no_sync(model: nn.Module, skip: bool):
    """`model.no_sync()` when `skip` and `model` is DDP: no all-reduce on accumulation micro-batches."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
