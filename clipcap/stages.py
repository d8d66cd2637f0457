"""The recipes' stages as steps with fingerprints and stamps: what is done, what must run again, and why.

A recipe prints its plan (``recipes/ROW.sh plan``, see recipes/stages.sh): its run folder, the data
it needs, and per stage the exact commands and the outputs each leaves. A step's fingerprint is a
hash of its command, of the local files and model folders the command reads, and of the fingerprints
of the steps it depends on: every step of the row's earlier stages, and the step of another row that
made a file it reads (nocaps reads the COCO rows' checkpoints). A finished step leaves a stamp beside
its first output (``.reproduce/NAME.json``) holding its fingerprint and the size and time of each
output, so a step is done when its stamp matches its fingerprint and its outputs are untouched;
changing a setting changes the fingerprints of exactly the steps that depend on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .files import ClipCapError, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
STAMPS = ".reproduce"
# Flags whose value a command writes, not reads: never part of its inputs' fingerprint.
OUTPUT_FLAGS = {"--out", "--out_path", "--out_dir", "--references_path", "--save_captions", "--per_image"}


@dataclass
class Step:
    """One command of a stage and the outputs it leaves when complete (``once``: skipped when they exist)."""

    stage: str
    command: list[str]
    outputs: list[str]

    def text(self) -> str:
        return shlex.join(self.command)

    def paths(self) -> list[Path]:
        return [resolve(p) for p in self.outputs]

    def flag(self, name: str) -> str | None:
        """The value of ``--name`` in the command, if given."""
        args = self.command
        return next((args[i + 1] for i, a in enumerate(args[:-1]) if a == name), None)

    def script(self) -> str:
        """The repository script the command runs (``train.py``), also under torchrun."""
        return next((Path(a).name for a in self.command if a.endswith(".py")), self.command[0])

    def script_args(self) -> list[str]:
        """The command's arguments after its script."""
        i = next((i for i, a in enumerate(self.command) if a.endswith(".py")), 0)
        return self.command[i + 1:]


@dataclass
class Plan:
    """A recipe's plan: its row, run folder, training prefix, needed inputs and steps."""

    row: str
    run_dir: str
    prefix: str
    needs: list[tuple[str, str]] = field(default_factory=list)  # (kind, path): coco/nocaps/conceptual data or a model
    steps: list[Step] = field(default_factory=list)

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(step.stage for step in self.steps))

    def stage_steps(self, stage: str) -> list[Step]:
        return [step for step in self.steps if step.stage == stage]

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "run_dir": self.run_dir, "prefix": self.prefix, "needs": self.needs,
                "steps": [{"stage": s.stage, "command": s.command, "outputs": s.outputs} for s in self.steps]}


def resolve(path: str | Path) -> Path:
    """A path of a plan: relative ones are relative to the repository root, where the recipes run."""
    return REPO / path


def recipe_path(row: str) -> Path:
    path = RECIPES / f"{row}.sh"
    if not path.is_file():
        raise ClipCapError(f"{path}: recipe not found; clipcap-reproduce runs the recipes of a checkout of this "
                           "repository (pip install -e .)")
    return path


def run_recipe(row: str, args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(recipe_path(row)), *args], env=env, cwd=REPO, **kwargs)


