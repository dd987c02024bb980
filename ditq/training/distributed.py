"""Processes and devices: one process alone, or one of several ranks started by torchrun (DDP).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 we
join its process group (NCCL on CUDA, gloo on CPU) and leave it again at the end of training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ditq.fileformat import check_device


@dataclass
class DistEnv:
    """Where this process sits: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str | None) -> DistEnv:
    """Join the torchrun process group (WORLD_SIZE > 1 in the environment) or run alone.

    Backend NCCL on CUDA, gloo on CPU; an already-initialised group is used as it is. A device this machine
    lacks is a ValueError naming it.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = check_device(torch.device("cuda", local_rank))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), dev, owns)
    return DistEnv(0, 1, dev, False)


@torch.no_grad()
def check_ranks_agree(ema: nn.Module, env: DistEnv) -> None:
    """Before shipping rank 0's EMA, make sure every rank computed the same one (catches DDP desync)."""
    if env.world_size == 1:
        return
    mine = torch.cat([p.detach().reshape(-1) for p in ema.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0.0 if torch.equal(mine, reference) else 1.0], device=mine.device)
    dist.all_reduce(mismatch)
    if mismatch.item():
        raise RuntimeError(
            f"EMA weights differ between ranks on {int(mismatch.item())} rank(s): DDP went out of sync"
        )
