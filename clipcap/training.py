"""Training ClipCap on cached CLIP features: one process or many (torchrun), resumable.

Read top to bottom: configuration, the data order, the loop, checkpoints and logs.

Where this differs from the original's loop (on purpose):
- Each batch is padded to its own longest caption and the loss ignores padding only
  (the original padded to one global length and ignored token 0, which is the real "!").
- Prefix-only mode computes no gradients for GPT-2's weights.
- The loss of an optimizer step is the mean over all real tokens of the global batch, however
  it is split over processes (``--bs`` per process) and accumulation steps (``--grad_accum``),
  so N processes with batch B equal one process with batch N*B.

Everything that can be checked is checked before the first step (flags, the output folder, the
data and validation data, GPT-2), and a non-finite loss stops the run before any checkpoint
can hold its weights (see ``LossGuard``).
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from .checkpoint import (CLIP_BY_WIDTH, check_compatible, check_finite, clip_for_width, first_line, load_pt,
                         load_state, parse_config, save_checkpoint, save_config)
from .data import CaptionDataset, FeatureSet, load_features, tokens_cache_path
from .encoder import OPENAI_CHECKPOINTS
from .files import ClipCapError, atomic_write, check_output_path
from .model import ClipCap, ClipCapConfig, build_model, load_tokenizer
from .runtime import resolve_device


@dataclass
class TrainConfig:
    """Defaults are the paper's (COCO, MLP mapper, GPT-2 fine-tuned, batch 40, 10 epochs)."""

    data: str = "./data/coco/oscar_split_ViT-B_32_train.pkl"
    out_dir: str = "./checkpoints"
    prefix: str = "coco_prefix"
    epochs: int = 10
    save_every: int = 1
    prefix_length: int = 10
    prefix_length_clip: int = 10
    bs: int = 40  # per process; the global batch is bs * processes * grad_accum
    only_prefix: bool = False
    mapping_type: str = "mlp"
    num_layers: int = 8
    normalize_prefix: bool = False
    lr: float = 2e-5
    warmup: int = 5000
    gpt2: str = "gpt2"
    clip_model: str | None = None  # default: the CLIP the training features record
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0  # a batch is one NumPy gather in this process; workers only add copies between processes
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 on GPUs that have it, else fp32)
    grad_accum: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0 = no clipping (the original)
    compile: bool = False
    resume: str | None = None
    save_original_format: bool = False
    save_latest_every: int = 10_000  # optimizer steps between {prefix}_latest checkpoints
    max_steps: int | None = None  # stop (resumably) after this many steps in this run
    val_data: str | None = None
    val_captions: int = 0  # CIDEr on this many validation images each epoch (greedy captions)
    log_every: int = 20
    overwrite: bool = False  # start afresh in an out_dir that holds files of a run with the same prefix
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/inf (no optimizer step) instead of stopping


POSITIVE_FIELDS = ("epochs", "save_every", "prefix_length", "prefix_length_clip", "bs", "grad_accum",
                   "save_latest_every", "log_every")


def check_config(cfg: TrainConfig) -> None:
    """Flags that would crash later or do nothing, refused up front with the flag's name."""
    for name in POSITIVE_FIELDS:
        if getattr(cfg, name) < 1:
            raise ClipCapError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup", "num_workers", "val_captions", "num_layers"):
        if getattr(cfg, name) < 0:
            raise ClipCapError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ClipCapError(f"--max_steps must be at least 1, got {cfg.max_steps}")
    if not (cfg.lr > 0 and np.isfinite(cfg.lr)):
        raise ClipCapError(f"--lr must be a positive number, got {cfg.lr}")
    if not (cfg.clip_grad >= 0 and np.isfinite(cfg.clip_grad)):
        raise ClipCapError(f"--clip_grad must be a non-negative number, got {cfg.clip_grad}")


def run_files(out_dir: Path, prefix: str) -> list[Path]:
    """The files a run with ``prefix`` writes into ``out_dir`` (that exist)."""
    p = glob.escape(str(out_dir / prefix))
    patterns = ("_resume.pt", "_config.json", "_log.jsonl", "-[0-9][0-9][0-9].*", "_latest.*", "_best.*")
    return sorted({Path(f) for pattern in patterns for f in glob.glob(p + pattern)})


