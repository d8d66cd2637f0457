"""Training ClipCap on cached CLIP features: one process or many (torchrun), resumable.

Read top to bottom: the configuration and what a resumed run may change of it, the data order,
then :func:`train`: :func:`setup`, the training :func:`train_step`, and :func:`end_of_epoch`, the
logs and the loss plot. The run's folder and resume state are :mod:`clipcap.run_state`'s.

Where this differs from the original's loop (on purpose):
- Each batch is padded to its own longest caption and the loss ignores padding only
  (the original padded to one global length and ignored token 0, which is the real "!").
- Prefix-only mode computes no gradients for the LM's weights.
- The loss of an optimizer step is the mean over all real tokens of the global batch, however
  it is split over processes (``--batch_size`` per process) and accumulation steps
  (``--grad_accum``), so N processes with batch B equal one process with batch N*B.
- Everything that can be checked is checked before the first step (flags, the output folder,
  the data and validation data, the LM, Java for validation CIDEr), and a non-finite loss stops
  the run before any checkpoint can hold its weights (:class:`LossGuard`).
- The warm-up is at most a tenth of the run, so that a small dataset learns with the defaults
  (COCO's 10 epochs keep the paper's 5,000 steps).
- ``--resume DIR`` alone continues the run with its own settings; changing one that would make
  it another run is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from . import lm as lms
from .checkpoint import CLIP_BY_WIDTH, clip_for_width, save_config
from .data import Batch, CaptionDataset, load_features, tokens_cache_path
from .encoder import same_clip
from .featureset import FeatureSet
from .files import ClipCapError, atomic_write, check_output_path, examples, remove_stale_temp_files
from .model import ClipCap, ClipCapConfig, build_model, load_tokenizer, renamed, setting
from .run_state import (
    ResumeState,
    RunFiles,
    find_resume_file,
    read_resume,
    restore,
    rng_states,
    save_resume,
    save_weights,
)
from .runtime import DEVICE_HELP, Processes, pick_device, start_processes
from .toolkit import require_java

# Model fields that the features or the LM decide, not flags.
FROM_THE_DATA = ("prefix_size", "clip_model", "lm_config", "lm_bos")
MAX_WARMUP_SHARE = 0.1  # of the run's steps: COCO's 10 epochs (~141k steps) keep the paper's 5,000
# Under torchrun the other processes wait while rank 0 alone validates, scores CIDEr with Java and
# writes checkpoints (GBs for GPT-2 fine-tuning): far longer than NCCL's default timeout allows.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


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
    warmup: int = setting(5000, "linear warm-up steps (at most a tenth of the run's), then linear decay to 0")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    clip_grad: float = setting(0.0, "max gradient norm (0: no clipping, as the original)")
    precision: str = setting("auto", "autocast: auto is bf16 on GPUs with bf16 tensor cores (compute "
                                     "capability 8+), else fp32",
                             choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    gradient_checkpointing: bool = setting(False, "recompute the LM's activations in the backward pass: less memory "
                                                  "to fine-tune a large LM (fully or with LoRA), more time per step")
    seed: int = setting(0, "initial weights, data order and dropout (0 to 2**64 - 1)")
    clip_model: str | None = setting(None, "the CLIP that made the features (default: the one they record; "
                                           "for the original's pickles, the CLIP of their width)")
    device: str = setting("auto", DEVICE_HELP + " (under torchrun: auto or cuda)")
    num_workers: int = setting(0, "DataLoader workers (a batch is one NumPy gather: 0 is usually fastest)")
    resume: str | None = setting(None, "continue the run in this folder (or this {prefix}_resume.pt) with its "
                                       "settings; of those, only --epochs (more), --batch_size and --grad_accum "
                                       "(the same global batch) and the flags of where and how it runs (--out_dir, "
                                       "--prefix, --device, --compile, --num_workers, --max_steps, the saving and "
                                       "logging intervals, --save_original_format, --skip_nonfinite) may change")
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
        if not (self.model.noise_variance >= 0 and np.isfinite(self.model.noise_variance)):
            raise ClipCapError(f"--noise_variance must be a non-negative number, got {self.model.noise_variance}")
        if not 0 <= self.seed < 2**64:
            raise ClipCapError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.prefix in ("", "..") or Path(self.prefix).name != self.prefix:
            raise ClipCapError(f"--prefix {self.prefix!r}: must be a plain file name start (no folder), the run's "
                               "files go into --out_dir")
        if self.val_captions and not self.val_data:
            raise ClipCapError(f"--val_captions {self.val_captions}: needs --val_data, the features to caption")
        self.model.check()
        if self.model.lm_dtype != "float32" and not self.model.frozen_lm:
            raise ClipCapError(f"--lm_dtype {self.model.lm_dtype}: half-precision weights are for a frozen LM "
                               "(--only_prefix or --lora_rank); to fine-tune the LM keep float32 weights, with "
                               "--precision bf16 for bf16 arithmetic")
        if self.save_original_format and self.model.lora_rank:
            raise ClipCapError("--save_original_format: the original's .pt format holds GPT-2 without LoRA "
                               "adapters; drop the flag (the .safetensors checkpoints hold the adapters)")

    def flat(self) -> dict[str, Any]:
        """The settings as train.py's flags name them: the run's fields and the model's (not those of the data)."""
        model = {k: v for k, v in self.model.to_dict().items() if k not in FROM_THE_DATA}
        return model | {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        values = renamed(values)  # the settings of runs from before ``--lm`` was ``--gpt2`` alone
        model_fields = {f.name for f in dataclasses.fields(ClipCapConfig)} - set(FROM_THE_DATA)
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"model"}
        return cls(model=ClipCapConfig(**{k: v for k, v in values.items() if k in model_fields}),
                   **{k: v for k, v in values.items() if k in run_fields})


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":  # V100 and T4 only emulate bf16 (no tensor cores for it): fp32 there
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
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


