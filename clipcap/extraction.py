"""Encoding a dataset with CLIP at scale, resumably, on any number of torchrun processes.

Each image is encoded once (the original encoded a COCO image once per caption), decoded in
DataLoader workers, batched, fp16/bf16 on GPU; bad images are skipped and reported, never
encoded as zeros. Output goes to a :mod:`clipcap.store`. Each shard's images are cut into pieces
(up to ``PIECES_PER_SHARD``, of whole batches), and torchrun ranks take the pieces of all shards
in turn, so that every GPU has work until the end however few the shards. Finished pieces stay on
disk, so a killed run resumes (a rerun of another job is refused); rank 0 joins each shard's
pieces at the end. The store is the same, byte for byte, whatever the number of processes or
interruptions. One job at a time writes an output: its lock (:mod:`clipcap.locking`) refuses a second.

With ``text=True`` the same machinery encodes captions with CLIP's text tower instead (text-only
training, CapDec): each item is one caption, which becomes one embedding row.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import locking
from . import store as feature_store
from .encoder import MAX_PIXELS, ImageEncoder, Preprocess, default_dtype, load_image, load_image_encoder
from .files import ClipCapError, remove_stale_temp_files, write_json
from .runtime import Processes, pick_device, start_processes
from .sources import ImageItem, Shard
from .text_encoder import TextEncoder, load_text_encoder

JOB_FILE = "job.json"  # in a store: what made it (see _check_job)
# A shard is cut into at most this many pieces, the units that torchrun ranks share out.
PIECES_PER_SHARD = 32


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


@dataclass
class _Listing:
    """A shard's images as listed, and how they are cut into pieces (the same on every rank)."""

    items: list[ImageItem]
    skipped: list[tuple[str, str]]  # (path, reason) of what the listing left out: reported with the first piece
    pieces: list[tuple[int, int]]  # [start, stop) of each piece, in order
    key: str  # a digest of the listing: pieces of another listing of the shard are never reused

    def piece(self, k: int) -> str:
        start, stop = self.pieces[k]
        return f"{self.key}/{start:09d}-{stop:09d}"


