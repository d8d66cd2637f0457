"""train.py's command under torchrun, with what the DDP tests of test_training.py need to see.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_worker.py TRAIN_FLAGS...

``CLIPCAP_TEST_NAN=RANK:STEP`` gives that process NaN embeddings at that optimizer step: a batch
whose loss is non-finite in one process only. Each process saves its final weights and RNG state
to ``OUT_DIR/rank{RANK}.pt`` and prints, last, whether it left the process group.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from clipcap import training
from clipcap.cli import run
from clipcap.cli.train import main as train_main


def nan_batch_at(step: int):
    """training.train_step, except that optimizer step ``step`` gets NaN embeddings."""
    real_step = training.train_step

    def train_step(run, micro_batches, captions):
        if run.state["global_step"] + 1 == step:
            micro_batches = [b._replace(embeddings=torch.full_like(b.embeddings, float("nan"))) for b in micro_batches]
        return real_step(run, micro_batches, captions)

    return train_step


def saving_each_process():
    """training.summary, after saving this process's weights and RNG state."""
    real_summary = training.summary

    def summary(run, finished):
        torch.save({"weights": run.model.state_dict(), "rng": torch.get_rng_state()},
                   Path(run.cfg.out_dir) / f"rank{run.procs.rank}.pt")
        return real_summary(run, finished)

    return summary


def main() -> None:
    """train.py's command in this process, as torchrun's environment places it."""
    rank = int(os.environ["RANK"])
    if "CLIPCAP_TEST_NAN" in os.environ:
        nan_rank, nan_step = map(int, os.environ["CLIPCAP_TEST_NAN"].split(":"))
        if rank == nan_rank:
            training.train_step = nan_batch_at(nan_step)
    training.summary = saving_each_process()
    try:
        run(train_main)
    finally:
        print(f"rank {rank}: process group {'still joined' if dist.is_initialized() else 'left'}", flush=True)


if __name__ == "__main__":
    main()