def modality_notes(cfg: TrainConfig, features: FeatureSet, val_features: FeatureSet | None) -> list[str]:
    """Text embeddings (parse_captions.py --text_only) train as image embeddings do (CapDec); validation
    CIDEr, which captions the validation embeddings as images, refuses them. Lines of warning for text
    embeddings trained on without noise or without normalisation, which caption images poorly."""
    if val_features is not None and cfg.val_captions:
        val_features.check_images(f"--val_data {cfg.val_data} (captioned for --val_captions)")
    if features.modality != "text":
        return []
    notes = []
    if cfg.model.noise_variance == 0:
        notes.append(f"{cfg.data}: text embeddings without --noise_variance: the model learns text embeddings "
                     "alone and will caption images poorly (CapDec: --noise_variance 0.016)")
    if not cfg.model.normalize_prefix:
        notes.append(f"{cfg.data}: text embeddings without --normalize_prefix: images will be captioned from raw "
                     "image embeddings, whose lengths differ from text ones' (CapDec normalises both)")
    return notes


# --------------------------------------------------------------------------- resuming a run

# What a resumed run may change: how much longer it runs, where and how it runs and writes. Any
# other setting would make it another run (another model, data, schedule or random draws).
SAFE_TO_CHANGE = ("epochs", "batch_size", "grad_accum", "out_dir", "prefix", "device", "compile", "num_workers",
                  "gradient_checkpointing", "max_steps", "save_every", "save_latest_every", "log_every",
                  "save_original_format", "skip_nonfinite", "resume", "overwrite")


