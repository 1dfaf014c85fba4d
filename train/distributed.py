"""torchrun / DDP set-up: one process per device, env:// rendezvous, NCCL on CUDA and gloo on CPU."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init(device_option: str) -> DistInfo:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain `python -m train` is rank 0 of 1."""
    want_cuda = device_option == "cuda" or (device_option == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: torch.cuda.is_available() is False on this machine")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://", **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


_PRIMARY = True


def set_primary(primary: bool) -> None:
    global _PRIMARY
    _PRIMARY = primary


def log(*parts, file=None) -> None:
    """print() on the primary rank only."""
    if _PRIMARY:
        print(*parts, file=file or sys.stdout, flush=True)
