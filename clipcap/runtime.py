"""Where a job runs: the device, and the torchrun processes that share it out."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .files import ClipCapError

DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda, cuda:1 ..."


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name is checked against this
    machine, so that a device that is not there is a one-line error naming ``--device``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ClipCapError(f"--device {name}: not a device name; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return name
    accelerator = torch.accelerator.current_accelerator()  # None on a machine without one
    if accelerator is None or accelerator.type != device.type:
        raise ClipCapError(f"--device {name}: no {device.type} device on this machine; use --device cpu "
                           "(or auto)")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ClipCapError(f"--device {name}: this machine has {count} {device.type} device(s), "
                           f"{device.type}:0 to {device.type}:{count - 1}")
    return name


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


def torchrun_place() -> Processes:
    """This process's place as torchrun's environment gives it (before joining the process group)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Processes(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                     int(env.get("LOCAL_WORLD_SIZE", world)))


def start_processes(device: str, timeout: timedelta | None = None) -> Processes:
    """Join the torchrun process group when launched by torchrun: NCCL bound to this process's GPU when
    ``device`` is one (checked first, so a bad ``--device`` fails alone instead of at a barrier), else gloo."""
    place = torchrun_place()
    if place.world == 1 or dist.is_initialized():
        return place
    chosen = pick_device(device, place)
    if chosen.type == "cuda":
        dist.init_process_group("nccl", timeout=timeout, device_id=chosen)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return place


def pick_device(name: str, procs: Processes) -> torch.device:
    """The device by name (``auto`` included); a bare ``cuda`` is this process's GPU, made current.

    Under torchrun every process takes the GPU of its LOCAL_RANK: a named ``cuda:N`` would put them all
    on one GPU, and is refused.
    """
    device = torch.device(resolve_device(name))
    if device.type != "cuda":
        return device
    if procs.world > 1 and device.index is not None:
        raise ClipCapError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                           "pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if device.index is None:
        if procs.local_rank >= torch.cuda.device_count():
            raise ClipCapError(f"LOCAL_RANK {procs.local_rank}: this machine has {torch.cuda.device_count()} "
                               "GPU(s); start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", procs.local_rank)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    return device
