"""Where a job runs: without torchrun, one process on the named device; under torchrun, each process on
the GPU of its LOCAL_RANK. A device that is not there is a one-line error (GPUs are stood in for here)."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from clipcap.files import ClipCapError
from clipcap.runtime import Processes, pick_device, resolve_device, start_processes


@pytest.fixture
def two_gpus(monkeypatch):
    """As if on a machine with two CUDA GPUs, as far as choosing a device goes; returns the GPUs made current."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield chosen
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # pick_device turns TF32 on


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = start_processes("cpu")
    assert procs == Processes(rank=0, world=1, local_rank=0, local_world=1) and procs.main
    procs.barrier()  # no process group: nothing to wait for
    procs.close()
    assert pick_device("cpu", procs) == torch.device("cpu")
    assert resolve_device("auto") == "cpu"  # this machine has no GPU
    for name, message in [("bogus", "--device bogus: not a device name; use auto (a GPU when there is one), cpu"),
                          ("cuda", "--device cuda: no cuda device on this machine; use --device cpu (or auto)"),
                          ("cuda:7", "--device cuda:7: no cuda device on this machine")]:
        with pytest.raises(ClipCapError) as error:
            resolve_device(name)
        assert str(error.value).startswith(message)


def test_a_gpu_that_is_not_there_is_named(two_gpus):
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ClipCapError, match=r"^--device cuda:7: this machine has 2 cuda device\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:7")
    with pytest.raises(ClipCapError, match="^--device mps: no mps device on this machine"):
        resolve_device("mps")
    assert pick_device("cuda:1", Processes()) == torch.device("cuda", 1) and two_gpus == [torch.device("cuda", 1)]


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(two_gpus):
    procs = Processes(rank=3, world=4, local_rank=1, local_world=2)
    assert pick_device("cuda", procs) == pick_device("auto", procs) == torch.device("cuda", 1)
    with pytest.raises(ClipCapError, match="^--device cuda:0: under torchrun each process takes the GPU of its "
                                           "LOCAL_RANK; pass --device cuda"):
        pick_device("cuda:0", procs)  # every process on one GPU
    with pytest.raises(ClipCapError, match=r"^LOCAL_RANK 2: this machine has 2 GPU\(s\); start at most that many"):
        pick_device("cuda", Processes(rank=2, world=3, local_rank=2, local_world=3))


def test_torchrun_processes_join_nccl_bound_to_their_gpu(two_gpus, monkeypatch):
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append({"backend": backend,
                                                                                              **kwargs}))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert start_processes("auto", timeout=timedelta(hours=2)) == Processes(rank=1, world=2, local_rank=1,
                                                                            local_world=2)
    assert joined == [{"backend": "nccl", "timeout": timedelta(hours=2), "device_id": torch.device("cuda", 1)}]
    with pytest.raises(ClipCapError, match="^--device cuda:1: under torchrun"):
        start_processes("cuda:1")  # refused before joining: no process waits for it at a barrier
    assert len(joined) == 1