def check_out_dir(cfg: TrainConfig) -> None:
    """The output folder can be written, and a fresh run will not overwrite another run's files
    (whose ``.pt`` files would then load with this run's config) unless ``--overwrite`` says so."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ClipCapError(f"--out_dir {out_dir}: not a folder")
    check_output_path(out_dir / f"{cfg.prefix}_config.json", "--out_dir")
    existing = run_files(out_dir, cfg.prefix)
    if existing and not cfg.resume and not cfg.overwrite:
        raise ClipCapError(f"--out_dir {out_dir}: holds a run with prefix {cfg.prefix!r} ({existing[0].name}, ...); "
                           f"continue it with --resume {out_dir}, or pass --overwrite to replace it")


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def start_processes(device: str) -> Processes:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    if not torch_dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
    return Processes(torch_dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, procs: Processes) -> torch.device:
    device = torch.device(resolve_device(name))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", procs.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    return device


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in choices:
        raise ClipCapError(f"--precision must be one of {sorted(choices)} or auto, got {name!r}")
    return choices[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(model: ClipCap, lr: float) -> torch.optim.AdamW:
    """The original's AdamW (eps 1e-6, no weight decay) over the trainable weights, fused:
    one kernel for all tensors, several times faster than the per-tensor loop on CPU and GPU."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-6,
                             weight_decay=0.0, fused=True)


# --------------------------------------------------------------------------- data order


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


# --------------------------------------------------------------------------- the features' CLIP


