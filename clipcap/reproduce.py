"""``make reproduce``: the paper's Table 1 in one command, from the data to one report.

Each row is its recipe (recipes/ROW.sh; the rows beyond the paper, clipcap.paper.EXTRA_ROWS, after
Table 1's), run stage by stage (features, train, score) from its plan, then its gallery
(clipcap.gallery). In order:

1. every recipe's plan, in the recipes' environment (COCO NOCAPS CC RUNS CLIP GPT2 EPOCHS BS ...);
   a chosen row whose inputs include another row's model brings that row along when the model is missing;
2. with ``--fetch``, the data the chosen rows lack (clipcap.fetch);
3. rows whose data is missing are skipped, one line each naming what is missing and the command that
   fetches it;
4. each stage's state (clipcap.stages): done stages are skipped, so a killed reproduction resumes where
   it stopped and a changed setting re-runs exactly what depends on it;
5. a few training steps of each row still to train, and the projected time (clipcap.budget);
   ``--dry_run`` stops here;
6. the stages still to run, a failed row recorded and the others run on; the scoring commands
   (``$PY evaluate.py ...``, as the plan states them) run in this process, all rows' with one set of
   the toolkit's scorers (METEOR's Java loads once), and the galleries after them;
7. the report (clipcap.report) in ``$RUNS/report/``.

What happened is kept in ``$RUNS/reproduce.json`` (each row's plan, status and stage times), from
which ``--report_only`` writes the report again. Rows not chosen in a run keep their record and their
results as they were made.
"""
from __future__ import annotations

import codecs
import contextlib
import datetime
import io
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paper
from .files import ClipCapError, read_json, write_json
from .gallery import gallery_folder
from .report import duration, write_report
from .stages import (
    Fingerprints,
    Plan,
    State,
    Step,
    clear_folder,
    read_plan,
    read_stamp,
    recipe_path,
    remove_outputs,
    resolve,
    step_state,
    write_stamp,
)

# The paper's order (nocaps, which reads two COCO models, last), then the rows beyond the paper.
ROWS = tuple(row.name for row in (*paper.ROWS, *paper.EXTRA_ROWS))
DATA_FOLDERS = {"coco": "COCO", "nocaps": "NOCAPS", "conceptual": "CC"}  # each data set's variable in the recipes
RECORD = "reproduce.json"


@dataclass
class Options:
    rows: list[str]
    fetch: bool = False
    fetch_only: bool = False
    dry_run: bool = False
    report_only: bool = False
    budget_steps: int = 20
    gallery: int = 8
    clipscore_model: str | None = "ViT-B/32"
    device: str = "auto"
    download_processes: int | None = None
    download_threads: int = 64


def parse_rows(text: str | None) -> list[str]:
    """``all`` (or nothing) for every row, else comma-separated recipe names, checked."""
    if not text or text.strip() == "all":
        return list(ROWS)
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ClipCapError(f"--rows {text}: unknown row {', '.join(unknown) or '(none)'}; the rows: {', '.join(ROWS)}")
    return [r for r in ROWS if r in rows]


def environment() -> dict[str, str]:
    """The recipes' environment: the caller's, with this interpreter, the visible GPUs and unbuffered output."""
    import torch

    env = dict(os.environ)
    env.setdefault("PY", sys.executable)
    env.setdefault("GPUS", str(max(1, torch.cuda.device_count())))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def runs_folder(env: dict[str, str]) -> Path:
    return resolve(env.get("RUNS", "runs"))


def load_record(runs: Path) -> dict[str, Any]:
    path = runs / RECORD
    return read_json(path, "reproduction record") if path.is_file() else {"rows": {}}


def save_record(record: dict[str, Any], runs: Path) -> None:
    write_json(runs / RECORD, record, indent=1)


def producer_of(path: str, plans: dict[str, Plan]) -> str | None:
    """The row whose training leaves ``path``."""
    return next((row for row, plan in plans.items() for step in plan.stage_steps("train")
                 if resolve(path) in step.paths()), None)


def with_dependencies(rows: list[str], plans: dict[str, Plan]) -> list[str]:
    """``rows``, and the rows that make a model one of them needs and that is not there yet."""
    chosen = set(rows)
    for row in rows:
        for kind, path in plans[row].needs:
            maker = producer_of(path, plans)
            if kind == "model" and maker and maker not in chosen and not resolve(path).exists():
                print(f"{row} needs {path}, which {maker} makes: running {maker} too")
                chosen.add(maker)
    return [r for r in ROWS if r in chosen]


