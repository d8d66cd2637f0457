"""A training run's folder: the names of what the run writes, and the resume state that continues it.

``{prefix}_resume.pt`` holds what continuing exactly needs: the trainable weights, the optimizer,
scheduler and grad scaler, each process's own RNG states (under torchrun every process draws its
own dropout masks), the run's settings (what ``--resume`` alone continues with) and its progress.
It is read with ``weights_only=True``.
"""
from __future__ import annotations

import glob
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    check_compatible,
    check_finite,
    first_line,
    load_pt,
    load_state,
    model_state_dict,
    parse_config,
    save_checkpoint,
)
from .files import ClipCapError, atomic_write
from .model import ClipCap, ClipCapConfig


@dataclass(frozen=True)
class RunFiles:
    """The names of what a training run writes into its folder, in one place."""

    folder: Path
    prefix: str

    def named(self, name: str) -> Path:
        """``{prefix}_{name}``: ``latest`` and ``best`` weights (stems), ``config.json``, ``resume.pt`` ..."""
        return self.folder / f"{self.prefix}_{name}"

    def epoch(self, epoch: int) -> Path:
        """The stem of an epoch's weights, ``{prefix}-{epoch:03d}`` (0-based, as the original)."""
        return self.folder / f"{self.prefix}-{epoch:03d}"

    @property
    def config(self) -> Path:
        return self.named("config.json")

    @property
    def resume(self) -> Path:
        return self.named("resume.pt")

    @property
    def log(self) -> Path:
        return self.named("log.jsonl")

    @property
    def loss_plot(self) -> Path:
        return self.named("loss.png")

    def existing(self) -> list[Path]:
        """The files of a run with this prefix that are already there."""
        stem = glob.escape(str(self.folder / self.prefix))
        patterns = ("_resume.pt", "_config.json", "_log.jsonl", "-[0-9][0-9][0-9].*", "_latest.*", "_best.*")
        return sorted({Path(f) for pattern in patterns for f in glob.glob(stem + pattern)})

    def resume_hint(self) -> str:
        """The ``--resume`` that continues this run, as short as stays unambiguous."""
        alone = resume_states(self.folder) in ([], [self.resume])
        return f"--resume {self.folder if alone else self.resume}"


def resume_states(folder: Path) -> list[Path]:
    return sorted(Path(f) for f in glob.glob(glob.escape(str(folder)) + "/*_resume.pt"))


def save_weights(model: ClipCap, stem: Path, original_format: bool) -> None:
    """``stem.safetensors`` (ours), and ``stem.pt`` (the original's layout) when asked."""
    save_checkpoint(model, stem.with_name(stem.name + ".safetensors"))
    if original_format:
        save_checkpoint(model, stem.with_name(stem.name + ".pt"))


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "config", "settings", "state")


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU's and, on a GPU, its own GPU's."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_resume(path: Path, model: ClipCap, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, rng: list[dict[str, torch.Tensor]], settings: dict[str, Any],
                state: dict[str, Any]) -> None:
    """Everything needed to continue exactly where this step ended; ``rng`` holds each process's
    :func:`rng_states`, by rank; ``settings`` are the run's, ``state`` its progress (both JSON)."""
    with atomic_write(path) as tmp:
        torch.save({"model": model_state_dict(model, full=False), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                    "config": json.dumps(model.config.to_dict()), "settings": json.dumps(settings),
                    "state": json.dumps(state)}, tmp)


@dataclass
class ResumeState:
    """A resume state as read from its file and checked, before it is loaded into a run."""

    path: Path
    saved: dict[str, Any]  # the file's weights, optimizer, scheduler, scaler and RNG states
    config: ClipCapConfig
    settings: dict[str, Any]
    progress: dict[str, Any]


def find_resume_file(path: str | Path, prefix: str | None) -> Path:
    """``--resume``'s file: the given one, or in the given folder ``{prefix}_resume.pt`` (without a
    prefix, the folder's only resume state)."""
    p = Path(path)
    if not p.is_dir():
        if not p.is_file():
            raise ClipCapError(f"{p}: no resume state to continue from")
        return p
    there = resume_states(p)
    if prefix is not None:
        if RunFiles(p, prefix).resume in there:
            return RunFiles(p, prefix).resume
        others = f" (it holds {', '.join(f.name for f in there)}: pass the --prefix of that run)" if there else ""
        raise ClipCapError(f"{RunFiles(p, prefix).resume}: no resume state to continue from{others}")
    if len(there) != 1:
        raise ClipCapError(f"{p}: holds no resume state to continue from" if not there else
                           f"{p}: holds the resume states of several runs ({', '.join(f.name for f in there)}); "
                           "pass --prefix to name one")
    return there[0]


def read_resume(path: Path) -> ResumeState:
    """A resume state of train.py, or a one-line error saying what the file is instead."""
    try:
        saved = load_pt(path)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ClipCapError(f"{path}: unreadable resume state ({first_line(e)})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or "optimizer" not in saved:
        prefix = path.name.removesuffix("_resume.pt") if path.name.endswith("_resume.pt") else "{prefix}"
        raise ClipCapError(f"{path}: not a resume state of train.py (expected the {prefix}_resume.pt "
                           "that training writes, holding model, optimizer and progress)")
    if any(k not in saved for k in RESUME_KEYS) or not isinstance(saved["rng"], list):
        raise ClipCapError(f"{path}: a resume state of an older train.py, which kept neither its settings nor "
                           "each process's RNG states; it cannot be continued exactly")
    try:
        config = parse_config(json.loads(saved["config"]), path)
        settings, progress = json.loads(saved["settings"]), json.loads(saved["state"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ClipCapError(f"{path}: resume state has unreadable settings or progress ({e})") from None
    check_finite(saved["model"], path)
    return ResumeState(path, saved, config, settings, progress)


def restore(resumed: ResumeState, model: ClipCap, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler, rank: int, device: torch.device) -> None:
    """Load a resume state into the run's model, optimizer, scheduler and scaler, and give this
    process its own RNG states back (a process beyond those of the saved run keeps its own seed)."""
    path, saved = resumed.path, resumed.saved
    if resumed.config.only_prefix != model.config.only_prefix:
        raise ClipCapError(f"{path}: checkpoint has only_prefix {resumed.config.only_prefix}, "
                           f"model built with {model.config.only_prefix}")
    check_compatible(saved["model"], model, path, resumed.config)
    load_state(model, saved["model"], path)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, TypeError) as e:
        raise ClipCapError(f"{path}: resume state's optimizer does not fit this run ({first_line(e)})") from None
    if rank < len(saved["rng"]):
        states = saved["rng"][rank]
        torch.set_rng_state(states["cpu"])
        if device.type == "cuda" and "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], device)