def _list(shard: Shard, batch_size: int) -> _Listing:
    """List ``shard`` and cut it into at most PIECES_PER_SHARD pieces of whole batches (at least one piece)."""
    items, skipped = shard.list_items()
    size = batch_size * max(1, -(-len(items) // (PIECES_PER_SHARD * batch_size)))
    pieces = [(start, min(start + size, len(items))) for start in range(0, len(items), size)] or [(0, 0)]
    listing = json.dumps([[(i.image_id, i.captions, i.path, i.span, i.name) for i in items], skipped], default=str)
    return _Listing(items, skipped, pieces, hashlib.sha256(listing.encode()).hexdigest()[:16])


# A batch's item indices, their embeddings (None if none was made), and its failures as (index, reason).
_Embedded = tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]


def _embedded(items: Sequence[ImageItem], batches: list[list[int]], encoder: ImageEncoder | TextEncoder,
              num_workers: int, max_pixels: int) -> Iterator[_Embedded]:
    """Batch by batch: the indices of the items encoded, their embeddings (None if none was), and the
    failures as (index, reason). Images are decoded and cropped in DataLoader workers and normalised on
    the encoder's device; captions (one per item) are tokenised here, which takes little time."""
    if isinstance(encoder, TextEncoder):
        for batch in batches:
            yield batch, encoder([items[i].captions[0] for i in batch]), []
        return
    if not batches:
        return
    loader = DataLoader(_Images(items, encoder.transform, max_pixels), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=encoder.device.type == "cuda",
                        prefetch_factor=4 if num_workers else None)
    for indices, pixels, failures in loader:
        embeddings = None
        if pixels is not None:
            embeddings = encoder.encode(encoder.transform.normalize(pixels.to(encoder.device, non_blocking=True)))
        yield indices, embeddings, failures


def _encode_pieces(shard: Shard, listing: _Listing, mine: list[int], encoder: ImageEncoder | TextEncoder, store: Path,
                   batch_size: int, num_workers: int, max_pixels: int, progress: tqdm, written_by: str) -> None:
    """Encode pieces ``mine`` of the shard, one DataLoader for all of them; each piece is written when done.

    Batches never span two pieces, so a piece's embeddings are the same whichever rank encodes it.
    """
    items = listing.items
    batches, ends = [], []  # item indices of each batch; the number of batches up to each piece's end
    for k in mine:
        start, stop = listing.pieces[k]
        todo = [i for i in range(start, stop) if items[i].captions]
        batches += [todo[b:b + batch_size] for b in range(0, len(todo), batch_size)]
        ends.append(len(batches))
    embedded = _embedded(items, batches, encoder, num_workers, max_pixels)
    done = 0
    for k, end in zip(mine, ends):
        start, stop = listing.pieces[k]
        failed: list[tuple[int, str]] = [(i, "no caption") for i in range(start, stop) if not items[i].captions]
        kept, chunks = [], []
        for indices, embeddings, failures in (next(embedded) for _ in range(done, end)):
            failed += failures
            if embeddings is not None:
                finite = torch.isfinite(embeddings).all(dim=1).tolist()
                failed += [(i, "non-finite embedding") for i, ok in zip(indices, finite) if not ok]
                kept += [i for i, ok in zip(indices, finite) if ok]
                chunks.append(embeddings[torch.tensor(finite, device=embeddings.device)].half().cpu().numpy())
            progress.update(len(indices) + len(failures))
        listed = listing.skipped if start == 0 else []  # what the listing left out, reported with the first piece
        progress.update(len(listed) + sum(reason == "no caption" for _, reason in failed))
        done = end
        skipped = listed + [(items[i].name, reason) for i, reason in sorted(failed)]
        feature_store.write_piece(
            store, shard.name, listing.piece(k),
            np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float16),
            [c for i in kept for c in items[i].captions], [items[i].image_id for i in kept for _ in items[i].captions],
            [row for row, i in enumerate(kept) for _ in items[i].captions], skipped, written_by)


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


def _job(shards: Sequence[Shard], clip_model: str, dtype: torch.dtype, max_pixels: int,
         settings: dict[str, Any] | None, text: bool = False) -> dict[str, Any]:
    """What defines an extraction's output: the shards' items, the CLIP (and which of its towers), dtype,
    pixel limit and ``settings``."""
    return {"clip_model": clip_model, "clip_files": _clip_fingerprint(clip_model),
            "dtype": str(dtype).removeprefix("torch."), "max_pixels": max_pixels,
            **({"modality": "text"} if text else {}), **(settings or {}),
            "shards": {s.name: s.fingerprint for s in shards}}


def _check_job(path: Path, job: dict[str, Any], output: Path, finished: bool = False) -> None:
    """A rerun continues (or keeps) only what the same job made: same images, shards, CLIP, dtype.

    ``path`` records the job of ``output`` (written on the first run); any difference is refused,
    naming it, since the finished shards (or a finished pickle) would otherwise be kept for images
    they do not hold.
    """
    job = json.loads(json.dumps(job))  # as it reads back
    if path.is_file():
        before = json.loads(path.read_text())
        keys = [key for key in dict.fromkeys([*job, *before]) if before.get(key) != job.get(key)]
        if "clip_model" in keys and "clip_files" in keys:  # another CLIP has other files: say so once
            keys.remove("clip_files")
        differences = [_difference(key, before.get(key), job.get(key)) for key in keys]
        if differences:
            raise ClipCapError(f"{output}: was {'made' if finished else 'started'} with {'; '.join(differences)}; "
                               f"rerun with the same arguments, or delete {output} to "
                               + ("encode the images again" if finished else "start over"))
        return
    if not finished:
        write_json(path, job, indent=None)


