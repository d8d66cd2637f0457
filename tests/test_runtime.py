"""Where a job runs: without torchrun, one process on the named device."""
import torch

from clipcap.runtime import Processes, pick_device, resolve_device, start_processes


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = start_processes("cpu")
    assert procs == Processes(rank=0, world=1, local_rank=0, local_world=1) and procs.main
    procs.barrier()  # no process group: nothing to wait for
    procs.close()
    assert pick_device("cpu", procs) == torch.device("cpu")
    assert resolve_device("cuda:1") == "cuda:1"  # only auto is resolved