def fetch_command(plan: Plan, env: dict[str, str]) -> str:
    """The command that fetches a row's data into the folders its recipe reads (those the environment sets)."""
    kinds = dict.fromkeys(kind for kind, _ in plan.needs if kind in DATA_FOLDERS)
    prefix = "".join(f"{DATA_FOLDERS[k]}={env[DATA_FOLDERS[k]]} " for k in kinds if DATA_FOLDERS[k] in env)
    return f"{prefix}make data ROWS={plan.row}"


def missing_data(plan: Plan) -> list[tuple[str, str]]:
    return [(kind, path) for kind, path in plan.needs if kind in DATA_FOLDERS and not resolve(path).exists()]


def fetch_data(rows: list[str], plans: dict[str, Plan], opts: Options) -> None:
    """Download the data sets of the rows into the folders their recipes read (parts already there are kept)."""
    from .fetch import fetch_dataset

    folders: dict[str, Path] = {}
    for row in rows:
        for kind, path in plans[row].needs:
            if kind in DATA_FOLDERS:
                folders.setdefault(kind, resolve(path).parent)
    for kind, folder in folders.items():
        options = {"conceptual": {"processes": opts.download_processes, "threads": opts.download_threads},
                   "nocaps": {"threads": min(opts.download_threads, 16)}}.get(kind, {})
        fetch_dataset(kind, folder, **options)


def add_gallery_steps(plan: Plan, opts: Options) -> None:
    """The gallery of each scoring command, a stage of its own after it."""
    for score in plan.stage_steps("score"):
        out = gallery_folder(score) / "gallery.json"
        plan.steps.append(Step("gallery", ["gallery", *score.outputs, "--images", str(opts.gallery),
                                           "--clipscore_model", str(opts.clipscore_model)], [str(out)]))


# --------------------------------------------------------------------------- running stages


class StageFailed(Exception):
    """A stage's command ended with an error (its reason: the command's last error line)."""


def run_logged(command: list[str], env: dict[str, str], log: Path) -> None:
    """Run ``command``, its output shown as it comes and kept in ``log``; StageFailed with its last error line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    tail = ""
    with open(log, "ab") as kept, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   env=env, cwd=resolve(".")) as process:
        for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
            kept.write(chunk)
            text = decoder.decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-20_000:]
    if process.returncode != 0:
        lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
        raise StageFailed((errors or lines or [f"exit status {process.returncode}"])[-1])


class Scorers:
    """The toolkit's scorers for the scoring commands of a reproduction: started once per --metrics and
    --spice_jars, kept until :meth:`close`."""

    def __init__(self) -> None:
        self.started: dict[tuple[str | None, str | None], Any] = {}

    def __call__(self, argv: list[str]) -> Any:
        from .cli.evaluate import parse_args
        from .evaluation import Scorer, parse_metrics

        args = parse_args(argv)
        key = (args.metrics, args.spice_jars)
        if key not in self.started:
            self.started[key] = Scorer(parse_metrics(args.metrics), args.spice_jars)
        return self.started[key]

    def close(self) -> None:
        for scorer in self.started.values():
            scorer.close()
        self.started.clear()


def scores_here(step: Step, env: dict[str, str]) -> bool:
    """Whether a step is a scoring command of this interpreter's kind (``$PY evaluate.py``, not under torchrun)."""
    return step.command[:1] == [env.get("PY")] and step.command[1:2] == ["evaluate.py"]


