"""Training ClipCap on cached CLIP features: one process or many (torchrun), resumable.

Read top to bottom: the configuration, the data order, then :func:`train`: :func:`setup`, the
training :func:`step`, and :func:`end_of_epoch`, the logs and the loss plot.

Where this differs from the original's loop (on purpose):
- Each batch is padded to its own longest caption and the loss ignores padding only
  (the original padded to one global length and ignored token 0, which is the real "!").
- Prefix-only mode computes no gradients for GPT-2's weights.
- The loss of an optimizer step is the mean over all real tokens of the global batch, however
  it is split over processes (``--batch_size`` per process) and accumulation steps
  (``--grad_accum``), so N processes with batch B equal one process with batch N*B.
- Everything that can be checked is checked before the first step (flags, the output folder,
  the data and validation data, GPT-2), and a non-finite loss stops the run before any
  checkpoint can hold its weights (:class:`LossGuard`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from .checkpoint import (
    CLIP_BY_WIDTH,
    RunFiles,
    clip_for_width,
    find_resume_file,
    restore,
    save_config,
    save_resume,
    save_weights,
)
from .data import Batch, CaptionDataset, load_features, tokens_cache_path
from .encoder import same_clip
from .featureset import FeatureSet
from .files import ClipCapError, atomic_write, check_output_path, examples, remove_stale_temp_files
from .model import ClipCap, ClipCapConfig, build_model, load_tokenizer, setting
from .runtime import Processes, pick_device, start_processes


@dataclass
class TrainConfig:
    """A training run; the defaults are the paper's (COCO, MLP mapper, GPT-2 fine-tuned, batch 40, 10 epochs).

    ``model.prefix_size`` and ``model.clip_model`` come from the features; train.py's flags are
    these fields and the model's (:mod:`clipcap.cli.train`).
    """

    model: ClipCapConfig = field(default_factory=ClipCapConfig)
    data: str = setting("./data/coco/oscar_split_ViT-B_32_train.pkl", "feature pickle or feature store folder")
    out_dir: str = setting("./checkpoints", "the run's folder", flags=("--out", "--out_dir"))
    prefix: str = setting("coco_prefix", "the run's file names start with it")
    epochs: int = setting(10, "epochs")
    save_every: int = setting(1, "write {prefix}-{epoch}.safetensors every this many epochs")
    batch_size: int = setting(40, "captions per process and step (global batch: x processes x grad_accum)",
                              flags=("--batch_size", "--bs"))
    lr: float = setting(2e-5, "AdamW's learning rate (eps 1e-6, no weight decay)")
    warmup: int = setting(5000, "linear warm-up steps, then linear decay to 0")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    clip_grad: float = setting(0.0, "max gradient norm (0: no clipping, as the original)")
    precision: str = setting("auto", "autocast: auto is bf16 on GPUs that have it, else fp32",
                             choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    seed: int = setting(0, "initial weights and data order")
    clip_model: str | None = setting(None, "the CLIP that made the features (default: the one they record; "
                                           "for the original's pickles, the CLIP of their width)")
    device: str = setting("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1 ...")
    num_workers: int = setting(0, "DataLoader workers (a batch is one NumPy gather: 0 is usually fastest)")
    resume: str | None = setting(None, "continue the run in this folder (or this {prefix}_resume.pt)")
    overwrite: bool = setting(False, "start afresh even where a run with this prefix left files")
    max_steps: int | None = setting(None, "stop after this many steps (resumable)")
    save_latest_every: int = setting(10_000, "write {prefix}_latest and the resume state every this many steps")
    save_original_format: bool = setting(False, "also write the original's .pt beside each .safetensors")
    val_data: str | None = setting(None, "validation features: loss each epoch, {prefix}_best kept")
    val_captions: int = setting(0, "also CIDEr of greedy captions of this many validation images each epoch")
    log_every: int = setting(20, "steps between log lines")
    skip_nonfinite: bool = setting(False, "skip a batch whose loss is NaN or inf instead of stopping")

    def check(self) -> None:
        """Settings that would crash later or do nothing, refused with the flag's name."""
        at_least_one = {"epochs": self.epochs, "save_every": self.save_every, "batch_size": self.batch_size,
                        "grad_accum": self.grad_accum, "save_latest_every": self.save_latest_every,
                        "log_every": self.log_every, "prefix_length": self.model.prefix_length,
                        "prefix_length_clip": self.model.prefix_length_clip, "num_heads": self.model.num_heads,
                        "max_steps": 1 if self.max_steps is None else self.max_steps}
        not_negative = {"warmup": self.warmup, "num_workers": self.num_workers, "val_captions": self.val_captions,
                        "num_layers": self.model.num_layers}
        for name, value in at_least_one.items():
            if value < 1:
                raise ClipCapError(f"--{name} must be at least 1, got {value}")
        for name, value in not_negative.items():
            if value < 0:
                raise ClipCapError(f"--{name} must not be negative, got {value}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ClipCapError(f"--lr must be a positive number, got {self.lr}")
        if not (self.clip_grad >= 0 and np.isfinite(self.clip_grad)):
            raise ClipCapError(f"--clip_grad must be a non-negative number, got {self.clip_grad}")


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in choices:
        raise ClipCapError(f"--precision must be one of {sorted(choices)} or auto, got {name!r}")
    return choices[name]


def make_optimizer(model: ClipCap, lr: float) -> torch.optim.AdamW:
    """The original's AdamW (eps 1e-6, no weight decay) over the trainable weights, fused into one kernel."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-6,
                             weight_decay=0.0, fused=True)


# --------------------------------------------------------------------------- the features' CLIP


def features_clip(cfg: TrainConfig, features: FeatureSet, val_features: FeatureSet | None) -> tuple[str, str | None]:
    """The CLIP the checkpoint records (what captioning images will load), and a note when it is a guess.

    The training features name it; ``--clip_model`` may name it too, and must agree. Features
    that do not (the original's pickles) get ``--clip_model``, or the CLIP of their width.
    """
    recorded = features.clip_model
    if recorded and cfg.clip_model and not same_clip(recorded, cfg.clip_model):
        raise ClipCapError(f"--clip_model {cfg.clip_model}: {cfg.data} was made with CLIP {recorded}")
    if val_features is not None:
        if val_features.dim != features.dim:
            raise ClipCapError(f"--val_data {cfg.val_data}: {val_features.dim}-d embeddings, but the training "
                               f"features are {features.dim}-d")
        theirs, ours = val_features.clip_model, recorded or cfg.clip_model
        if theirs and ours and not same_clip(theirs, ours):
            raise ClipCapError(f"--val_data {cfg.val_data}: made with CLIP {theirs}, the training features with {ours}")
    if cfg.clip_model or recorded:
        return cfg.clip_model or recorded, None
    guess = clip_for_width(features.dim)
    if features.dim in CLIP_BY_WIDTH:
        return guess, (f"{cfg.data} does not name its CLIP: recording {guess}, the CLIP of {features.dim}-d "
                       "embeddings (--clip_model names another)")
    return guess, (f"{cfg.data} does not name its CLIP and no known CLIP gives {features.dim}-d embeddings: "
                   f"recording {guess}; pass --clip_model to name the right one")


# --------------------------------------------------------------------------- the data order


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """[steps, global_batch] caption indices: a fresh shuffle each epoch, the last partial batch dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    steps = n // global_batch
    return order[:steps * global_batch].view(steps, global_batch)


class MicroBatches:
    """This process's micro-batches of each step: slice ``(micro * world + rank) * bs`` of the step's global batch."""

    def __init__(self, steps: torch.Tensor, procs: Processes, bs: int, grad_accum: int):
        self.steps, self.procs, self.bs, self.grad_accum = steps, procs, bs, grad_accum

    def __len__(self) -> int:
        return len(self.steps) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            for micro in range(self.grad_accum):
                start = (micro * self.procs.world + self.procs.rank) * self.bs
                yield step[start:start + self.bs].tolist()


# --------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: TrainConfig
    procs: Processes
    device: torch.device
    autocast_dtype: torch.dtype | None
    files: RunFiles
    model: ClipCap
    step_model: nn.Module  # the model as the step calls it: compiled and/or wrapped by DDP
    dataset: CaptionDataset
    token_counts: torch.Tensor  # real tokens per caption, after truncation
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    state: dict[str, Any]  # epoch, step, global_step, history, best: what a resume continues from
    log: RunLog
    guard: LossGuard
    val: ValidationSet | None
    global_batch: int
    steps_per_epoch: int

    def save_resume(self) -> None:
        if self.procs.main:
            save_resume(self.files.resume, self.model, self.optimizer, self.scheduler, self.scaler, self.state)

    def save_weights(self, stem: Path) -> None:
        save_weights(self.model, stem, self.cfg.save_original_format)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, writing checkpoints and logs into ``cfg.out_dir``; returns a summary (paths, history)."""
    run = setup(cfg)
    state, steps_this_run = run.state, 0
    for epoch in range(state["epoch"], cfg.epochs):
        run.model.train()
        batches = epoch_batches(len(run.dataset), run.global_batch, cfg.seed, epoch)
        first = state["step"] if epoch == state["epoch"] else 0
        loader = DataLoader(run.dataset, sampler=MicroBatches(batches[first:], run.procs, cfg.batch_size,
                                                              cfg.grad_accum),
                            batch_size=None, num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                            generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG (dropout) alone
        micro_batches = iter(loader)
        run.guard.bar = bar = tqdm(total=run.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                   disable=not run.procs.main, dynamic_ncols=True)
        window = Throughput(run.device)
        for step in range(first, run.steps_per_epoch):
            micro = [next(micro_batches) for _ in range(cfg.grad_accum)]
            window.add(*train_step(run, micro, batches[step]))
            state.update(epoch=epoch, step=step + 1, global_step=state["global_step"] + 1)
            steps_this_run += 1
            bar.update(1)
            stopping = steps_this_run == cfg.max_steps
            logging = state["global_step"] % cfg.log_every == 0 or step + 1 == run.steps_per_epoch
            latest = state["global_step"] % cfg.save_latest_every == 0
            if logging or latest or stopping:
                run.guard.check()  # before any checkpoint is written, and with the values read to log anyway
            if logging:
                record = window.flush(run.procs) | {"epoch": epoch + 1, "step": state["global_step"],
                                                    "lr": run.scheduler.get_last_lr()[0]}
                if run.guard.skipped:
                    record["skipped_nonfinite"] = run.guard.skipped
                state["history"].append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                run.log.scalars(record)
            if latest and run.procs.main:
                run.save_weights(run.files.named("latest"))
            if latest or stopping:
                run.save_resume()
            if stopping:
                bar.close()
                run.log.text(f"stopped after {steps_this_run} steps (--max_steps); continue with "
                             f"--resume {cfg.out_dir}")
                run.procs.barrier()
                return summary(run, finished=False)
        bar.close()
        end_of_epoch(run, epoch)
    return summary(run, finished=True)


def setup(cfg: TrainConfig) -> Run:
    """Check everything that can be checked, then build the run: processes, data, model, optimizer, resume."""
    cfg.check()
    procs = start_processes(cfg.device)
    device = pick_device(cfg.device, procs)
    autocast_dtype = pick_precision(cfg.precision, device)
    files = RunFiles(Path(cfg.out_dir), cfg.prefix)
    if procs.main:
        check_out_dir(cfg, files)

    features = load_features(cfg.data)
    val_features = load_features(cfg.val_data) if cfg.val_data and procs.main else None
    clip_model, note = features_clip(cfg, features, val_features)
    log = RunLog(files, enabled=procs.main, fresh=not cfg.resume)
    if note:
        log.text(note)
    tokenizer = load_tokenizer(cfg.model.gpt2)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    config = dataclasses.replace(cfg.model, prefix_size=features.dim, clip_model=clip_model, gpt2_config={})
    model = build_model(config).to(device)
    max_positions = model.gpt.config.n_positions - config.prefix_length
    if max_positions < 1:
        raise ClipCapError(f"--prefix_length {config.prefix_length} leaves no room for a caption: "
                           f"{config.gpt2} takes {model.gpt.config.n_positions} positions")
    if procs.main:  # the first process writes the token cache, the others read it
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), max_positions, source=cfg.data)
    procs.barrier()
    if not procs.main:
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), max_positions, source=cfg.data)

    global_batch = cfg.batch_size * procs.world * cfg.grad_accum
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ClipCapError(f"{cfg.data}: {len(dataset)} captions, fewer than one global batch of {global_batch}")
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, cfg.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    state = {"epoch": 0, "step": 0, "global_step": 0, "history": [], "best": None}
    if cfg.resume:
        state = restore(find_resume_file(cfg.resume, cfg.prefix), model, optimizer, scheduler, scaler)

    step_model: nn.Module = torch.compile(model) if cfg.compile else model
    if procs.world > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    val = ValidationSet(cfg, val_features, tokenizer, max_positions) if val_features is not None else None
    if procs.main:
        save_config(model.config, files.config)
        log.text(f"{len(dataset):,} captions, {steps_per_epoch:,} steps/epoch of {global_batch} "
                 f"({procs.world} process(es) x batch {cfg.batch_size} x accum {cfg.grad_accum}), {device}, "
                 f"precision {autocast_dtype or torch.float32}, trainable params "
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    token_counts = torch.from_numpy(np.minimum(np.diff(dataset.offsets), dataset.max_length))
    return Run(cfg, procs, device, autocast_dtype, files, model, step_model, dataset, token_counts, optimizer,
               scheduler, scaler, state, log, LossGuard(device, cfg.skip_nonfinite, features, cfg.data), val,
               global_batch, steps_per_epoch)


def check_out_dir(cfg: TrainConfig, files: RunFiles) -> None:
    """The run's folder can be written, and a fresh run will not overwrite another run's files
    (whose ``.pt`` files would then load with this run's config) unless ``--overwrite`` says so."""
    if files.folder.exists() and not files.folder.is_dir():
        raise ClipCapError(f"--out_dir {files.folder}: not a folder")
    check_output_path(files.config, "--out_dir")
    existing = files.existing()
    if existing and not cfg.resume and not cfg.overwrite:
        raise ClipCapError(f"--out_dir {files.folder}: holds a run with prefix {cfg.prefix!r} ({existing[0].name}, "
                           f"...); continue it with --resume {files.folder}, or pass --overwrite to replace it")
    if files.folder.is_dir():
        remove_stale_temp_files(files.folder)


def train_step(run: Run, micro_batches: list[Batch], captions: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """One optimizer step over the global batch ``captions``; returns its loss sum, tokens and samples here."""
    cfg, procs = run.cfg, run.procs
    step_tokens = int(run.token_counts[captions].sum())
    losses, tokens_here, samples_here = [], 0, 0
    for i, batch in enumerate(micro_batches):
        tokens, embeds, positions = (t.to(run.device, non_blocking=True)
                                     for t in (batch.tokens, batch.embeddings, batch.positions))
        syncing = i == len(micro_batches) - 1 or procs.world == 1
        with run.step_model.no_sync() if not syncing else nullcontext(), autocast(run.device, run.autocast_dtype):
            loss_sum = run.step_model(embeds, tokens, positions, reduction="sum")
            # DDP averages gradients over processes; scale so the step's gradient is the global token mean
            run.scaler.scale(loss_sum * (procs.world / step_tokens)).backward()
        losses.append(loss_sum.detach())
        tokens_here += len(batch.positions)
        samples_here += len(batch.lengths)
    total = torch.stack(losses).sum()
    if not run.guard.observe(losses, run.state["global_step"] + 1, captions):
        total, tokens_here, samples_here = total.new_zeros(()), 0, 0  # a skipped step is not logged
    else:
        if cfg.clip_grad > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return total, tokens_here, samples_here


def end_of_epoch(run: Run, epoch: int) -> None:
    """Validation (keeping the best epoch), the epoch's checkpoint, the resume state and the loss plot."""
    cfg, state = run.cfg, run.state
    state.update(epoch=epoch + 1, step=0)
    run.guard.check()
    if run.procs.main:
        if run.val is not None:
            metrics = run.val.evaluate(run.model)
            state["history"].append({"epoch": epoch + 1, "step": state["global_step"], **metrics})
            run.log.scalars({"step": state["global_step"], **metrics})
            run.log.text(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            score = metrics.get("val_CIDEr", -metrics["val_loss"])
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"epoch": epoch + 1, "score": score, **metrics}
                run.save_weights(run.files.named("best"))
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            run.save_weights(run.files.epoch(epoch))
        run.save_resume()
        plot_history(state["history"], run.files.loss_plot)
    run.procs.barrier()


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class NonFiniteLoss(ClipCapError):
    """Training met a NaN or infinite loss (and --skip_nonfinite was not given)."""


class LossGuard:
    """Stops training at the first non-finite loss, naming the step and its captions, before any
    checkpoint is written; or, with ``skip``, skips such steps (no optimizer step) and counts them.

    Reading ``torch.isfinite(loss)`` every step would make a GPU run wait for each step before
    queuing the next. So on the CPU, and with ``skip`` (which must know before the optimizer
    step), each step is checked at once; on a GPU the first bad step is recorded on the device
    and read by :meth:`check`, which the loop calls when it logs (a read it makes anyway) and
    before every checkpoint. ``save_checkpoint`` checks the weights finite as well. Under
    torchrun each process checks its own losses, and torchrun ends the others when one stops.
    """

    def __init__(self, device: torch.device, skip: bool, features: FeatureSet, source: str):
        self.eager = device.type != "cuda" or skip
        self.skip, self.features, self.source = skip, features, source
        self.skipped = 0
        self.bar: tqdm | None = None
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first bad step, on the device
        self.batches: dict[int, torch.Tensor] = {}  # step -> its caption indices, since the last check

    def observe(self, losses: list[torch.Tensor], step: int, captions: torch.Tensor) -> bool:
        """Whether the step's optimizer update may go ahead."""
        finite = torch.stack([torch.isfinite(loss) for loss in losses]).all()
        if self.eager:
            if bool(finite):
                return True
            if not self.skip:
                self.fail(step, captions)
            self.skipped += 1
            return False
        self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, step)
        self.batches[step] = captions
        return True

    def check(self) -> None:
        """Raise if a step since the last check had a non-finite loss (one read from the device)."""
        if not self.eager:
            step = int(self.first_bad)
            if step >= 0:
                self.fail(step, self.batches[step])
            self.batches.clear()

    def fail(self, step: int, captions: torch.Tensor) -> None:
        if self.bar is not None:
            self.bar.close()  # so that the message starts a line of its own
        indices = captions.tolist()
        ids = [self.features.image_ids[i] for i in indices[:5]]
        raise NonFiniteLoss(f"{self.source}: non-finite loss at step {step}, in the batch of captions "
                            f"{examples(indices)} (image ids {examples(ids)}); nothing was saved from this step "
                            "on. Lower --lr, use --clip_grad, or pass --skip_nonfinite to skip such batches")


class Throughput:
    """Loss and speed over the steps since the last log line (reduced over processes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens = self.samples = 0
        self.start = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, tokens: int, samples: int) -> None:
        self.loss_sum += loss_sum.float()
        self.tokens += tokens
        self.samples += samples

    def flush(self, procs: Processes) -> dict[str, float]:
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.tokens), device=self.device),
                              torch.tensor(float(self.samples), device=self.device)])
        if procs.world > 1:
            torch_dist.all_reduce(totals)
        seconds = time.perf_counter() - self.start
        record = {"loss": float(totals[0] / totals[1]), "samples_per_s": float(totals[2]) / seconds,
                  "tokens_per_s": float(totals[1]) / seconds}
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset()
        return record


# --------------------------------------------------------------------------- validation


class ValidationSet:
    """Validation loss over a held-out feature file and, optionally, CIDEr of greedy captions."""

    def __init__(self, cfg: TrainConfig, features: FeatureSet, tokenizer: Any, max_positions: int):
        self.features = features
        self.dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.val_data), max_positions,
                                      source=cfg.val_data)
        self.tokenizer, self.batch_size, self.num_images = tokenizer, cfg.batch_size, cfg.val_captions

    @torch.no_grad()
    def evaluate(self, model: ClipCap) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self.dataset), self.batch_size):
            batch = self.dataset[range(start, min(start + self.batch_size, len(self.dataset)))]
            total += float(model(batch.embeddings.to(device), batch.tokens.to(device), batch.positions.to(device),
                                 reduction="sum"))
            count += len(batch.positions)
        metrics = {"val_loss": total / count}
        if self.num_images > 0:
            metrics["val_CIDEr"] = self.cider(model)
        model.train()
        return metrics

    def cider(self, model: ClipCap) -> float:
        from .decoding import DecodingOptions, caption_embeddings
        from .evaluation import score

        image_ids, rows = self.features.first_rows(limit=self.num_images)
        references: dict[Any, list[str]] = {i: [] for i in image_ids}
        for caption, image_id in zip(self.features.captions, self.features.image_ids):
            if image_id in references:
                references[image_id].append(caption)
        embeds = self.features.embeddings_at(rows).to(next(model.parameters()).device)
        captions = caption_embeddings(model, self.tokenizer, embeds, DecodingOptions(strategy="greedy"))
        results = [{"image_id": i, "caption": c[0]} for i, c in zip(image_ids, captions)]
        return score(results, references, metrics=("CIDEr",))["CIDEr"]


# --------------------------------------------------------------------------- logs and plots


class RunLog:
    """Rank 0's record of a run: JSONL and TensorBoard scalars, and messages printed above the bar."""

    def __init__(self, files: RunFiles, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.path = files.log
        self.writer = None
        if enabled:
            files.folder.mkdir(parents=True, exist_ok=True)
            if fresh:  # a new run (--overwrite) starts a new log; a resumed one appends
                self.path.unlink(missing_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(files.folder / "tensorboard" / files.prefix))

    def text(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def scalars(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch"):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training (and validation) loss against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train_points = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if train_points:
        ax.plot(*zip(*train_points), label="train loss")
    if val_points:
        ax.plot(*zip(*val_points), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summary(run: Run, finished: bool) -> dict[str, Any]:
    """What the run wrote, and its history; printed when it finished."""
    files, state = run.files, run.state
    stem = files.epoch(state["epoch"] - 1)
    checkpoint = stem.with_name(stem.name + ".safetensors") if finished else None
    result = {"finished": finished, "out_dir": str(files.folder), "history": state["history"], "best": state["best"],
              "checkpoint": str(checkpoint) if checkpoint else None, "resume": str(files.resume),
              "config": str(files.config), "log": str(files.log), "loss_plot": str(files.loss_plot)}
    if finished:
        losses = [r["loss"] for r in state["history"] if "loss" in r]
        run.log.text(f"done: {state['global_step']} steps, final train loss {losses[-1]:.4f}" if losses else "done")
        run.log.text(f"checkpoint: {checkpoint}  (config {files.config})")
        if state["best"]:
            run.log.text(f"best epoch {state['best']['epoch']}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in state["best"].items() if k.startswith("val_")) +
                f"  -> {files.named('best')}.safetensors")
        run.log.text(f"log: {files.log}, loss curve: {files.loss_plot}, tensorboard: {files.folder / 'tensorboard'}")
    return result
