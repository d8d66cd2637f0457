"""Checks of bench/gpu_check.py across processes: DDP training, a kill and a resume, a non-finite loss on
one rank, and extraction across ranks.

Each is a torchrun launch of bench/gpu_check_worker.py; the ranks write their weights, and the checks
compare them. DDP keeps the replicas equal bit for bit, so any difference between ranks is a bug. A
kill and a resume must end with the weights of the uninterrupted run, bit for bit in float32 with
dropout on: it restores every rank's own RNG states. These runs use torch's deterministic algorithms
(atomic additions would otherwise change the last bits from run to run), and two processes: the
all-reduced sum of two gradients does not depend on DDP's bucketing, which a resumed run rebuilds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import FAIL, SKIPPED, Check, Context, logged, training_features, verdict
from gpu_check_inference import SHARD_SIZE, compare, encode, image_items, store_path
from safetensors.torch import load_file

from clipcap.data import load_features
from clipcap.files import write_json
from clipcap.model import ClipCapConfig

WORKER = Path(__file__).with_name("gpu_check_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
STEPS_PER_EPOCH, BATCH_SIZE, SAVE_EVERY = 8, 4, 5
RESUME_PROCESSES = 2  # bit-identical resumes need a sum of two gradients (see above)
TIMEOUT_S = 600  # a launch takes well under a minute on a GPU, a few on a busy CPU
DDP, RESUME = "DDP training", "kill and resume = uninterrupted (float32, dropout)"
SKIP, EXTRACT = "--skip_nonfinite, NaN loss on one rank (float16)", "extraction across ranks = one process"


@dataclass
class Launch:
    """A finished torchrun launch of the worker: its exit status, and each rank's results."""

    rc: int
    results: Path
    log: Path
    processes: int

    def failure(self) -> str:
        return f"torchrun exited with {self.rc}: {last_error(self.log)} (log: {self.log})"

    def weights(self) -> list[dict[str, torch.Tensor]]:
        return [load_file(self.results / f"rank{r}.safetensors") for r in range(self.processes)]

    def history(self) -> list[dict[str, Any]]:
        """Rank 0's log records."""
        return json.loads((self.results / "rank0.json").read_text())["history"]


def torchrun(ctx: Context, name: str, spec: dict[str, Any], processes: int) -> Launch:
    """Launch the worker on ``processes`` processes and wait for it; a launch that hangs (a collective
    that never completes) is killed with all its processes after ``TIMEOUT_S``."""
    folder = ctx.work / "ddp" / name
    results, log = folder / "results", ctx.logs / f"ddp_{name}.log"
    write_json(folder / "spec.json", {**spec, "results": str(results)})
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [*TORCHRUN, "--nproc_per_node", str(processes), str(WORKER), str(folder / "spec.json")]
    with open(log, "w") as out:
        launch = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = launch.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)  # torchrun and its workers: the new session's group
            launch.wait()
            print(f"gpu_check: no result after {TIMEOUT_S} s (a hang?): killed", file=out)
            rc = launch.returncode
    return Launch(rc, results, log, processes)


def last_error(log: Path) -> str:
    """The last line of a log that names an error, for the table."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b.*:|^error:|^gpu_check:|Signal \d+ \(SIG", line)
              and "ChildFailedError" not in line]  # torchrun's summary names its root cause's signal, if any
    return (errors or [line for line in lines if line] or ["(empty log)"])[-1][:300]


def train_spec(ctx: Context, name: str, processes: int, precision: str, **extra: Any) -> dict[str, Any]:
    """Fine-tuning the tiny GPT-2 (dropout on) for two epochs of 8 steps, the latest state saved every 5 steps."""
    data = training_features(ctx.work, ctx.backbones.dim, BATCH_SIZE * processes * STEPS_PER_EPOCH)
    model = ClipCapConfig(lm=ctx.backbones.gpt2, prefix_length=4)
    run = dict(data=data, out_dir=str(ctx.work / "ddp" / name / "run"), batch_size=BATCH_SIZE, epochs=2,
               precision=precision, device=ctx.device, warmup=4, lr=1e-3, log_every=4, save_latest_every=SAVE_EVERY,
               num_workers=0, clip_model=ctx.backbones.vit_clip)
    return {"job": "train", "model": dataclasses.asdict(model), "run": run, **extra}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The weights that are not bit-identical."""
    return [k for k in a if k not in b or not torch.equal(a[k], b[k])] + [k for k in b if k not in a]


def replica_problems(weights: list[dict[str, torch.Tensor]]) -> list[str]:
    """Non-finite weights on a rank, or ranks whose weights differ from rank 0's."""
    problems = [f"rank {r} has non-finite weights" for r, w in enumerate(weights)
                if not all(torch.isfinite(t).all() for t in w.values())]
    for r, w in enumerate(weights[1:], start=1):
        differ = differences(weights[0], w)
        if differ:
            problems.append(f"rank {r}'s weights differ from rank 0's ({len(differ)} tensors, e.g. {differ[0]})")
    return problems