class _Tee(io.TextIOBase):
    """Text written to the terminal and kept in a log."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def score_here(steps: list[Step], scorers: Scorers, log: Path) -> None:
    """Run scoring commands in this process, from the repository root as the recipes run them, their output
    shown and kept in ``log``; StageFailed with the error line."""
    from .cli.evaluate import main as evaluate

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as kept, contextlib.chdir(resolve(".")):
        tee = _Tee(sys.stdout, kept)
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(_Tee(sys.stderr, kept)):
            for step in steps:
                print(f"+ {step.text()}", flush=True)
                try:
                    evaluate(step.script_args(), scorers(step.script_args()))
                except ClipCapError as e:
                    print(f"error: {e}", file=sys.stderr)
                    raise StageFailed(f"error: {e}") from None
                except SystemExit as e:  # argparse: its message is printed
                    raise StageFailed(f"evaluate.py: its arguments were refused (exit status {e.code})") from None
                except Exception as e:  # noqa: BLE001 (a failed row is recorded; the others run on)
                    traceback.print_exc()
                    raise StageFailed(f"{type(e).__name__}: {e}") from None


def make_galleries(steps: list[Step], plan: Plan, plans: dict[str, Plan], opts: Options) -> None:
    from .gallery import make_gallery
    from .runtime import resolve_device

    for step in steps:
        score = next(s for s in plan.stage_steps("score") if s.outputs[:1] == step.command[1:2])
        features = next((s for p in plans.values() for s in p.stage_steps("features")
                         if resolve(score.flag("--features") or "") in s.paths()), None)
        if features is None:
            raise StageFailed(f"no features step makes {score.flag('--features')}")
        try:
            make_gallery(score, features, step.paths()[0].parent, opts.gallery, opts.clipscore_model,
                         resolve_device(opts.device))
        except ClipCapError as e:
            raise StageFailed(str(e)) from None


def run_stage(plan: Plan, stage: str, states: list[State], fingerprints: list[str], plans: dict[str, Plan],
              env: dict[str, str], opts: Options, scorers: Scorers) -> dict[str, Any]:
    """Bring a stage's steps up to date: stale outputs removed, the recipe's stage (or the gallery) run, stamps
    written. Returns the stage's record (seconds, when it started)."""
    steps = plan.stage_steps(stage)
    resumable = (resolve(plan.run_dir) / f"{plan.prefix}_resume.pt").exists()
    if stage == "train" and any(s.status == "stale" or s.status == "resume" and not resumable for s in states):
        clear_folder(resolve(plan.run_dir))  # a training that starts afresh: nothing of the old one is kept
    for step, state, fingerprint in zip(steps, states, fingerprints):
        if state.status == "stale" and stage != "train":
            remove_outputs(step)
        if state.status == "adopt":
            write_stamp(step, fingerprint, "done", adopted=True)
    pending = [(s, f) for s, st, f in zip(steps, states, fingerprints) if st.status not in ("done", "adopt")]
    if not pending:
        return {}
    earlier = [(read_stamp(s) or {}).get("started") for s, st in zip(steps, states) if st.status == "resume"]
    started = min([t for t in earlier if t] or [time.time()])  # a resumed stage started when it first started
    for step, fingerprint in pending:
        write_stamp(step, fingerprint, "running", started=started)
    begin = time.time()
    log = resolve(plan.run_dir) / ".reproduce" / f"{stage}.log"
    if stage == "gallery":
        make_galleries([s for s, _ in pending], plan, plans, opts)
    elif stage == "score" and all(scores_here(s, env) for s, _ in pending):
        score_here([s for s, _ in pending], scorers, log)
    else:
        run_logged(["bash", str(recipe_path(plan.row)), stage], env, log)
    seconds = round(time.time() - begin, 1)
    for step, fingerprint in pending:
        missing = [p for p in step.outputs if not resolve(p).exists()]
        if missing:
            raise StageFailed(f"it ended without writing {missing[0]}")
        write_stamp(step, fingerprint, "done", started=started, seconds=seconds, gpu=_gpu())
    return {"seconds": seconds, "started": started, "finished": time.time()}


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


# --------------------------------------------------------------------------- the command


def reproduce(opts: Options) -> dict[str, Any] | None:
    """Run the chosen rows as the module docstring says; returns the report's data (None for a dry run or a fetch)."""
    env = environment()
    runs = runs_folder(env)
    record = load_record(runs)
    if opts.report_only:
        return _write_report(record, runs)
    plans = {row: read_plan(row, env) for row in ROWS}  # every row's: nocaps reads the COCO rows' models
    for plan in plans.values():
        add_gallery_steps(plan, opts)
    chosen = with_dependencies(opts.rows, plans)
    if opts.fetch or opts.fetch_only:
        fetch_data(chosen, plans, opts)
        if opts.fetch_only:
            return None
    ready = check_inputs(chosen, plans, record, env)
    fingerprints = Fingerprints(plans, ready)
    work = {row: stage_states(plans[row], fingerprints) for row in ready}
    show_work(work)
    if opts.budget_steps > 0:
        show_budget([row for row in ready if "train" in work[row] and
                     any(s.status not in ("done", "adopt") for s in work[row]["train"][0])], plans, opts)
    if opts.dry_run:
        return None
    save_record(record, runs)  # with the rows skipped for missing data
    started = time.time()
    failed: dict[str, str] = {}
    scorers = Scorers()
    try:
        run_rows(ready, plans, fingerprints, record, runs, env, opts, scorers, failed)
    finally:
        scorers.close()
    print(f"reproduction: {time.time() - started:.0f} s")
    data = _write_report(record, runs)
    if failed:
        raise ClipCapError(f"{len(failed)} row(s) failed: " + "; ".join(f"{r} ({why})" for r, why in failed.items())
                           + f"; the report shows the rest: {runs / 'report' / 'index.html'}")
    return data


