"""Where a job runs: the device, and the torchrun processes that share it out."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name is kept."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Processes:
    """This process's place among torchrun's: one process (rank 0 of 1) without torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine, which share its CPUs

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device: str, timeout: timedelta | None = None) -> Processes:
    """Join the torchrun process group when launched by torchrun (NCCL for a GPU device, else gloo)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return Processes(dist.get_rank(), world, int(env.get("LOCAL_RANK", "0")), int(env.get("LOCAL_WORLD_SIZE", world)))


def pick_device(name: str, procs: Processes) -> torch.device:
    """The device by name (``auto`` included); a bare ``cuda`` is this process's GPU, made current."""
    device = torch.device(resolve_device(name))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", procs.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    return device