def same_clip(a: str, b: str) -> bool:
    """Whether two CLIP names mean one model (``ViT-B/32`` is ``openai/clip-vit-base-patch32``;
    a local directory is itself however its path is spelled)."""
    def identity(name: str) -> str:
        name = OPENAI_CHECKPOINTS.get(name, name)
        return str(Path(name).resolve()) if Path(name).is_dir() else name
    return identity(a) == identity(b)


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
        theirs = val_features.clip_model
        ours = recorded or cfg.clip_model
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


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, write checkpoints and logs into ``cfg.out_dir``; returns a summary (paths, history)."""
    check_config(cfg)
    procs = start_processes(cfg.device)
    device = pick_device(cfg.device, procs)
    autocast_dtype = pick_precision(cfg.precision, device)
    out_dir = Path(cfg.out_dir)
    if procs.main:
        check_out_dir(cfg)

    features = load_features(cfg.data)
    val_features = load_features(cfg.val_data) if cfg.val_data and procs.main else None
    clip_model, note = features_clip(cfg, features, val_features)
    log = RunLog(out_dir, cfg.prefix, enabled=procs.main, fresh=not cfg.resume)
    if note:
        log.text(note)
    tokenizer = load_tokenizer(cfg.gpt2)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = build_model(ClipCapConfig(
        prefix_length=cfg.prefix_length, prefix_length_clip=cfg.prefix_length_clip, prefix_size=features.dim,
        mapping_type=cfg.mapping_type, num_layers=cfg.num_layers, only_prefix=cfg.only_prefix,
        normalize_prefix=cfg.normalize_prefix, gpt2=cfg.gpt2, clip_model=clip_model)).to(device)
    max_positions = model.gpt.config.n_positions - cfg.prefix_length
    if max_positions < 1:
        raise ClipCapError(f"--prefix_length {cfg.prefix_length} leaves no room for a caption: "
                           f"{cfg.gpt2} takes {model.gpt.config.n_positions} positions")
    if procs.main:  # the first process writes the token cache, the others read it
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), max_positions, source=cfg.data)
    procs.barrier()
    if not procs.main:
        dataset = CaptionDataset(features, tokenizer, tokens_cache_path(cfg.data), max_positions, source=cfg.data)
    token_counts = torch.from_numpy(np.minimum(np.diff(dataset.offsets), dataset.max_length))

    global_batch = cfg.bs * procs.world * cfg.grad_accum
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ClipCapError(f"{cfg.data}: {len(dataset)} captions, fewer than one global batch of {global_batch}")
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    state = {"epoch": 0, "step": 0, "global_step": 0, "history": [], "best": None}
    if cfg.resume:
        state = restore(find_resume_file(cfg.resume, cfg.prefix), model, optimizer, scheduler, scaler)

    step_model: nn.Module = torch.compile(model) if cfg.compile else model
    if procs.world > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)

    val = ValidationSet(cfg, val_features, tokenizer, max_positions) if val_features is not None else None
    guard = LossGuard(device, cfg.skip_nonfinite, dataset.features, cfg.data)
    if procs.main:
        save_config(model.config, out_dir / f"{cfg.prefix}_config.json")
        log.text(f"{len(dataset):,} captions, {steps_per_epoch:,} steps/epoch of {global_batch} "
                 f"({procs.world} process(es) x bs {cfg.bs} x accum {cfg.grad_accum}), {device}, "
                 f"precision {autocast_dtype or torch.float32}, trainable params "
                 f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")

    steps_this_run = 0
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        batches = epoch_batches(len(dataset), global_batch, cfg.seed, epoch)
        first = state["step"] if epoch == state["epoch"] else 0
        loader = DataLoader(dataset, sampler=MicroBatches(batches[first:], procs, cfg.bs, cfg.grad_accum),
                            batch_size=None, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(epoch))  # leaves the global RNG (dropout) alone
        micro_batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not procs.main, dynamic_ncols=True)
        guard.bar = bar  # closed before an error, so that the message starts a line of its own
        window = Throughput(device)
        for step in range(first, steps_per_epoch):
            step_tokens = int(token_counts[batches[step]].sum())
            step_losses = []
            for micro in range(cfg.grad_accum):
                tokens, lengths, embeds, positions = next(micro_batches)
                tokens, embeds, positions = (t.to(device, non_blocking=True) for t in (tokens, embeds, positions))
                syncing = micro == cfg.grad_accum - 1 or procs.world == 1
                with step_model.no_sync() if not syncing else nullcontext(), autocast(device, autocast_dtype):
                    loss_sum = step_model(embeds, tokens, positions, reduction="sum")
                    # DDP averages gradients over processes; scale so the step's gradient is the global token mean
                    scaler.scale(loss_sum * (procs.world / step_tokens)).backward()
                step_losses.append((loss_sum.detach(), len(positions), len(lengths)))
            if guard.observe([loss for loss, _, _ in step_losses], state["global_step"] + 1, batches[step]):
                for loss, n_tokens, n_samples in step_losses:
                    window.add(loss, n_tokens, n_samples)
                if cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.update(epoch=epoch, step=step + 1, global_step=state["global_step"] + 1)
            steps_this_run += 1
            bar.update(1)

            logging = state["global_step"] % cfg.log_every == 0 or step + 1 == steps_per_epoch
            saving = state["global_step"] % cfg.save_latest_every == 0 or steps_this_run == cfg.max_steps
            if logging or saving:
                guard.check()  # before any checkpoint is written, and with the values read to log anyway
            if logging:
                record = window.flush(procs) | {"epoch": epoch + 1, "step": state["global_step"],
                                                "lr": scheduler.get_last_lr()[0]}
                if guard.skipped:
                    record["skipped_nonfinite"] = guard.skipped
                state["history"].append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                log.scalars(record)
            if state["global_step"] % cfg.save_latest_every == 0 and procs.main:
                save_weights(model, out_dir / f"{cfg.prefix}_latest", cfg.save_original_format)
                save_resume(out_dir / f"{cfg.prefix}_resume.pt", model, optimizer, scheduler, scaler, state)
            if cfg.max_steps is not None and steps_this_run >= cfg.max_steps:
                bar.close()
                if procs.main:
                    save_resume(out_dir / f"{cfg.prefix}_resume.pt", model, optimizer, scheduler, scaler, state)
                    log.text(f"stopped after {steps_this_run} steps (--max_steps); continue with "
                             f"--resume {out_dir}")
                procs.barrier()
                return summary(out_dir, cfg, state, log, finished=False)
        bar.close()

        state.update(epoch=epoch + 1, step=0)
        guard.check()
        if procs.main:
            if val is not None:
                metrics = val.evaluate(model)
                state["history"].append({"epoch": epoch + 1, "step": state["global_step"], **metrics})
                log.scalars({"step": state["global_step"], **metrics})
                log.text(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                score = metrics.get("val_CIDEr", -metrics["val_loss"])
                if state["best"] is None or score > state["best"]["score"]:
                    state["best"] = {"epoch": epoch + 1, "score": score, **metrics}
                    save_weights(model, out_dir / f"{cfg.prefix}_best", cfg.save_original_format)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                save_weights(model, out_dir / f"{cfg.prefix}-{epoch:03d}", cfg.save_original_format)
            save_resume(out_dir / f"{cfg.prefix}_resume.pt", model, optimizer, scheduler, scaler, state)
            plot_history(state["history"], out_dir / f"{cfg.prefix}_loss.png")
        procs.barrier()
    return summary(out_dir, cfg, state, log, finished=True)


class NonFiniteLoss(ClipCapError):
    """Training met a NaN or infinite loss (and --skip_nonfinite was not given)."""


class LossGuard:
    """Stops training at the first non-finite loss, naming the step and its captions, before any
    checkpoint is written; or, with ``skip``, skips such steps (no optimizer step) and counts them.

    Checking ``torch.isfinite(loss)`` on the host every step would make a GPU run wait for each
    step to finish before queuing the next. So: on the CPU, and with ``skip`` (which must know
    before the optimizer step), each step is checked at once. On a GPU, the first bad step's
    number is recorded on the device and read by ``check()``, which the loop calls when it logs
    (a read that happens anyway) and before every checkpoint, validation or resume write; the
    weights are also checked finite by ``save_checkpoint`` itself. In several processes each
    checks its own losses: a bad batch in any process stops that process, and torchrun then
    ends the others.
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
            self.bar.close()
        indices = captions.tolist()
        ids = [self.features.image_ids[i] for i in indices[:5]]
        raise NonFiniteLoss(f"{self.source}: non-finite loss at step {step}, in the batch of captions "
                            f"{_examples(indices)} (image ids {_examples(ids)}); nothing was saved from this step "
                            "on. Lower --lr, use --clip_grad, or pass --skip_nonfinite to skip such batches")