def ddp_training(run: Launch) -> Check:
    """A DDP run: finite losses, replicas equal bit for bit; its samples/s after the first log window."""
    if run.rc != 0:
        return Check("multi-GPU", DDP, FAIL, run.failure())
    history = [r for r in run.history() if "loss" in r]
    problems = replica_problems(run.weights())
    if not all(math.isfinite(r["loss"]) for r in history):
        problems.append(f"non-finite losses {[r['loss'] for r in history]}")
    timed = history[1:] or history
    figures = {"processes": run.processes, "samples/s": round(sum(r["samples_per_s"] for r in timed) / len(timed), 1)}
    return verdict("multi-GPU", DDP, problems, f"{run.processes} processes, {len(history)} log windows, finite "
                   "losses, replicas bit-identical", figures)


def kill_and_resume(ctx: Context, uninterrupted: Launch) -> Check:
    """The uninterrupted run again, killed (SIGKILL) as the step after a saved one begins, then resumed."""
    if uninterrupted.rc != 0:
        return Check("multi-GPU", RESUME, FAIL, f"the uninterrupted run failed: {uninterrupted.failure()}")
    kill_at = SAVE_EVERY + 1
    spec = train_spec(ctx, "killed", RESUME_PROCESSES, "fp32", deterministic=True)
    killed = torchrun(ctx, "killed", {**spec, "kill_at": kill_at}, RESUME_PROCESSES)
    if killed.rc == 0:
        return Check("multi-GPU", RESUME, FAIL, f"the run was not killed at step {kill_at} (log: {killed.log})")
    spec["run"]["resume"] = spec["run"]["out_dir"]
    resumed = torchrun(ctx, "resumed", spec, RESUME_PROCESSES)
    if resumed.rc != 0:
        return Check("multi-GPU", RESUME, FAIL, resumed.failure())
    problems = []
    for r, (whole, parts) in enumerate(zip(uninterrupted.weights(), resumed.weights())):
        differ = differences(whole, parts)
        if differ:
            problems.append(f"rank {r}: {len(differ)} tensors differ from the uninterrupted run's (e.g. {differ[0]})")
    return verdict("multi-GPU", RESUME, problems, f"killed at step {kill_at}, resumed from step {SAVE_EVERY}: every "
                   "rank's weights bit-identical to the uninterrupted run's", {})


def training_across_ranks(ctx: Context) -> list[Check]:
    """DDP training, and a kill and a resume against the uninterrupted run (which is the DDP run on 2 processes)."""
    uninterrupted = torchrun(ctx, "uninterrupted", train_spec(ctx, "uninterrupted", RESUME_PROCESSES, "fp32",
                                                             deterministic=True), RESUME_PROCESSES)
    ddp = uninterrupted if ctx.processes == RESUME_PROCESSES else \
        torchrun(ctx, "ddp", train_spec(ctx, "ddp", ctx.processes, "fp32"), ctx.processes)
    return [ddp_training(ddp), kill_and_resume(ctx, uninterrupted)]


def nonfinite_on_one_rank(ctx: Context) -> Check:
    """The last rank's loss of step 3 is NaN: every rank must skip that step together and stay equal."""
    bad = {"rank": ctx.processes - 1, "step": 3}
    spec = train_spec(ctx, "nonfinite", ctx.processes, "fp16", nonfinite=bad)
    spec["run"].update(skip_nonfinite=True, epochs=1)
    run = torchrun(ctx, "nonfinite", spec, ctx.processes)
    if run.rc != 0:
        return Check("multi-GPU", SKIP, FAIL, run.failure())
    skipped = max((r.get("skipped_nonfinite", 0) for r in run.history()), default=0)
    return verdict("multi-GPU", SKIP, replica_problems(run.weights()), f"rank {bad['rank']}'s loss NaN at step "
                   f"{bad['step']}: the run went on, every rank's weights finite and bit-identical",
                   {"skipped steps logged": skipped})


def extraction_across_ranks(ctx: Context) -> Check:
    """The ViT CLIP in float16 over the ranks, against the same extraction in one process."""
    items = image_items(ctx)
    store = ctx.work / "ddp" / "extract" / "store"
    spec = {"job": "extract", "items": [[item.image_id, item.captions[0], item.path] for item in items],
            "shard_size": SHARD_SIZE, "store": str(store), "clip": ctx.backbones.vit_clip, "dtype": "float16",
            "device": ctx.device}
    run = torchrun(ctx, "extract", spec, ctx.processes)
    if run.rc != 0:
        return Check("multi-GPU", EXTRACT, FAIL, run.failure())
    one = store_path(ctx, "ViT CLIP", "float16")
    with logged(ctx.logs / "extraction.log"):
        encode(ctx, ctx.backbones.vit_clip, "float16", one)  # kept from the extraction checks when they ran
    problems, error = compare(load_features(one), load_features(store), tolerance=2e-3)
    return verdict("multi-GPU", EXTRACT, problems, f"{len(items)} photos in {math.ceil(len(items) / SHARD_SIZE)} "
                   f"shards over {ctx.processes} processes", {"max relative error": round(error, 5)})


def ddp_checks(ctx: Context) -> list[Check]:
    names = (DDP, RESUME, SKIP, EXTRACT)
    if ctx.processes < 2:
        why = (f"needs 2 or more GPUs; this machine has {torch.cuda.device_count()}" if ctx.cuda else
               "needs --processes 2 or more")
        return [Check("multi-GPU", name, SKIPPED, why) for name in names]
    return [*training_across_ranks(ctx), nonfinite_on_one_rank(ctx), extraction_across_ranks(ctx)]
