"""A torchrun worker of bench/gpu_check_ddp.py: one job in every process, with the fault a check needs.

    torchrun --standalone --nproc_per_node 2 bench/gpu_check_worker.py SPEC.json

SPEC.json is ``{"job": "train", "model": {ClipCapConfig fields}, "run": {TrainConfig fields}, "results": DIR}``,
optionally with ``"deterministic": true`` (torch's deterministic algorithms), ``"kill_at": S`` (every rank
kills itself with SIGKILL as training step S begins, once all ranks got there: a crash after step S - 1)
or ``"nonfinite": {"rank": R, "step": S}`` (rank R's loss of step S becomes NaN, and so its gradients);
or ``{"job": "extract", "items": [[image_id, caption, path], ...], "shard_size": N, "store": DIR,
"clip": NAME, "dtype": "float16", "device": "cuda"}``.
A training job ends with each rank's weights in ``DIR/rank{R}.safetensors`` and its summary in
``DIR/rank{R}.json``, so that the checks can compare the ranks' replicas.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from clipcap.extraction import ImageItem, extract
from clipcap.files import write_json
from clipcap.model import ClipCap, ClipCapConfig
from clipcap.sources import chunked
from clipcap.training import TrainConfig, train


def inject_faults(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    """Wrap ClipCap.forward to count training steps and act where the spec says; what it saw is returned."""
    seen: dict[str, Any] = {"model": None, "steps": 0}
    forward = ClipCap.forward
    nonfinite = spec.get("nonfinite") or {}

    def faulty_forward(self: ClipCap, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen["model"] = self
        if self.training:
            seen["steps"] += 1
            if seen["steps"] == spec.get("kill_at"):
                dist.barrier()  # every rank is past the previous step and whatever it saved
                os.kill(os.getpid(), signal.SIGKILL)
        loss = forward(self, *args, **kwargs)
        if self.training and rank == nonfinite.get("rank") and seen["steps"] == nonfinite.get("step"):
            loss = loss * float("nan")
        return loss

    ClipCap.forward = faulty_forward
    return seen


def train_job(spec: dict[str, Any], rank: int) -> None:
    if spec.get("deterministic"):  # no atomics in the kernels: two runs can then agree bit for bit
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for it, before its first use
        torch.use_deterministic_algorithms(True)
    seen = inject_faults(spec, rank)
    result = train(TrainConfig(model=ClipCapConfig(**spec["model"]), **spec["run"]))
    results = Path(spec["results"])
    weights = {name: p.detach().cpu().contiguous() for name, p in seen["model"].named_parameters()}
    save_file(weights, results / f"rank{rank}.safetensors")
    write_json(results / f"rank{rank}.json", {"finished": result["finished"], "history": result["history"]})


def extract_job(spec: dict[str, Any]) -> None:
    items = [ImageItem(image_id, [caption], path) for image_id, caption, path in spec["items"]]
    extract(chunked(items, spec["shard_size"]), spec["store"], spec["clip"], device=spec["device"],
            dtype=getattr(torch, spec["dtype"]), batch_size=spec["shard_size"], num_workers=0)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["results"]).mkdir(parents=True, exist_ok=True)
    if spec["job"] == "train":
        train_job(spec, int(os.environ["RANK"]))
    else:
        extract_job(spec)


if __name__ == "__main__":
    main()