def _examples(values: list[Any], n: int = 5) -> str:
    return ", ".join(map(repr, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


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
        self.tokenizer, self.bs, self.num_images = tokenizer, cfg.bs, cfg.val_captions

    @torch.no_grad()
    def evaluate(self, model: ClipCap) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self.dataset), self.bs):
            batch = self.dataset[range(start, min(start + self.bs, len(self.dataset)))]
            total += float(model(batch.embeddings.to(device), batch.tokens.to(device), batch.positions.to(device),
                                 reduction="sum"))
            count += len(batch.positions)
        metrics = {"val_loss": total / count}
        if self.num_images > 0:
            metrics["val_CIDEr"] = self.cider(model)
        model.train()
        return metrics

    def cider(self, model: ClipCap) -> float:
        from .decoding import caption_embeddings
        from .evaluation import score

        references: dict[Any, list[str]] = {}
        rows: dict[Any, int] = {}
        for caption, row, image_id in zip(self.features.captions, self.features.image_index, self.features.image_ids):
            if image_id in rows or len(rows) < self.num_images:
                rows.setdefault(image_id, int(row))
                references.setdefault(image_id, []).append(caption)
        embeds = self.features.embeddings_at(np.array(list(rows.values())))
        captions = caption_embeddings(model, self.tokenizer, embeds.to(next(model.parameters()).device),
                                      strategy="greedy")
        results = [{"image_id": i, "caption": c[0]} for i, c in zip(rows, captions)]
        return score(results, references, metrics=("CIDEr",))["CIDEr"]


# --------------------------------------------------------------------------- checkpoints


