"""Downloading the reproduction's data and the original's released weights, resumably, as data/README.md lays them out.

Files come through pooch (a temporary name renamed when complete, so an interrupted download leaves
nothing that looks finished; MD5 checked where a checksum is known), Conceptual Captions' images
through img2dataset (failed or vanished URLs are counted, not fatal; a rerun skips finished shards),
the Google Drive weights through gdown (byte-level resume) and are then read as ClipCap checkpoints.
A finished part leaves a stamp in ``FOLDER/.fetched/``, so a rerun skips it without re-reading it;
an archive is unpacked and then deleted.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .files import ClipCapError, atomic_write, read_json, write_json

DATASETS = ("coco", "nocaps", "conceptual")
STAMPS = ".fetched"


@dataclass(frozen=True)
class Remote:
    """One file to download into a dataset's folder, and what it leaves there."""

    name: str  # the file's name once downloaded
    url: str
    leaves: str  # what exists in the folder when it is done: the file, or what its archive unpacks to
    md5: str | None = None
    members: tuple[str, ...] | None = None  # a zip archive's members to unpack (() for all); None: not an archive


# COCO publishes no checksums; these are the MD5s of the 2014 zips that widely used downloaders check.
COCO = (Remote("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip", "train2014",
               "0da8c0bd3d6becc4dcb32757491aca88", ()),
        Remote("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip", "val2014",
               "a3d79f5ed8d289b7a7554ce06a5782b3", ()),
        Remote("caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
               "dataset_coco.json", members=("dataset_coco.json",)))
NOCAPS = (Remote("nocaps_val_4500_captions.json", "https://s3.amazonaws.com/nocaps/nocaps_val_4500_captions.json",
                 "nocaps_val_4500_captions.json"),)
CONCEPTUAL = (Remote("Train_GCC-training.tsv", "https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv",
                     "Train_GCC-training.tsv"),
              Remote("Validation_GCC-1.1.0-Validation.tsv",
                     "https://storage.googleapis.com/gcc-data/Validation/GCC-1.1.0-Validation.tsv",
                     "Validation_GCC-1.1.0-Validation.tsv"))
CONCEPTUAL_SPLITS = {"val": "Validation_GCC-1.1.0-Validation.tsv", "train": "Train_GCC-training.tsv"}
# The original's released weights (Google Drive, linked from its README).
WEIGHTS = {"coco_weights.pt": "https://drive.google.com/uc?id=1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX",
           "conceptual_weights.pt": "https://drive.google.com/uc?id=14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT",
           "transformer_weights.pt": "https://drive.google.com/uc?id=1GYPToCqFREwi285wPLhuVExlz7DDUDfJ"}


# --------------------------------------------------------------------------- stamps


def _stamp(folder: Path, name: str) -> Path:
    return folder / STAMPS / f"{name}.json"


def is_done(folder: Path, name: str, leaves: str) -> bool:
    """Whether ``name`` is in ``folder``: fetched completely, or put there by hand (what ``leaves`` exists
    without a stamp of an unfinished fetch), which is kept and recorded as done."""
    stamp = _stamp(folder, name)
    if not (folder / leaves).exists():
        return False
    if not stamp.is_file():
        print(f"{folder / leaves}: present, kept (not fetched)")
        mark_done(folder, name, adopted=True)
        return True
    return json.loads(stamp.read_text()).get("status") == "done"


def mark_started(folder: Path, name: str) -> None:
    """Before a part is fetched: what it leaves is incomplete until :func:`mark_done`."""
    write_json(_stamp(folder, name), {"status": "started"})


def mark_done(folder: Path, name: str, **record: Any) -> None:
    write_json(_stamp(folder, name), {"status": "done", **record})


# --------------------------------------------------------------------------- files


