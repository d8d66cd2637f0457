"""Encoding a dataset with CLIP at scale, resumably, on any number of torchrun processes.

Each image is encoded once (the original encoded a COCO image once per caption), decoded in
DataLoader workers, batched, fp16/bf16 on GPU; bad images are skipped and reported, never
encoded as zeros. Output goes to a :mod:`clipcap.store` shard by shard, so a killed run resumes
(a rerun of another job is refused), and torchrun ranks split the shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import store as feature_store
from .encoder import MAX_PIXELS, ImageEncoder, Preprocess, default_dtype, load_image, load_image_encoder
from .files import ClipCapError, remove_stale_temp_files, write_json
from .runtime import pick_device, start_processes
from .sources import ImageItem, Shard


class _Images(Dataset):
    """Decodes and crops images in DataLoader workers; a bad image becomes a reason, not an exception."""

    def __init__(self, items: Sequence[ImageItem], transform: Preprocess, max_pixels: int):
        self.items, self.transform, self.max_pixels = items, transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            with item.open() as f:
                image = load_image(f, name=item.name, max_pixels=self.max_pixels)
        except ClipCapError as e:
            return i, None, str(e).removeprefix(f"{item.name}: ")
        except Exception as e:  # a decoder bug on one odd file must not end a day-long job
            return i, None, f"decoder failed ({type(e).__name__}: {e})"
        return i, self.transform.crop(image), None


# A batch of the good crops, and the failures beside it as (index, reason).
def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, [(i, reason) for i, _, reason in batch if reason is not None]


def _encode_shard(shard: Shard, encoder: ImageEncoder, store: Path, batch_size: int, num_workers: int,
                  max_pixels: int, progress: tqdm, written_by: str) -> None:
    items, skipped = shard.list_items()
    progress.update(len(skipped))
    failed: list[tuple[int, str]] = [(i, "no caption") for i, item in enumerate(items) if not item.captions]
    todo = [i for i, item in enumerate(items) if item.captions]
    loader = DataLoader(_Images([items[i] for i in todo], encoder.transform, max_pixels), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=encoder.device.type == "cuda",
                        prefetch_factor=4 if num_workers else None)
    row_of: dict[int, int] = {}
    chunks = []
    for indices, pixels, failures in loader:
        failed += [(todo[i], reason) for i, reason in failures]
        if pixels is not None:
            embeddings = encoder.encode(encoder.transform.normalize(pixels.to(encoder.device, non_blocking=True)))
            finite = torch.isfinite(embeddings).all(dim=1).tolist()
            failed += [(todo[i], "non-finite embedding") for i, ok in zip(indices, finite) if not ok]
            for i in (i for i, ok in zip(indices, finite) if ok):
                row_of[todo[i]] = len(row_of)
            chunks.append(embeddings[torch.tensor(finite, device=embeddings.device)].half().cpu().numpy())
        progress.update(len(indices) + len(failures))
    captions, image_ids, rows = [], [], []
    for i, row in row_of.items():
        captions += items[i].captions
        image_ids += [items[i].image_id] * len(items[i].captions)
        rows += [row] * len(items[i].captions)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float16)
    skipped = skipped + [(items[i].name, reason) for i, reason in sorted(failed)]
    feature_store.write_shard(store, shard.name, embeddings, captions, image_ids, rows, skipped, written_by)


def _clip_fingerprint(name: str) -> str | None:
    """A local CLIP directory's files by name, size and time (its weights and preprocessing); None for a hub name."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = path.stat()
        h.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _difference(key: str, before: Any, now: Any) -> str:
    if key == "shards":
        before, now = before or {}, now or {}
        if list(before) != list(now):
            return f"{len(before)} shards, not {len(now)}" if len(before) != len(now) else "other shard names"
        changed = [name for name in now if before[name] != now[name]]
        return f"other images in shard {changed[0]}" + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
    if key == "clip_model":
        return f"CLIP {before}, not {now}"
    if key == "clip_files":
        return "other files in its CLIP directory (weights or preprocessing changed)"
    return f"{key} {before!r}, not {now!r}"


def _check_job(store: Path, job: dict[str, Any]) -> None:
    """A rerun resumes only the job that the finished shards were made by: same images, shards, CLIP, dtype.

    ``job`` records what defines each shard's contents; any difference is refused, naming it,
    since the finished shards would otherwise be kept for images they do not hold.
    """
    path, job = store / "job.json", json.loads(json.dumps(job))  # as it reads back
    if path.is_file():
        before = json.loads(path.read_text())
        keys = [key for key in dict.fromkeys([*job, *before]) if before.get(key) != job.get(key)]
        if "clip_model" in keys and "clip_files" in keys:  # another CLIP has other files: say so once
            keys.remove("clip_files")
        differences = [_difference(key, before.get(key), job.get(key)) for key in keys]
        if differences:
            raise ClipCapError(f"{store}: was started with {'; '.join(differences)}; rerun with the same "
                               f"arguments, or delete {store} to start over")
        return
    write_json(path, job, indent=None)


