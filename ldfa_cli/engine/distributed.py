"""One code path for one process and for torchrun: DDP over gloo (CPU) or nccl (GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def start(device_type: str) -> World:
    """Join the process group torchrun describes in the environment; a lone process is
    world size 1 and initialises nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(world: World, values: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_flag(world: World, flag: bool, device) -> bool:
    """Rank 0's decision, on every rank (so all stop together)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


def differing_replicas(world: World, model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers (feedback factors included) that are not the
    same on every rank: each tensor's sum and sum of squares in float64, gathered and
    compared exactly. Empty where the replicas agree; on one process, always empty."""
    if not world.distributed:
        return []
    names, stats = [], []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        t = tensor.detach().double()
        names.append(name)
        stats.append(torch.stack([t.sum(), t.square().sum()]))
    mine = torch.stack(stats).to(next(model.parameters()).device)
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    same = torch.stack([(g == gathered[0]).all(1) for g in gathered]).all(0)
    return [n for n, ok in zip(names, same.tolist(), strict=True) if not ok]