def _require(module: str) -> Any:
    """An optional dependency of the data commands, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ClipCapError(f"{module} is not installed: pip install -e '.[data]' (make data installs it)") from None


def download(url: str, path: Path, md5: str | None = None, progress: bool = True) -> Path:
    """``url`` to ``path`` through pooch: nothing at ``path`` unless complete (and matching ``md5``).
    A complete file already there is kept (re-read only to check ``md5``)."""
    pooch = _require("pooch")
    import requests

    pooch.get_logger().setLevel(logging.WARNING)  # a line per file; the progress bar says enough
    try:
        pooch.retrieve(url, f"md5:{md5}" if md5 else None, fname=path.name, path=path.parent,
                       downloader=pooch.HTTPDownloader(progressbar=progress, timeout=60))
    except ValueError as e:
        if "hash" not in str(e).lower():
            raise
        raise ClipCapError(f"{path.name} from {url}: the checksum does not match (expected MD5 {md5}); the file "
                           "was removed: fetch again, and if it fails again the source has changed") from None
    except (requests.RequestException, OSError) as e:
        raise ClipCapError(f"{path.name} from {url}: download failed ({type(e).__name__}: {e}); nothing was kept: "
                           "fetch again to retry") from None
    return path


def unpack(archive: Path, members: tuple[str, ...], folder: Path) -> None:
    """Extract ``members`` of a zip (all for ``()``; a member is matched by its name anywhere in the archive)
    into ``folder``, then delete the archive."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            if members:
                wanted = [n for n in names if n in members or Path(n).name in members]
                missing = set(members) - {Path(n).name for n in wanted} - set(wanted)
                if missing:
                    raise ClipCapError(f"{archive}: holds no {', '.join(sorted(missing))}")
            else:
                wanted = names
            for name in tqdm(wanted, desc=f"unpacking {archive.name}", unit="file", disable=len(wanted) < 1000):
                if members:  # a chosen member lands in the folder itself
                    with z.open(name) as src, atomic_write(folder / Path(name).name) as tmp, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                else:
                    z.extract(name, folder)
    except zipfile.BadZipFile as e:
        archive.unlink()
        raise ClipCapError(f"{archive}: not a readable zip archive ({e}); it was removed: fetch again") from None
    archive.unlink()


def fetch_remote(remote: Remote, folder: Path) -> None:
    """One file (and its archive's contents) into ``folder``, unless a finished fetch left it there."""
    if is_done(folder, remote.name, remote.leaves):
        print(f"{folder / remote.leaves}: fetched before")
        return
    folder.mkdir(parents=True, exist_ok=True)
    mark_started(folder, remote.name)
    print(f"fetching {remote.url} -> {folder / remote.leaves}", flush=True)
    path = download(remote.url, folder / remote.name, remote.md5)
    if remote.members is not None:
        unpack(path, remote.members, folder)
    mark_done(folder, remote.name, url=remote.url, md5=remote.md5, leaves=remote.leaves)


# --------------------------------------------------------------------------- datasets


def fetch_coco(folder: Path) -> None:
    """COCO 2014 train and val images and Karpathy's split file (``dataset_coco.json``)."""
    for remote in COCO:
        fetch_remote(remote, folder)


def fetch_nocaps(folder: Path, threads: int = 16) -> dict[str, int]:
    """nocaps validation captions, then every image by its ``coco_url`` into ``val/`` named by its ``file_name``.
    Images that fail are counted and listed; a rerun fetches only those."""
    for remote in NOCAPS:
        fetch_remote(remote, folder)
    images = folder / "val"
    if is_done(folder, "val", "val"):
        print(f"{images}: fetched before")
        return {}
    mark_started(folder, "val")
    listed = read_json(folder / NOCAPS[0].name).get("images", [])
    todo = [(i["coco_url"], images / Path(i["file_name"]).name) for i in listed
            if not (images / Path(i["file_name"]).name).is_file()]
    images.mkdir(parents=True, exist_ok=True)
    failed = _fetch_many(todo, threads, f"nocaps images -> {images}")
    return _record_images(folder, "val", len(listed), failed)


def _fetch_many(todo: list[tuple[str, Path]], threads: int, what: str) -> dict[str, str]:
    """Download each (url, path), ``threads`` at a time; returns {url: reason} of the failures."""
    failed: dict[str, str] = {}

    def one(item: tuple[str, Path]) -> None:
        try:
            download(item[0], item[1], progress=False)
        except ClipCapError as e:
            failed[item[0]] = str(e)

    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(todo), desc=what, unit="img") as bar:
        for _ in pool.map(one, todo):
            bar.update(1)
    return failed


def _record_images(folder: Path, name: str, total: int, failed: dict[str, str]) -> dict[str, int]:
    counts = {"images": total, "downloaded": total - len(failed), "failed": len(failed)}
    print(f"{folder / name}: {counts['downloaded']:,} of {total:,} images" +
          (f"; {len(failed):,} failed (e.g. {next(iter(failed.values()))}), listed in "
           f"{_stamp(folder, name + '_failed')}; fetch again to retry them" if failed else ""))
    if failed:
        write_json(_stamp(folder, name + "_failed"), failed)
    else:
        _stamp(folder, name + "_failed").unlink(missing_ok=True)
        mark_done(folder, name, **counts)
    return counts


