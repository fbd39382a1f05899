"""Data parallelism under ``torchrun``: process group, DDP wrapping, sums across ranks.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them this is one
process and every helper is a no-op. Gloo on CPU, NCCL on CUDA. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes (once); a lone process gets World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """One GPU per process: cuda becomes cuda:LOCAL_RANK."""
    if device.type == "cuda" and world.active and device.index is None:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters. ``find_unused_parameters``: a text-only batch
    leaves the projector without gradients, which plain DDP would wait for forever."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else nullcontext()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
