"""How long a row's training will take here: a few real steps of its own training command, projected.

The row's train.py command is parsed as train.py parses it and run in this process for a few steps
with ``--max_steps`` on synthetic features of the row's width and COCO-like captions (the real
features may not exist yet); the seconds per step, times the steps per epoch of the row's data, times
its epochs, give the projection. With several GPUs the steps run on one and the projection assumes the
processes scale linearly. Feature extraction and scoring are not included: on a GPU they take minutes
where training takes hours.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .annotations import read_annotations
from .checkpoint import CLIP_BY_WIDTH
from .files import ClipCapError
from .stages import Plan, Step, resolve

WORDS = ("a man woman dog cat group of people sitting standing on top the table street with next to in front red blue "
         "white black green large small two three old young is are riding holding playing eating plate pizza bus "
         "train car bike field grass water beach snow room kitchen bed tree sign clock").split()
WIDTH_OF = {name: width for width, name in CLIP_BY_WIDTH.items()} | {"ViT-B/16": 512, "RN101": 512, "RN50x16": 768,
                                                                     "google/siglip2-so400m-patch14-224": 1152}


@dataclass
class Projection:
    """A row's measured training speed and what it projects to."""

    row: str
    seconds_per_step: float
    steps_per_epoch: int | None  # None: the number of training captions is not known yet
    epochs: int
    processes: int

    @property
    def seconds(self) -> float | None:
        return None if self.steps_per_epoch is None else self.seconds_per_step * self.steps_per_epoch * self.epochs

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": self.seconds}


def coco_like_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(5, round(rng.gauss(10.5, 2.5))))) + "."


def processes(step: Step) -> int:
    """The number of processes a command runs: torchrun's ``--nproc_per_node``, else one."""
    value = step.flag("--nproc_per_node")
    return int(value) if value else 1


def training_captions(plan: Plan) -> int | None:
    """How many captions the row trains on: from its features when they exist, else from its data."""
    from .data import load_features

    train = plan.stage_steps("train")[0]
    data = train.flag("--data")
    if data is None:
        return None
    if resolve(data).exists() and (resolve(data).is_file() or (resolve(data) / "store.json").is_file()):
        return len(load_features(resolve(data)))
    maker = next((s for s in plan.stage_steps("features") if resolve(data) in [p.parent if p.name == "store.json"
                                                                              else p for p in s.paths()]), None)
    if maker is None:
        return None
    if maker.script() == "parse_coco.py" and maker.flag("--annotations"):
        return _karpathy_captions(resolve(maker.flag("--annotations")), maker.flag("--split") or "train")
    source = maker.script_args()[0] if maker.script_args() else ""  # parse_captions.py's: its captions
    if maker.script() == "parse_captions.py" and source.endswith(".json") and maker.flag("--split"):  # Karpathy's
        return _karpathy_captions(resolve(source), maker.flag("--split"))
    if maker.script() == "parse_conceptual.py" and maker.flag("--data_root"):
        return _conceptual_captions(resolve(maker.flag("--data_root")), maker.flag("--split") or "train")
    return None


def _karpathy_captions(path: Path, split: str) -> int | None:
    if not path.is_file():
        return None
    splits = ("train", "restval") if split == "train" else (split,)
    return sum(len(image.captions) for image in read_annotations(path).images if image.split in splits)


def _conceptual_captions(root: Path, split: str) -> int | None:
    """Images downloaded by img2dataset (one caption each), else the rows of the split's TSV."""
    from .fetch import CONCEPTUAL_SPLITS, shard_counts

    if list((root / split).glob("*_stats.json")):
        return shard_counts(root / split)["downloaded"]
    tsv = root / CONCEPTUAL_SPLITS[split]
    if not tsv.is_file():
        return None
    with open(tsv, "rb") as f:
        return sum(1 for _ in f)


def embedding_width(plan: Plan) -> int:
    """The width of the row's CLIP embeddings: its features' when they exist, else its CLIP's (512 if unknown)."""
    from .data import load_features

    for step in reversed(plan.stage_steps("features")):  # the smallest split first: loading it is quick
        for path in step.paths():
            if path.is_file() and path.suffix == ".pkl":
                return load_features(path).dim
        clip = step.flag("--clip_model_type") or step.flag("--clip_model")
        if clip and (resolve(clip) / "config.json").is_file():  # CLIP's projection; SigLIP's pooled vision width
            config = json.loads((resolve(clip) / "config.json").read_text())
            return config.get("projection_dim") or config.get("vision_config", {}).get("hidden_size", 512)
        if clip in WIDTH_OF:
            return WIDTH_OF[clip]
    return 512


def measure(plan: Plan, steps: int, device: str = "auto") -> Projection:
    """Run ``steps`` training steps of the row's own command (one process) and project its training time."""
    from .cli.train import parse_args
    from .training import train

    step = plan.stage_steps("train")[0]
    cfg = parse_args(step.script_args())
    n_proc = processes(step)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "features.pkl"
        rng = random.Random(0)
        n = cfg.batch_size * cfg.grad_accum * (steps + 1)
        with open(data, "wb") as f:
            pickle.dump({"clip_embedding": torch.randn(n, embedding_width(plan)),
                         "captions": [{"image_id": i, "caption": coco_like_caption(rng), "clip_embedding": i}
                                      for i in range(n)]}, f)
        run = dataclasses.replace(cfg, data=str(data), out_dir=str(Path(tmp) / "run"), epochs=1, max_steps=steps,
                                  val_data=None, val_captions=0, resume=None, overwrite=False, log_every=1,
                                  save_latest_every=10**9, device=device, clip_model=None)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            history = train(run)["history"]
    timed = [r for r in history if "samples_per_s" in r][1:] or history  # the first step holds the warm-up
    if not timed:
        raise ClipCapError(f"{plan.row}: the measuring run logged no step")
    per_step = sum(cfg.batch_size * cfg.grad_accum / r["samples_per_s"] for r in timed) / len(timed)
    captions = training_captions(plan)
    global_batch = cfg.batch_size * cfg.grad_accum * n_proc
    return Projection(plan.row, per_step, None if captions is None else captions // global_batch, cfg.epochs, n_proc)