def save_weights(model: ClipCap, stem: Path, original_format: bool) -> None:
    """``stem.safetensors`` (ours), and ``stem.pt`` (the original's layout) when asked."""
    save_checkpoint(model, stem.with_name(stem.name + ".safetensors"))
    if original_format:
        save_checkpoint(model, stem.with_name(stem.name + ".pt"))


def save_resume(path: Path, model: ClipCap, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Everything needed to continue exactly where this step ended (loadable with weights_only=True)."""
    trainable = {k: v for k, v in model.state_dict().items()
                 if not model.config.only_prefix or k.startswith("clip_project.")}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_write(path) as tmp:
        torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng, "config": json.dumps(model.config.to_dict()),
                    "state": json.dumps(state)}, tmp)


def find_resume_file(path: str, prefix: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / f"{prefix}_resume.pt"
    if not p.is_file():
        raise ClipCapError(f"{p}: no resume state to continue from")
    return p


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "config", "state")


def restore(path: Path, model: ClipCap, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler) -> dict[str, Any]:
    try:
        saved = load_pt(path)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ClipCapError(f"{path}: unreadable resume state ({first_line(e)})") from None
    if not isinstance(saved, dict) or any(k not in saved for k in RESUME_KEYS) or not isinstance(saved["model"], dict):
        raise ClipCapError(f"{path}: not a resume state of train.py (expected the {prefix_of(path)}_resume.pt "
                           "that training writes, holding model, optimizer and progress)")
    try:
        theirs = parse_config(json.loads(saved["config"]), path)
        progress = json.loads(saved["state"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ClipCapError(f"{path}: resume state has an unreadable config or progress ({e})") from None
    check_finite(saved["model"], path)
    if theirs.only_prefix != model.config.only_prefix:
        raise ClipCapError(f"{path}: checkpoint has only_prefix {theirs.only_prefix}, "
                           f"model built with {model.config.only_prefix}")
    check_compatible(saved["model"], model, path, theirs)
    load_state(model, saved["model"], path)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, TypeError) as e:
        raise ClipCapError(f"{path}: resume state's optimizer does not fit this run ({first_line(e)})") from None
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return progress


def prefix_of(path: Path) -> str:
    return path.name.removesuffix("_resume.pt") if path.name.endswith("_resume.pt") else "{prefix}"


# --------------------------------------------------------------------------- logs and plots


class RunLog:
    """Rank 0's record of a run: JSONL and TensorBoard scalars, and messages printed above the bar."""

    def __init__(self, out_dir: Path, prefix: str, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.path = out_dir / f"{prefix}_log.jsonl"
        self.writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            if fresh:  # a new run (--overwrite) starts a new log; a resumed one appends
                self.path.unlink(missing_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard" / prefix))

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


def summary(out_dir: Path, cfg: TrainConfig, state: dict[str, Any], log: RunLog, finished: bool) -> dict[str, Any]:
    last_epoch = state["epoch"] - 1
    result = {"finished": finished, "out_dir": str(out_dir), "history": state["history"], "best": state["best"],
              "checkpoint": str(out_dir / f"{cfg.prefix}-{last_epoch:03d}.safetensors") if finished else None,
              "resume": str(out_dir / f"{cfg.prefix}_resume.pt"), "config": str(out_dir / f"{cfg.prefix}_config.json"),
              "log": str(log.path), "loss_plot": str(out_dir / f"{cfg.prefix}_loss.png")}
    if finished:
        losses = [r["loss"] for r in state["history"] if "loss" in r]
        log.text(f"done: {state['global_step']} steps, final train loss {losses[-1]:.4f}" if losses else "done")
        log.text(f"checkpoint: {result['checkpoint']}  (config {result['config']})")
        if state["best"]:
            log.text(f"best epoch {state['best']['epoch']}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in state["best"].items() if k.startswith("val_")) +
                f"  -> {out_dir / (cfg.prefix + '_best.safetensors')}")
        log.text(f"log: {result['log']}, loss curve: {result['loss_plot']}, tensorboard: {out_dir / 'tensorboard'}")
    return result


def config_from_args(args: Any) -> TrainConfig:
    known = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in known})