def img2dataset_command(url_list: Path, output: Path, processes: int, threads: int) -> list[str]:
    """img2dataset's command for one Conceptual Captions split: webdataset shards of 10,000 images (so that an
    image's key is its TSV row, as evaluation expects), shortest side at most 256 pixels, finished shards kept."""
    program = Path(sys.executable).with_name("img2dataset")
    if not program.is_file():
        raise ClipCapError("img2dataset is not installed: pip install -e '.[data]' (make data installs it)")
    return [str(program), "--url_list", str(url_list), "--input_format", "tsv", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(output),
            "--number_sample_per_shard", "10000", "--resize_mode", "keep_ratio", "--image_size", "256",
            "--resize_only_if_bigger", "True", "--processes_count", str(processes), "--thread_count", str(threads),
            "--incremental_mode", "incremental", "--retries", "1"]


def shard_counts(folder: Path) -> dict[str, Any]:
    """What img2dataset's ``*_stats.json`` files say: images tried, downloaded, failed, and why."""
    counts: dict[str, Any] = {"images": 0, "downloaded": 0, "failed": 0, "reasons": {}}
    for stats in sorted(folder.glob("*_stats.json")):
        values = json.loads(stats.read_text())
        counts["images"] += values.get("count", 0)
        counts["downloaded"] += values.get("successes", 0)
        for reason, n in values.get("status_dict", {}).items():
            if reason != "success":
                counts["failed"] += n
                counts["reasons"][reason] = counts["reasons"].get(reason, 0) + n
    return counts


def fetch_conceptual(folder: Path, processes: int | None = None, threads: int = 64) -> dict[str, dict[str, Any]]:
    """Conceptual Captions' caption/URL lists, then each split's images through img2dataset."""
    for remote in CONCEPTUAL:
        fetch_remote(remote, folder)
    counts = {}
    for split, tsv in CONCEPTUAL_SPLITS.items():
        if is_done(folder, split, split):
            print(f"{folder / split}: fetched before")
            continue
        mark_started(folder, split)
        with_header = folder / f"{split}_with_header.tsv"  # img2dataset wants a header; the TSV stays as Google's
        with atomic_write(with_header) as tmp, open(folder / tsv, "rb") as src, open(tmp, "wb") as dst:
            dst.write(b"caption\turl\n")
            shutil.copyfileobj(src, dst)
        command = img2dataset_command(with_header, folder / split, processes or os.cpu_count() or 1, threads)
        print(f"fetching Conceptual Captions {split} images with img2dataset -> {folder / split}", flush=True)
        done = subprocess.run(command, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        if done.returncode != 0:
            raise ClipCapError(f"img2dataset failed for {split} (exit status {done.returncode}); fetch again to "
                               "continue: finished shards are kept")
        counts[split] = shard_counts(folder / split)
        reasons = sorted(counts[split]["reasons"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{folder / split}: {counts[split]['downloaded']:,} of {counts[split]['images']:,} images downloaded; "
              f"{counts[split]['failed']:,} failed" + (f" ({'; '.join(f'{n:,} {r}' for r, n in reasons)})"
                                                       if reasons else ""))
        mark_done(folder, split, **counts[split])
    return counts


def fetch_dataset(name: str, folder: Path, **options: Any) -> Any:
    """One of :data:`DATASETS` into ``folder``."""
    if name == "coco":
        return fetch_coco(folder)
    if name == "nocaps":
        return fetch_nocaps(folder, **options)
    if name == "conceptual":
        return fetch_conceptual(folder, **options)
    raise ClipCapError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


# --------------------------------------------------------------------------- weights


def fetch_weights(folder: Path, names: list[str] | None = None) -> list[Path]:
    """The original's released weights into ``folder``, each read as a ClipCap checkpoint once downloaded
    (a Drive page instead of the file, e.g. over its download quota, is removed and reported)."""
    from .checkpoint import read_checkpoint

    gdown = _require("gdown")

    names = names or list(WEIGHTS)
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise ClipCapError(f"unknown weights {', '.join(unknown)} (known: {', '.join(WEIGHTS)})")
    paths = []
    for name in names:
        path = folder / name
        paths.append(path)
        if is_done(folder, name, name):
            print(f"{path}: fetched before")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        mark_started(folder, name)
        print(f"fetching {WEIGHTS[name]} -> {path}", flush=True)
        try:
            gdown.download(WEIGHTS[name], str(path), quiet=False, resume=True, retries=2)
        except Exception as e:  # gdown's and requests' errors alike: the partial file is kept for the next try
            raise ClipCapError(f"{name} from {WEIGHTS[name]}: download failed ({type(e).__name__}: {e}); fetch "
                               "again to resume it") from None
        try:
            read_checkpoint(path)
        except ClipCapError as e:
            path.unlink()
            raise ClipCapError(f"{name} from {WEIGHTS[name]}: what came is not the checkpoint ({e}); it was removed. "
                               "Google Drive answers with a page when a file is over its download quota: try later"
                               ) from None
        mark_done(folder, name, url=WEIGHTS[name], bytes=path.stat().st_size)
    return paths