def run_rows(ready: list[str], plans: dict[str, Plan], fingerprints: Fingerprints, record: dict[str, Any],
             runs: Path, env: dict[str, str], opts: Options, scorers: Scorers, failed: dict[str, str]) -> None:
    """Each row's stages still to run, in order; a failed row goes into ``failed`` and the rows needing its
    model are skipped."""
    for row in ready:
        blocker = next((maker for kind, path in plans[row].needs if kind == "model"
                        for maker in [producer_of(path, plans)] if maker in failed), None)
        entry = record["rows"].setdefault(row, {})
        entry.update(plan=plans[row].to_dict(), status="running", reason="")
        entry.setdefault("stages", {})
        if blocker:
            entry.update(status="skipped", reason=f"{blocker} failed")
            print(f"{row}: skipped: it needs the model of {blocker}, which failed")
            continue
        # States again: a row run earlier in this reproduction may have remade this row's inputs.
        for stage, (states, prints) in stage_states(plans[row], fingerprints).items():
            label = f"{row} {stage}"
            try:
                result = run_stage(plans[row], stage, states, prints, plans, env, opts, scorers)
            except StageFailed as e:
                entry.update(status="failed", reason=f"{stage}: {e}")
                failed[row] = entry["reason"]
                print(f"{label}: FAILED: {e}")
                break
            if result:
                entry["stages"][stage] = result
                print(f"{label}: done in {result['seconds']:.0f} s")
            save_record(record, runs)
        else:
            entry["status"] = "done"
        save_record(record, runs)


def _write_report(record: dict[str, Any], runs: Path) -> dict[str, Any]:
    data = write_report(record, runs / "report")
    print(f"report: {runs / 'report' / 'index.html'} (report.md, report.json beside it)")
    return data


def check_inputs(rows: list[str], plans: dict[str, Plan], record: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The rows that can run; the others are skipped, each with one line (and in the record) saying why."""
    ready = []
    for row in rows:
        missing = missing_data(plans[row])
        reason = ""
        if missing:
            reason = f"{missing[0][1]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + \
                     f"; fetch it with: {fetch_command(plans[row], env)}"
        else:
            for kind, path in plans[row].needs:
                maker = producer_of(path, plans)
                if kind == "model" and not resolve(path).exists() and maker not in ready:
                    reason = f"{path} is missing, and {maker or 'no row'} cannot make it here"
        if reason:
            print(f"{row}: skipped: {reason}")
            record["rows"][row] = {**record["rows"].get(row, {}), "status": "skipped", "reason": reason,
                                   "plan": plans[row].to_dict()}
        else:
            ready.append(row)
    return ready


def stage_states(plan: Plan, fingerprints: Fingerprints) -> dict[str, tuple[list[State], list[str]]]:
    """Per stage: each step's state and the fingerprint it should have."""
    states = {}
    for stage in plan.stages:
        indices = [i for i, step in enumerate(plan.steps) if step.stage == stage]
        prints = [fingerprints(plan.row, i) for i in indices]
        states[stage] = ([step_state(plan.steps[i], f) for i, f in zip(indices, prints)], prints)
    return states


def show_work(work: dict[str, dict[str, tuple[list[State], list[str]]]]) -> None:
    """One line per row: each stage done, to run, or to resume, and why."""
    for row, stages in work.items():
        parts = []
        for stage, (states, _) in stages.items():
            pending = [s for s in states if s.status not in ("done", "adopt")]
            if not pending:
                parts.append(f"{stage} done")
            else:
                stale = next((s.why for s in pending if s.status == "stale"), "")
                parts.append(f"{stage} {'resume' if pending[0].status == 'resume' else 'to run'}" +
                             (f" ({stale})" if stale else ""))
        print(f"{row}: " + "; ".join(parts))


def show_budget(rows: list[str], plans: dict[str, Plan], opts: Options) -> None:
    """Measure a few training steps of each row still to train, and print the projected time."""
    from .budget import measure

    if not rows:
        return
    print(f"measuring {opts.budget_steps} training steps of each row to train ...", flush=True)
    total, lines = 0.0, []
    for row in rows:
        try:
            projection = measure(plans[row], opts.budget_steps, opts.device)
        except ClipCapError as e:
            raise ClipCapError(f"{row}: measuring its training: {e}") from None
        total += projection.seconds or 0
        epoch = "?" if projection.steps_per_epoch is None else f"{projection.steps_per_epoch:,}"
        time_needed = "unknown until its data is here" if projection.seconds is None else duration(projection.seconds)
        lines.append(f"  {row:<24} {projection.seconds_per_step:8.3f} s/step  {epoch:>9} steps/epoch x "
                     f"{projection.epochs} epochs on {projection.processes} process(es): {time_needed}")
    print("projected training time on this machine (features and scoring not included; several GPUs are "
          "assumed to scale linearly from one):")
    print("\n".join(lines))
    print(f"  {'total':<24} {duration(total)}  (estimate made {datetime.datetime.now():%Y-%m-%d %H:%M})")