def read_plan(row: str, env: dict[str, str]) -> Plan:
    """``recipes/{row}.sh plan``, parsed."""
    done = run_recipe(row, ["plan"], env, capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ClipCapError(f"recipes/{row}.sh: {message[0].removeprefix('error: ')}")
    plan = None
    for line in done.stdout.splitlines():
        kind, *values = line.split("\t")
        if kind == "row":
            plan = Plan(values[0], values[1], values[2])
        elif kind == "needs":
            plan.needs.append((values[0], values[1]))
        elif kind == "step":
            plan.steps.append(Step(values[0], shlex.split(values[1]), []))
        elif kind == "output":
            plan.steps[-1].outputs.append(values[0])
    if plan is None or not plan.steps:
        raise ClipCapError(f"recipes/{row}.sh plan: printed no plan")
    return plan


# --------------------------------------------------------------------------- fingerprints


def _file_digest(path: Path) -> list[Any]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _folder_digest(folder: Path) -> str:
    """A model folder's files by name, size and time (a changed CLIP or GPT-2 folder is another model)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}\0".encode())
    return h.hexdigest()


def input_digests(step: Step, produced: set[Path]) -> dict[str, Any]:
    """The local files and model folders (those with a config.json) the command reads, by size and time; the
    outputs of steps (fingerprinted as steps) and image folders (too large; their captions file stands for them)
    are left out."""
    digests: dict[str, Any] = {}
    args = step.command
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] in OUTPUT_FLAGS or arg.startswith("-") or i == 0:
            continue
        path = resolve(arg)
        if path in produced or arg.endswith(".py") or not path.exists():
            continue
        if path.is_file():
            digests[arg] = _file_digest(path)
        elif (path / "config.json").is_file():
            digests[arg] = _folder_digest(path)
    return digests


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Fingerprints:
    """The fingerprint each step of the chosen rows should have; steps of other rows count as they were made."""

    def __init__(self, plans: dict[str, Plan], chosen: Iterable[str]):
        self.plans, self.chosen = plans, set(chosen)
        self.producer = {path: (row, i) for row, plan in plans.items()
                         for i, step in enumerate(plan.steps) for path in step.paths()}
        self.memo: dict[tuple[str, int], str] = {}

    def __call__(self, row: str, i: int) -> str:
        if (row, i) not in self.memo:
            self.memo[(row, i)] = self._compute(row, i)
        return self.memo[(row, i)]

    def _compute(self, row: str, i: int) -> str:
        plan = self.plans[row]
        step = plan.steps[i]
        if row not in self.chosen:  # not managed by this run: as its stamp says it was made
            stamp = read_stamp(step)
            return stamp["fingerprint"] if stamp else "unknown:" + _hash(
                {str(p): _file_digest(p) if p.is_file() else None for p in step.paths() if p.exists()})
        earlier = plan.stages[:plan.stages.index(step.stage)]
        upstream = [self(row, j) for j, other in enumerate(plan.steps) if other.stage in earlier]
        own = {path for other in plan.steps for path in other.paths()}
        for arg in step.command:  # a file another row makes (nocaps reads the COCO rows' checkpoints)
            source = self.producer.get(resolve(arg))
            if source is not None and resolve(arg) not in own:
                upstream.append(self(*source))
        # From the script on: the interpreter (PY) and torchrun's launcher change no result.
        return _hash({"command": [step.script(), *step.script_args()], "upstream": upstream,
                      "inputs": input_digests(step, set(self.producer))})


# --------------------------------------------------------------------------- stamps


def stamp_path(step: Step) -> Path:
    first = step.paths()[0]
    return first.parent / STAMPS / f"{first.name}.json"


def read_stamp(step: Step) -> dict[str, Any] | None:
    path = stamp_path(step)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def output_digests(step: Step) -> dict[str, Any]:
    return {p: _output_digest(resolve(p)) for p in step.outputs}


def _output_digest(path: Path) -> list[Any] | None:
    if not path.exists():
        return None
    return _file_digest(path) if path.is_file() else [path.stat().st_mtime_ns]


def write_stamp(step: Step, fingerprint: str, status: str, **record: Any) -> None:
    write_json(stamp_path(step), {"fingerprint": fingerprint, "status": status, "command": step.command,
                                  "outputs": output_digests(step), "time": time.time(), **record})


@dataclass
class State:
    """Where a step stands: ``done``, ``adopt`` (its outputs exist without a stamp: made by hand, kept),
    ``resume`` (started with the same settings and stopped), ``stale`` (made or started with other settings,
    or its outputs changed since), or ``todo``."""

    status: str
    why: str = ""


def step_state(step: Step, fingerprint: str) -> State:
    stamp = read_stamp(step)
    present = all(p.exists() for p in step.paths())
    if stamp is None:
        return State("adopt", "made before, kept") if present else State("todo")
    if stamp["fingerprint"] != fingerprint:
        return State("stale", settings_change(stamp["command"], step.command))
    if stamp["status"] != "done":
        return State("resume", "stopped before it finished")
    if stamp["outputs"] != output_digests(step):
        changed = next(p for p, d in output_digests(step).items() if stamp["outputs"].get(p) != d)
        return State("stale", f"{changed} {'is missing' if not resolve(changed).exists() else 'changed'} since")
    return State("done")


def settings_change(before: list[str], now: list[str]) -> str:
    """What differs between two commands, as ``--epochs 2 -> 3``; else the change was upstream."""
    def flags(command: list[str]) -> dict[str, str]:
        values, key = {}, None
        for arg in command:
            if arg.startswith("--"):
                key = arg
                values[key] = ""
            elif key is not None:
                values[key] = f"{values[key]} {arg}".strip()
                key = None
        return values

    old, new = flags(before), flags(now)
    changes = [f"{k} {old.get(k, '(none)') or 'on'} -> {new.get(k, '(none)') or 'on'}"
               for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    if changes:
        return "settings changed: " + ", ".join(changes)
    if before != now:
        return f"command changed: {shlex.join(before)} -> {shlex.join(now)}"
    return "what it depends on changed"


def remove_outputs(step: Step) -> None:
    """Delete what a step made (and what its unfinished run left), so that it is made again."""
    for path in step.paths():
        target = path.parent if path.name == "store.json" else path  # a feature store: its whole folder
        for leftover in (target, target.with_name(target.name + ".parts"), target.with_name(target.name + ".lock"),
                         target.with_name(target.stem + "_skipped.tsv"), target.with_name(target.stem + "_job.json")):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
    stamp_path(step).unlink(missing_ok=True)


def clear_folder(folder: Path) -> None:
    """Empty a run folder (a training that starts afresh: everything in it came from the old one)."""
    if folder.is_dir():
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
