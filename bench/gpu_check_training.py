"""Training checks of bench/gpu_check.py: every precision and mode on one device, and Table 1's projected times.

Each mode runs clipcap.training.train for a few steps and must give finite losses and queue its
steps without waiting for the GPU: after the first log window (warm-up, compilation), every step
runs under CUDA's sync debug mode, which reports each operation that makes the host wait for the
device (reading a value back, a blocking copy), with the Python line that did it. The figures are
train()'s own: samples/s after the first window, and the mode's peak GPU memory.
"""
from __future__ import annotations

import contextlib
import functools
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from bench_train_throughput import COCO_CAPTIONS, make_gpt2, measure
from gpu_check_common import FAIL, SKIPPED, Check, Context, failure, logged, training_features, verdict

from clipcap import training
from clipcap.model import ClipCapConfig
from clipcap.training import TrainConfig

PRECISIONS = ("fp32", "bf16", "fp16")
MODES = {"fine-tune": dict(mapping_type="mlp"),
         "prefix-only": dict(mapping_type="transformer", only_prefix=True, num_layers=2, prefix_length_clip=4)}
# The paper's Table 1 (COCO): the model, the width of its CLIP's embeddings, and the paper's hours on a GTX1080.
TABLE_1 = {
    "MLP + GPT-2 tuning": (dict(mapping_type="mlp"), 512, 7),
    "Transformer, GPT-2 frozen": (dict(mapping_type="transformer", only_prefix=True, num_layers=8), 640, 6),
    "(ablation) Transformer + GPT-2 tuning": (dict(mapping_type="transformer", num_layers=8), 640, 7),
    "(ablation) MLP, GPT-2 frozen": (dict(mapping_type="mlp", only_prefix=True), 512, 6),
}
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text in sync debug mode "warn"


@dataclass
class SyncWatch:
    """The host syncs seen in the training steps after the first ``warm`` ones."""

    warm: int
    steps: int = 0
    watched: int = 0
    syncs: int = 0
    first: str = ""  # file:line of the first one