def extract(shards: Sequence[Shard], store: str | Path, clip_model: str = "ViT-B/32", *, device: str = "auto",
            dtype: torch.dtype | None = None, batch_size: int = 256, num_workers: int | None = None,
            max_pixels: int = MAX_PIXELS, meta: dict[str, Any] | None = None,
            settings: dict[str, Any] | None = None) -> int | None:
    """Encode every shard's images once into the feature store ``store``; returns the number skipped.

    Resumable: finished shards are kept and skipped on a rerun of the same job (the shards'
    fingerprints, CLIP, dtype, pixel limit and ``settings``, e.g. the flags that made the shards);
    another job is refused. Under torchrun each rank takes every WORLD_SIZE-th shard and writes
    its own; after a barrier rank 0 merges the index (other ranks return None). The store is the
    same whatever the number of processes or interruptions.
    """
    store = Path(store)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ClipCapError(f"{store}: shard names repeat")
    procs = start_processes("cpu", timeout=timedelta(days=7))  # gloo, for one barrier; ranks may finish hours apart
    try:
        device = pick_device(device, procs)
        if num_workers is None:
            num_workers = max(1, min(8, (os.cpu_count() or 1) // procs.local_world - 1))
        dtype = dtype or default_dtype(device)
        _check_job(store, {"clip_model": clip_model, "clip_files": _clip_fingerprint(clip_model),
                           "dtype": str(dtype).removeprefix("torch."), "max_pixels": max_pixels, **(settings or {}),
                           "shards": {s.name: s.fingerprint for s in shards}})
        for folder in (store, store / feature_store.SHARD_DIR):  # what killed runs left
            remove_stale_temp_files(folder)
        mine = [s for k, s in enumerate(shards)
                if k % procs.world == procs.rank and not feature_store.shard_done(store, s.name)]
        if mine:
            encoder = load_image_encoder(clip_model, device, dtype)
            sizes = [s.size for s in mine]
            rank = f"rank {procs.rank}/{procs.world}"
            with tqdm(total=sum(sizes) if None not in sizes else None, unit="img", disable=procs.local_rank != 0,
                      desc=f"CLIP {clip_model}" + (f" {rank}" if procs.world > 1 else "")) as progress:
                for shard in mine:
                    _encode_shard(shard, encoder, store, batch_size, num_workers, max_pixels, progress, rank)
        procs.barrier()
        if not procs.main:
            return None
        return feature_store.merge(store, names, {"clip_model": clip_model, **(meta or {})})
    finally:
        procs.close()


def model_tag(clip_model: str) -> str:
    """``ViT-B/32`` -> ``ViT-B_32`` (the original's file names); a local directory -> its name, a file -> its stem."""
    path = Path(clip_model)
    return path.name if path.is_dir() else path.stem if path.is_file() else clip_model.replace("/", "_")


def extract_to(shards: Sequence[Shard], out: str | Path, clip_model: str = "ViT-B/32", *, as_store: bool = False,
               meta: dict[str, Any] | None = None, **options: Any) -> Path | None:
    """Run :func:`extract` (``options`` are its keywords) into the original's pickle, or a store (``as_store``).

    The pickle is made from a store kept beside it (``NAME.pkl.parts``) until the pickle is written,
    so that a pickle run resumes too. Returns the output on the rank that wrote it, else None.
    """
    out = Path(out)
    work = out if as_store else out.with_name(out.name + ".parts")
    if not as_store and out.exists() and not work.exists():
        raise ClipCapError(f"{out}: already exists from a finished run; delete it to encode the images again")
    remove_stale_temp_files(out.parent)  # a killed run's half-written pickle
    skipped = extract(shards, work, clip_model, meta=meta, **options)
    if skipped is None:
        return None
    written = feature_store.read_meta(work)
    report = work / feature_store.SKIPPED_FILE
    if not as_store:
        feature_store.to_pickle(work, out)
        report = shutil.copyfile(report, out.with_name(out.stem + "_skipped.tsv")) if skipped else None
        shutil.rmtree(work)
    print(f"wrote {out}: {written['num_images']} images, {written['num_captions']} captions; {skipped} images skipped"
          + (f", listed in {report}" if skipped else ""))
    return out