def _check_options(batch_size: int, num_workers: int | None, max_pixels: int) -> None:
    if batch_size < 1:
        raise ClipCapError(f"--batch_size {batch_size}: must be at least 1")
    if num_workers is not None and num_workers < 0:
        raise ClipCapError(f"--num_workers {num_workers}: must be 0 (decode in the main process) or more")
    if max_pixels < 1:
        raise ClipCapError(f"--max_pixels {max_pixels}: must be at least 1 (every image would be skipped)")


@contextlib.contextmanager
def writing(out: str | Path) -> Iterator[Processes]:
    """This process's place among torchrun's, while rank 0 holds ``out``'s lock (a second job is refused,
    naming the first); no rank starts before rank 0 has it."""
    procs = start_processes("cpu", timeout=timedelta(days=7))  # gloo, for barriers; ranks may finish hours apart
    try:
        with locking.exclusive(out) if procs.main else contextlib.nullcontext():
            procs.barrier()
            yield procs
    finally:
        procs.close()


def extract(shards: Sequence[Shard], store: str | Path, clip_model: str = "ViT-B/32", *, device: str = "auto",
            dtype: torch.dtype | None = None, batch_size: int = 256, num_workers: int | None = None,
            max_pixels: int = MAX_PIXELS, meta: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
            procs: Processes | None = None, text: bool = False) -> int | None:
    """Encode every shard's images once into the feature store ``store``; returns the number skipped.

    Resumable: finished pieces and shards are kept on a rerun of the same job (the shards'
    fingerprints, CLIP, dtype, pixel limit and ``settings``, e.g. the flags that made the shards);
    another job is refused. Under torchrun the ranks share out every shard's pieces; after a barrier
    rank 0 joins them and merges the index (other ranks return None). ``procs`` is the session of
    an enclosing :func:`writing` of the output; by default this call holds its own, on ``store``.
    With ``text``, each item's one caption is encoded by the CLIP's text tower instead of its image,
    and the store says its embeddings are of text (``modality``).
    """
    if procs is None:
        with writing(store) as procs:
            return extract(shards, store, clip_model, device=device, dtype=dtype, batch_size=batch_size,
                           num_workers=num_workers, max_pixels=max_pixels, meta=meta, settings=settings, procs=procs,
                           text=text)
    _check_options(batch_size, num_workers, max_pixels)
    store = Path(store)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ClipCapError(f"{store}: shard names repeat")
    device = pick_device(device, procs)
    if num_workers is None:
        num_workers = max(1, min(8, (os.cpu_count() or 1) // procs.local_world - 1))
    dtype = dtype or default_dtype(device)
    modality = {"modality": "text"} if text else {}  # image stores say nothing, as every older one
    load_encoder = load_text_encoder if text else load_image_encoder
    # The tower first: one that does not load fails before the job is recorded or a shard is listed.
    encoder = load_encoder(clip_model, device, dtype) \
        if not all(feature_store.shard_done(store, s.name) for s in shards) else None
    _check_job(store / JOB_FILE, _job(shards, clip_model, dtype, max_pixels, settings, text), store)
    remove_stale_temp_files(store)  # what killed runs left
    remove_stale_temp_files(store / feature_store.SHARD_DIR)
    todo = [s for s in shards if not feature_store.shard_done(store, s.name)]
    sizes = [s.size for s in todo]
    rank = f"rank {procs.rank}/{procs.world}"
    pieces, turn, kinds = {}, 0, {}  # each shard's pieces, for rank 0 to join
    desc = f"CLIP {clip_model}" + (" text" if text else "") + (f" {rank}" if procs.world > 1 else "")
    with tqdm(total=-(-sum(sizes) // procs.world) if None not in sizes else None, unit="caption" if text else "img",
              desc=desc, disable=procs.local_rank != 0) as progress:
        for shard in todo:  # every rank lists every shard; piece `turn` of them all is rank turn % world's
            listing = _list(shard, batch_size)
            pieces[shard.name] = [listing.piece(k) for k in range(len(listing.pieces))]
            _check_id_kinds(shard, listing.items, kinds)
            mine = [k for k in range(len(listing.pieces)) if (turn + k) % procs.world == procs.rank
                    and not feature_store.piece_done(store, shard.name, listing.piece(k))]
            turn += len(listing.pieces)
            if mine:
                remove_stale_temp_files(store / feature_store.PIECE_DIR / shard.name / listing.key)
                _encode_pieces(shard, listing, mine, encoder, store, batch_size, num_workers, max_pixels, progress,
                               rank)
    procs.barrier()
    if not procs.main:
        return None
    for name, names_of_pieces in pieces.items():
        feature_store.join_pieces(store, name, names_of_pieces)
    return feature_store.merge(store, names, {"clip_model": clip_model, **modality, **(meta or {})})


def _check_id_kinds(shard: Shard, items: list[ImageItem], kinds: dict[str, str]) -> None:
    """Refuse, before encoding, image ids that a store cannot hold: of two kinds, in a shard or across shards."""
    column = feature_store.image_id_column([item.image_id for item in items], f"shard {shard.name}", "image")
    if not items:
        return
    kinds.setdefault(str(column.type), shard.name)
    if len(kinds) > 1:
        (kind, first), (other, _) = kinds.items()
        raise ClipCapError(f"shard {first} has {kind} image ids, shard {shard.name} {other}; a store's image ids "
                           "are all integers or all text")


def model_tag(clip_model: str) -> str:
    """``ViT-B/32`` -> ``ViT-B_32`` (the original's file names); a local directory -> its name, a file -> its stem."""
    path = Path(clip_model)
    return path.name if path.is_dir() else path.stem if path.is_file() else clip_model.replace("/", "_")


def extract_to(shards: Sequence[Shard], out: str | Path, clip_model: str = "ViT-B/32", *, as_store: bool = False,
               meta: dict[str, Any] | None = None, **options: Any) -> Path | None:
    """Run :func:`extract` (``options`` are its keywords) into the original's pickle, or a store (``as_store``).

    The pickle is made from a store kept beside it (``NAME.pkl.parts``) until the pickle is written,
    so that a pickle run resumes too; a finished pickle is kept when the same job made it (its job is
    kept beside it, ``NAME_job.json``), so that a rerun of a command only completes what it had not
    written. Returns the output on the rank that wrote it, else None.
    """
    out = Path(out)
    work = out if as_store else out.with_name(out.name + ".parts")
    job_file = out.with_name(out.stem + "_job.json")
    with writing(out) as procs:
        if not as_store and out.exists() and not work.exists():
            dtype = options.get("dtype") or default_dtype(pick_device(options.get("device", "auto"), procs))
            _check_job(job_file, _job(shards, clip_model, dtype, options.get("max_pixels", MAX_PIXELS),
                                      options.get("settings"), options.get("text", False)), out, finished=True)
            if procs.main:
                print(f"{out}: kept as a finished run wrote it (delete it to encode the images again)")
            return out if procs.main else None
        remove_stale_temp_files(out.parent)  # a killed run's half-written pickle
        skipped = extract(shards, work, clip_model, meta=meta, procs=procs, **options)
        if skipped is None:
            return None
        written = feature_store.read_meta(work)
        report = work / feature_store.SKIPPED_FILE
        if not as_store:
            feature_store.to_pickle(work, out)
            shutil.copyfile(work / JOB_FILE, job_file)
            report = shutil.copyfile(report, out.with_name(out.stem + "_skipped.tsv")) if skipped else None
            shutil.rmtree(work)
    if written.get("modality") == "text":
        print(f"wrote {out}: text embeddings of {written['num_captions']} captions")
        return out
    print(f"wrote {out}: {written['num_images']} images, {written['num_captions']} captions; {skipped} images skipped"
          + (f", listed in {report}" if skipped else ""))
    return out