@contextlib.contextmanager
def watch_host_syncs(cuda: bool, warm: int) -> Iterator[SyncWatch]:
    """Run each :func:`clipcap.training.train_step` after the first ``warm`` under CUDA's sync debug mode.

    "warn" rather than "error": the run goes on, and each sync is a warning that names its line.
    The mode is global, so it is on only inside the step; the log lines between steps read values
    on purpose. On the CPU nothing can sync, and the steps are only counted.
    """
    watch = SyncWatch(warm)
    step = training.train_step

    def watched_step(*args: Any, **kwargs: Any) -> Any:
        watch.steps += 1
        if watch.steps <= warm:
            return step(*args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                watch.watched += 1
                syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
                watch.syncs += len(syncs)
                if syncs and not watch.first:
                    watch.first = f"{Path(syncs[0].filename).name}:{syncs[0].lineno}"

    training.train_step = watched_step
    try:
        yield watch
    finally:
        training.train_step = step


@contextlib.contextmanager
def compile_backend(name: str | None) -> Iterator[None]:
    """torch.compile with another backend (the CPU rehearsal's "eager": inductor's C++ builds take minutes)."""
    if name is None:
        yield
        return
    compile = torch.compile
    torch.compile = functools.partial(compile, backend=name)
    try:
        yield
    finally:
        torch.compile = compile


def run_config(ctx: Context, name: str, model: ClipCapConfig, data: str, batch_size: int, **run: Any) -> TrainConfig:
    """A short run of ``ctx.steps`` steps in three log windows, in a folder of its own."""
    return TrainConfig(model=model, data=data, out_dir=str(ctx.work / "runs" / name), batch_size=batch_size, epochs=1,
                       max_steps=ctx.steps, log_every=max(1, ctx.steps // 3), warmup=100, device=ctx.device,
                       num_workers=0, **run)


def train_mode(ctx: Context, name: str, cfg: TrainConfig) -> Check:
    """One mode: finite losses, no host sync in steady-state steps; samples/s and peak memory."""
    slug = name.replace(" ", "_")
    torch._dynamo.reset()  # each compiled mode compiles afresh, within dynamo's recompile limit
    try:
        with logged(ctx.logs / f"train_{slug}.log"), compile_backend(ctx.compile_backend), \
                watch_host_syncs(ctx.cuda, warm=cfg.log_every) as watch:
            m = measure(cfg)
    except Exception as e:  # the table reports it, and the other checks still run
        return Check("training", name, FAIL, f"{failure(e)} (log: {ctx.logs / f'train_{slug}.log'})")
    finally:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
    problems = []
    if not all(math.isfinite(loss) for loss in m.losses):
        problems.append(f"non-finite losses {m.losses}")
    if watch.watched == 0:
        problems.append("no training step was watched (is clipcap.training.train_step still the step function?)")
    if watch.syncs:
        problems.append(f"{watch.syncs} host syncs in {watch.watched} steady-state steps (first at {watch.first})")
    detail = (f"finite losses, no host sync in {watch.watched} steady-state steps" if ctx.cuda else
              f"finite losses; {watch.watched} steady-state steps watched (host syncs exist on CUDA only)")
    figures = {"samples/s": round(m.samples_per_s, 1), "peak GB": None if m.peak_gb is None else round(m.peak_gb, 3),
               "final loss": round(m.losses[-1], 4)}
    return verdict("training", name, problems, detail, figures)


def training_checks(ctx: Context) -> list[Check]:
    """fp32, bf16 and fp16 (with the grad scaler); GPT-2 fine-tuned and prefix-only; eager and compiled."""
    batch_size = 8
    data = training_features(ctx.work, ctx.backbones.dim, batch_size * (ctx.steps + 1))
    native_bf16 = not ctx.cuda or torch.cuda.is_bf16_supported(including_emulation=False)
    checks = []
    for precision in PRECISIONS:
        for mode, settings in MODES.items():
            for compiled in (False, True):
                name = f"{precision} {mode}" + (" compiled" if compiled else "")
                if ctx.training_modes is not None and name not in ctx.training_modes:
                    continue
                if precision == "bf16" and not native_bf16:
                    checks.append(Check("training", name, SKIPPED, "this GPU has no native bf16 (only emulated)"))
                    continue
                model = ClipCapConfig(lm=ctx.backbones.gpt2, prefix_length=4, **settings)
                cfg = run_config(ctx, name.replace(" ", "_"), model, data, batch_size, precision=precision,
                                 compile=compiled, clip_model=ctx.backbones.vit_clip)
                checks.append(train_mode(ctx, name, cfg))
    return checks


def projection_checks(ctx: Context) -> list[Check]:
    """Each Table 1 row trained at the paper's batch of 40 with GPT-2 small's shapes, and 10 COCO epochs
    projected from its samples/s; with tiny shapes, measured only."""
    real_shapes = ctx.size == "small" or ctx.backbones.real
    if ctx.backbones.real or not real_shapes:
        gpt2 = ctx.backbones.gpt2
    else:
        with logged(ctx.logs / "projection.log"):
            gpt2 = make_gpt2(ctx.work / "gpt2_small", "small")  # random weights: the speed is the same
    batch_size = 40 if real_shapes else 8
    checks = []
    for row, (settings, dim, paper_hours) in TABLE_1.items():
        data = training_features(ctx.work, dim, batch_size * (ctx.steps + 1))
        model = ClipCapConfig(lm=gpt2, prefix_length=10, prefix_length_clip=10, **settings)
        cfg = run_config(ctx, f"table1_{len(checks)}", model, data, batch_size, precision="auto")
        try:
            with logged(ctx.logs / "projection.log"):
                m = measure(cfg)
        except Exception as e:
            checks.append(Check("projection", row, FAIL, f"{failure(e)} (log: {ctx.logs / 'projection.log'})"))
            continue
        finally:
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
        figures = {"samples/s": round(m.samples_per_s, 1),
                   "peak GB": None if m.peak_gb is None else round(m.peak_gb, 2)}
        if not real_shapes:
            checks.append(Check("projection", row, SKIPPED, "not projected: measured on a tiny GPT-2; the time of 10 "
                                f"COCO epochs ({COCO_CAPTIONS:,} captions) needs GPT-2 small's shapes (--size small)",
                                figures))
            continue
        figures["10 COCO epochs (h)"] = round(m.coco_hours, 2)
        problems = [] if all(math.isfinite(loss) for loss in m.losses) else [f"non-finite losses {m.losses}"]
        checks.append(verdict("projection", row, problems, f"10 COCO epochs in {m.coco_hours:.2f} h on one "
                              f"{'GPU' if ctx.cuda else 'CPU'}, bs 40 (paper: {paper_hours} h on a GTX1080)", figures))
    return checks