def recorded_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resume state keeps: the flags' values, with local paths made absolute (a resumed
    run may start in another folder)."""
    settings = cfg.flat()
    for name in ("data", "val_data", "lm", "clip_model"):
        value = settings[name]
        if value and (name in ("data", "val_data") or Path(value).exists()):
            settings[name] = os.path.abspath(value)
    return settings


def resumed_config(resume: str, prefix: str | None = None) -> TrainConfig:
    """What ``--resume`` alone continues a run with: its own settings, writing where its resume state
    is, for as long as it was to run (a ``--max_steps`` it stopped at is not kept)."""
    path = find_resume_file(resume, prefix)
    saved = TrainConfig.from_flat(read_resume(path).settings)
    return dataclasses.replace(saved, out_dir=str(path.parent), resume=resume, max_steps=None, overwrite=False)


def check_unchanged(cfg: TrainConfig, resumed: ResumeState) -> None:
    """Refuse, naming old and new, a setting that would make the resumed run another run."""
    now, then = recorded_settings(cfg), renamed(resumed.settings)
    for name, old in then.items():
        new = now.get(name)
        if name in SAFE_TO_CHANGE or new == old or (name == "clip_model" and same_clip(old, new)):
            continue
        raise ClipCapError(f"--{name} {new}: the run being resumed ({resumed.path}) has {old}; a resumed run "
                           "keeps its settings (--help says which may change): drop the flag to continue it, or "
                           "start a new run in another --out_dir")
    if cfg.epochs < then["epochs"]:
        raise ClipCapError(f"--epochs {cfg.epochs}: the run being resumed ({resumed.path}) has {then['epochs']}; "
                           "a resumed run may get more epochs, not fewer")


def warmup_steps(cfg: TrainConfig, total_steps: int) -> tuple[int, str | None]:
    """The warm-up of a new run, capped at a tenth of its steps, and a note when the cap applies."""
    cap = max(1, int(total_steps * MAX_WARMUP_SHARE))
    if cfg.warmup <= cap:
        return cfg.warmup, None
    steps = f"{cap} step{'s' * (cap != 1)}"
    return cap, (f"warm-up: {steps}, a tenth of this run's {total_steps:,} (--warmup {cfg.warmup} would leave the "
                 "learning rate low for most of it)")


# --------------------------------------------------------------------------- the data order


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """[steps, global_batch] caption indices: a fresh shuffle each epoch, the last partial batch dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64))
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
    state: dict[str, Any]  # progress, history, best, and what fixes the steps and schedule: what a resume continues
    log: RunLog
    guard: LossGuard
    val: ValidationSet | None
    global_batch: int
    steps_per_epoch: int

    def save_resume(self) -> None:
        """Called by every process: each hands rank 0 its own RNG states, and rank 0 writes the resume state."""
        rng: list[Any] = [rng_states(self.device)]
        if self.procs.world > 1:
            rng = [None] * self.procs.world
            torch_dist.all_gather_object(rng, rng_states(self.device))
        if self.procs.main:
            save_resume(self.files.resume, self.model, self.optimizer, self.scheduler, self.scaler, rng,
                        recorded_settings(self.cfg), self.state)

    def save_weights(self, stem: Path) -> None:
        save_weights(self.model, stem, self.cfg.save_original_format)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, writing checkpoints and logs into ``cfg.out_dir``; returns a summary (paths, history).
    Under torchrun it joins the process group, and leaves it on the way out, error or not."""
    cfg.check()
    procs = start_processes(cfg.device, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        return run_epochs(setup(cfg, procs))
    finally:
        procs.close()


def run_epochs(run: Run) -> dict[str, Any]:
    """The epochs the run has left, step by step; a ``--max_steps`` stop can be resumed."""
    cfg, state, steps_this_run = run.cfg, run.state, 0
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
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
                run.log.scalars(record)
            if latest and run.procs.main:
                run.save_weights(run.files.named("latest"))
            if stopping or (latest and step + 1 < run.steps_per_epoch):  # at an epoch's end, after validation
                run.save_resume()
            if stopping:
                bar.close()
                run.log.text(f"stopped after {steps_this_run} steps (--max_steps); continue with "
                             f"{run.files.resume_hint()}")
                run.procs.barrier()
                return summary(run, finished=False)
        bar.close()
        end_of_epoch(run, epoch)
    return summary(run, finished=True)


def setup(cfg: TrainConfig, procs: Processes) -> Run:
    """Check everything that can be checked, then build the run: data, model, optimizer, resume state."""
    resumed = read_resume(find_resume_file(cfg.resume, cfg.prefix)) if cfg.resume else None
    if resumed:
        check_unchanged(cfg, resumed)
    if cfg.val_captions:
        require_java()  # validation CIDEr first runs at the end of epoch 1: fail now, not then
    device = pick_device(cfg.device, procs)
    autocast_dtype = pick_precision(cfg.precision, device)
    files = RunFiles(Path(cfg.out_dir), cfg.prefix)
    if procs.main:
        check_out_dir(cfg, files)

    features = load_features(cfg.data)
    val_features = load_features(cfg.val_data) if cfg.val_data and procs.main else None
    clip_model, clip_note = features_clip(cfg, features, val_features)
    notes = modality_notes(cfg, features, val_features)
    if cfg.save_original_format and not lms.is_gpt2(lms.config_of(cfg.model.lm, cfg.model.lm_revision)):
        raise ClipCapError(f"--save_original_format: the original's .pt format holds GPT-2, not {cfg.model.lm}; "
                           "drop the flag (the .safetensors checkpoints hold the model)")
    tokenizer = load_tokenizer(cfg.model.lm, cfg.model.lm_revision)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    config = dataclasses.replace(cfg.model, prefix_size=features.dim, clip_model=clip_model, lm_config={},
                                 lm_bos=lms.adds_bos(tokenizer))
    model = build_model(config).to(device)
    if cfg.gradient_checkpointing:
        lms.checkpoint_activations(model.gpt)
    positions = lms.max_positions(model.gpt.config)
    max_positions = None if positions is None else positions - model.prompt_length
    dataset = caption_dataset(cfg, features, tokenizer, positions, model.prompt_length, procs)

    global_batch = cfg.batch_size * procs.world * cfg.grad_accum
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ClipCapError(f"{cfg.data}: {len(dataset)} captions, fewer than one global batch of {global_batch}")
    warmup_note = None
    if resumed:
        state = resumed.progress
        check_same_steps(cfg, resumed, len(dataset), global_batch, procs)
    else:
        warmup, warmup_note = warmup_steps(cfg, cfg.epochs * steps_per_epoch)
        state = {"epoch": 0, "step": 0, "global_step": 0, "history": [], "best": None, "warmup": warmup,
                 "captions": len(dataset), "global_batch": global_batch}
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, state["warmup"], cfg.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    torch.manual_seed((cfg.seed + 1 + procs.rank) % 2**64)  # each process draws its own dropout masks
    if resumed:
        restore(resumed, model, optimizer, scheduler, scaler, procs.rank, device)

    step_model = step_module(model, procs, device, cfg.compile)
    val = ValidationSet(cfg, val_features, tokenizer, max_positions) if val_features is not None else None
    log = RunLog(files, procs.main, state)
    for note in (clip_note, warmup_note, *notes):
        if note:
            log.text(note)
    if procs.main:
        save_config(model.config, files.config)
        log.text(f"{len(dataset):,} captions, {steps_per_epoch:,} steps/epoch of {global_batch} "
                 f"({procs.world} process(es) x batch {cfg.batch_size} x accum {cfg.grad_accum}), {device}, "
                 f"precision {autocast_dtype or torch.float32}, trainable params "
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    token_counts = torch.from_numpy(np.minimum(np.diff(dataset.offsets), dataset.max_length))
    guard = LossGuard(device, cfg.skip_nonfinite, features, cfg.data, procs)
    return Run(cfg, procs, device, autocast_dtype, files, model, step_model, dataset, token_counts, optimizer,
               scheduler, scaler, state, log, guard, val, global_batch, steps_per_epoch)


def check_out_dir(cfg: TrainConfig, files: RunFiles) -> None:
    """The run's folder can be written, and a fresh run will not overwrite another run's files
    (whose ``.pt`` files would then load with this run's config) unless ``--overwrite`` says so."""
    if files.folder.exists() and not files.folder.is_dir():
        raise ClipCapError(f"--out_dir {files.folder}: not a folder")
    check_output_path(files.config, "--out_dir")
    existing = files.existing()
    if existing and not cfg.resume and not cfg.overwrite:
        raise ClipCapError(f"--out_dir {files.folder}: holds a run with prefix {cfg.prefix!r} ({existing[0].name}, "
                           f"...); continue it with {files.resume_hint()}, or pass --overwrite to replace it")
    if files.folder.is_dir():
        remove_stale_temp_files(files.folder)


def caption_dataset(cfg: TrainConfig, features: FeatureSet, tokenizer: Any, positions: int | None, prompt: int,
                    procs: Processes) -> CaptionDataset:
    """The training captions as tokens (the first process writes the token cache, the others read it),
    checked to fit in the LM's ``positions`` (None: no limit) after the ``prompt`` (the prefix, and
    the LM's BOS before it), at the data's truncation length."""
    k, name = cfg.model.prefix_length, cfg.model.lm
    if positions is not None and positions - prompt < 1:
        raise ClipCapError(f"--prefix_length {k} leaves no room for a caption: {name} takes {positions} positions")
    if procs.main:
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), source=cfg.data)
    procs.barrier()
    if not procs.main:
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), source=cfg.data)
    if positions is not None and dataset.max_length > positions - prompt:
        raise ClipCapError(f"--prefix_length {k} leaves {positions - prompt} of {name}'s {positions} positions "
                           f"for a caption, fewer than the {dataset.max_length} tokens {cfg.data}'s captions are cut "
                           f"to; use --prefix_length {positions - (prompt - k) - dataset.max_length} or less")
    return dataset


def check_same_steps(cfg: TrainConfig, resumed: ResumeState, captions: int, global_batch: int,
                     procs: Processes) -> None:
    """A resumed run cuts the data into the run's steps, or it would skip or repeat captions."""
    state = resumed.progress
    if captions != state["captions"]:
        raise ClipCapError(f"{cfg.data}: {captions:,} captions, but the run being resumed ({resumed.path}) had "
                           f"{state['captions']:,}: the file changed since")
    if global_batch != state["global_batch"]:
        raise ClipCapError(f"global batch {global_batch} ({procs.world} process(es) x --batch_size {cfg.batch_size} x "
                           f"--grad_accum {cfg.grad_accum}), but the run being resumed ({resumed.path}) has "
                           f"{state['global_batch']}: choose --batch_size and --grad_accum for that")


def step_module(model: ClipCap, procs: Processes, device: torch.device, compile: bool) -> nn.Module:
    """The model as the training step calls it. PyTorch's way for torch.compile with DDP: compile the
    model in place, then wrap it; DDP then splits the compiled graph at its gradient buckets, so that
    their all-reduce overlaps the backward pass."""
    if compile:
        model.compile()
    if procs.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
            record = {"epoch": epoch + 1, "step": state["global_step"], **metrics}
            state["history"].append(record)
            run.log.scalars(record)
            run.log.text(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            score = metrics.get("val_CIDEr", -metrics["val_loss"])
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"epoch": epoch + 1, "score": score, **metrics}
                run.save_weights(run.files.named("best"))
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            run.save_weights(run.files.epoch(epoch))
    run.save_resume()  # the other processes wait here for rank 0's validation
    if run.procs.main:
        plot_history(state["history"], run.files.loss_plot)


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
    before every checkpoint. ``save_checkpoint`` checks the weights finite as well.

    Under torchrun the processes decide together: backward has already averaged one process's
    non-finite gradients into every process's, so all of them skip the step (and the grad
    scaler's update, keeping their loss scales equal), or all of them stop.
    """

    NO_STEP = torch.iinfo(torch.long).max  # no bad step seen (the minimum over processes finds the first)

    def __init__(self, device: torch.device, skip: bool, features: FeatureSet, source: str,
                 procs: Processes = Processes()):
        self.eager = device.type != "cuda" or skip
        self.skip, self.features, self.source, self.procs = skip, features, source, procs
        self.skipped = 0
        self.bar: tqdm | None = None
        self.first_bad = torch.full((), self.NO_STEP, dtype=torch.long, device=device)  # on the device
        self.batches: dict[int, torch.Tensor] = {}  # step -> its caption indices, since the last check

    def observe(self, losses: list[torch.Tensor], step: int, captions: torch.Tensor) -> bool:
        """Whether the step's optimizer update may go ahead (the same answer in every process)."""
        finite = torch.stack([torch.isfinite(loss) for loss in losses]).all()
        if self.eager:
            if bool(self.everywhere(finite)):
                return True
            if not self.skip:
                self.fail(step, captions)
            self.skipped += 1
            return False
        self.first_bad = torch.where(finite | (self.first_bad != self.NO_STEP), self.first_bad, step)
        self.batches[step] = captions
        return True

    def everywhere(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether the loss is finite in every process."""
        if self.procs.world == 1:
            return finite
        flag = finite.to(torch.int32)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
        return flag.bool()

    def check(self) -> None:
        """Raise if a step since the last check had a non-finite loss in any process (one read from the device)."""
        if not self.eager:
            if self.procs.world > 1:
                torch_dist.all_reduce(self.first_bad, op=torch_dist.ReduceOp.MIN)
            step = int(self.first_bad)
            if step != self.NO_STEP:
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
        record = {"samples_per_s": float(totals[2]) / seconds, "tokens_per_s": float(totals[1]) / seconds}
        if totals[1] > 0:  # not when every step since the last log line was skipped
            record["loss"] = float(totals[0] / totals[1])
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset()
        return record


# --------------------------------------------------------------------------- validation


class ValidationSet:
    """Validation loss over a held-out feature file and, optionally, CIDEr of greedy captions."""

    def __init__(self, cfg: TrainConfig, features: FeatureSet, tokenizer: Any, max_positions: int | None):
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
    """Rank 0's record of a run: JSONL and TensorBoard scalars, and messages printed above the bar.

    Both start where the run's ``state`` is: a killed run logged steps after its last resume state,
    which the resumed run logs again, so the JSONL is rewritten from the state's history and
    TensorBoard drops what it holds past the state's step (for a new run: everything before).
    """

    def __init__(self, files: RunFiles, enabled: bool, state: dict[str, Any]):
        self.enabled = enabled
        self.path = files.log
        self.writer = None
        if enabled:
            files.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path) as tmp:
                tmp.write_text("".join(json.dumps(record) + "\n" for record in state["history"]))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(files.folder / "tensorboard" / files.prefix),
                                        purge_step=state["global_step"] + 1)

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
