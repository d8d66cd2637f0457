"""Where the images and captions come from: COCO and Conceptual Captions, in the layouts in use.

Each reader turns its layout into :class:`clipcap.features.Shard` s of images with their
captions; :func:`clipcap.features.extract` encodes them. Readers list files, they decode nothing.

- COCO: Karpathy's ``dataset_coco.json`` (by split) or the original's ``train_caption.json``
  (a list of ``{"image_id", "caption"}``); images under ``train2014/`` and ``val2014/``.
- Conceptual Captions: img2dataset output (webdataset ``*.tar`` shards, or its ``files``
  layout of numbered folders holding ``{key}.jpg`` + ``{key}.txt``), or the original's layout
  (the TSV beside ``{split}/{row:08d}.jpg``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable

from .features import ImageItem, Shard
from .files import ClipCapError, atomic_write, open_regular, read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Karpathy split names, and what each of our --split values takes from them.
KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",),
                   "trainval": ("train", "restval", "val")}
CONCEPTUAL_TSV = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def chunked(items: list[ImageItem], shard_size: int) -> list[Shard]:
    """Fixed-size shards of an image list known up front, named by position, fingerprinted by their images."""
    parts = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    return [Shard(f"{k:05d}", lambda part=part: (part, []), len(part),
                  _digest([(item.image_id, item.path, item.span, item.captions) for item in part]))
            for k, part in enumerate(parts)]


# --------------------------------------------------------------------------- COCO


def coco_image_path(images_root: Path, image_id: int, listed: Path | None = None) -> Path:
    """The first file that exists of: the ``listed`` path, the original's lookup
    ``train2014/COCO_train2014_{id:012d}.jpg``, the ``val2014`` one; if none does, the first
    of them, so that a missing image is reported where the annotations put it."""
    candidates = [images_root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg",
                  images_root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg"]
    if listed is not None:
        candidates.insert(0, listed)
    return next((path for path in candidates if path.is_file()), candidates[0])


def _captions(captions: list[dict[str, Any]], dropped: list[int]) -> list[dict[str, Any]]:
    """The non-empty ones (train.py refuses empty captions); ``dropped`` counts the others."""
    kept = [c for c in captions if isinstance(c["caption"], str) and c["caption"].strip()]
    dropped[0] += len(captions) - len(kept)
    return kept


def coco_images(annotations: str | Path, images_root: str | Path, split: str = "train",
                include_restval: bool = True) -> list[dict[str, Any]]:
    """The split's images as ``{"id", "path", "captions": [{"caption", "id"}]}``, in file order.

    ``dataset_coco.json`` is read by split (``train`` = train + restval unless ``include_restval``
    is False); the original's ``train_caption.json`` is taken whole, whatever ``split`` says.
    """
    annotations, images_root = Path(annotations), Path(images_root)
    data = read_json(annotations)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if split not in KARPATHY_SPLITS:
            raise ClipCapError(f"{annotations}: unknown split {split!r} (choose from {', '.join(KARPATHY_SPLITS)})")
        wanted = set(KARPATHY_SPLITS[split]) - ({"restval"} if split != "restval" and not include_restval else set())
        images, dropped = [], [0]
        for i, image in enumerate(data["images"]):
            try:
                if image["split"] not in wanted:
                    continue
                listed = images_root / image["filepath"] / image["filename"]
                images.append({"id": int(image["cocoid"]), "path": coco_image_path(images_root, int(image["cocoid"]), listed),
                               "captions": _captions([{"caption": s["raw"], "id": s.get("sentid", j)}
                                                      for j, s in enumerate(image["sentences"])], dropped)})
            except (KeyError, TypeError, ValueError) as e:
                raise ClipCapError(f"{annotations}: image entry {i} lacks {e} (Karpathy format: filepath, "
                                   "filename, cocoid, split, sentences)") from None
        if not images:
            raise ClipCapError(f"{annotations}: no image in split {split!r}")
        _report_dropped(annotations, dropped[0])
        return images
    if not isinstance(data, list):
        raise ClipCapError(f"{annotations}: expected Karpathy's dataset_coco.json or a list of "
                           "{image_id, caption} like train_caption.json")
    by_id: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(data):
        try:
            image_id = int(entry["image_id"])
            caption = {"caption": entry["caption"], "id": entry.get("id", i)}
        except (KeyError, TypeError, ValueError):
            raise ClipCapError(f"{annotations}: entry {i} needs an integer 'image_id' and a 'caption'") from None
        by_id.setdefault(image_id, {"id": image_id, "path": None, "captions": []})["captions"].append(caption)
    dropped = [0]
    for image in by_id.values():
        image["path"] = coco_image_path(images_root, image["id"])
        image["captions"] = _captions(image["captions"], dropped)
    _report_dropped(annotations, dropped[0])
    return list(by_id.values())


def _report_dropped(annotations: Path, dropped: int) -> None:
    if dropped:
        print(f"{annotations}: dropped {dropped} empty captions")


def coco_shards(images: list[dict[str, Any]], shard_size: int = 10_000) -> list[Shard]:
    items = [ImageItem(image["id"], [c["caption"] for c in image["captions"]], str(image["path"]))
             for image in images]
    return chunked(items, shard_size)


def write_coco_references(images: list[dict[str, Any]], path: str | Path) -> None:
    """COCO-format references (``{"images", "annotations"}``), what evaluation reads."""
    references = {"images": [{"id": image["id"]} for image in images],
                  "annotations": [{"image_id": image["id"], "caption": c["caption"], "id": c["id"]}
                                  for image in images for c in image["captions"]]}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(references))


# --------------------------------------------------------------------------- Conceptual Captions


def add_period(caption: str) -> str:
    """The original's caption clean-up: strip, end with "." ("a dog ." becomes "a dog.")."""
    caption = caption.strip()
    if not caption.endswith("."):
        return caption + "."
    return caption[:-2] + "." if caption.endswith(" .") else caption


def _nonempty(caption: str) -> bool:
    return bool(caption.strip().rstrip(".").strip())


def _grouped(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{key: {extension: name}}`` for the ``key.ext`` names of a webdataset shard or folder."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        key, dot, ext = name.rpartition(".")
        if dot:
            groups.setdefault(key, {})[f".{ext.lower()}"] = name
    return groups


def _image_extension(members: dict[str, str]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def _read_tar(path: Path) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """A webdataset shard's images (by byte span, read later) and captions (read now)."""
    items, skipped, spans, texts = [], [], {}, {}
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                if member.isfile():
                    spans[member.name] = (member.offset_data, member.size)
                    if member.name.endswith(".txt"):
                        texts[member.name] = tar.extractfile(member).read().decode("utf-8", "replace")
    except (tarfile.TarError, OSError, EOFError, ClipCapError) as e:
        skipped.append((str(path), f"archive unreadable after {len(spans)} members ({e}); the rest is skipped"))
    for key, members in _grouped(spans).items():
        ext = _image_extension(members)
        if ext is None:
            continue
        name = f"{path}/{members[ext]}"
        if not _nonempty(texts.get(members.get(".txt"), "")):
            skipped.append((name, "no caption (.txt)"))
            continue
        items.append(ImageItem(Path(key).name, [add_period(texts[members[".txt"]])], str(path),
                               spans[members[ext]], name))
    return items, skipped


def _read_folder(folder: Path) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """One folder of img2dataset's ``files`` layout: ``{key}.jpg`` beside ``{key}.txt``."""
    items, skipped = [], []
    for key, members in sorted(_grouped(os.listdir(folder)).items()):
        ext = _image_extension(members)
        if ext is None:
            continue
        caption, reason = "", "no caption (.txt)"
        if ".txt" in members:
            try:
                with open_regular(folder / members[".txt"]) as f:
                    caption = f.read().decode("utf-8", "replace")
            except (OSError, ClipCapError) as e:  # a FIFO would block the whole job
                reason = f"caption unreadable ({e})"
        if not _nonempty(caption):
            skipped.append((str(folder / members[ext]), reason))
            continue
        items.append(ImageItem(key, [add_period(caption)], str(folder / members[ext])))
    return items, skipped


def _expected_images(stats: Path) -> int | None:
    """img2dataset's ``{shard}_stats.json`` says how many images a shard holds."""
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_tsv_rows(tsv: Path, images: Path, rows: range, captions: list[str]
                   ) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    items, skipped = [], []
    for row in rows:
        path = images / f"{row:08d}.jpg"
        if not path.is_file():
            skipped.append((str(path), "not downloaded"))
        elif not _nonempty(captions[row]):
            skipped.append((str(path), f"empty caption on {tsv.name} line {row + 1}"))
        else:
            items.append(ImageItem(f"{row:08d}", [add_period(captions[row])], str(path)))
    return items, skipped


def conceptual_shards(images: str | Path, tsv: str | Path | None = None, shard_size: int = 10_000) -> list[Shard]:
    """Shards of a Conceptual Captions split, in any of the three layouts (detected).

    ``images`` is img2dataset's output folder (``*.tar``, or numbered folders) or, for the
    original's layout, the folder of ``{row:08d}.jpg`` files, with ``tsv`` the split's TSV.
    """
    images = Path(images)
    if not images.is_dir():
        raise ClipCapError(f"{images}: image folder not found")
    tars = sorted(images.glob("*.tar"))
    # A tar's or folder's images are listed only when it is processed: fingerprinted by its size and time.
    if tars:
        return [Shard(t.stem, lambda t=t: _read_tar(t), _expected_images(t.with_name(f"{t.stem}_stats.json")),
                      _digest(t.stat().st_size, t.stat().st_mtime_ns)) for t in tars]
    folders = sorted(p for p in images.iterdir() if p.is_dir())
    if folders:
        return [Shard(f.name, lambda f=f: _read_folder(f), _expected_images(images / f"{f.name}_stats.json"),
                      _digest(f.stat().st_mtime_ns)) for f in folders]
    if tsv is None or not Path(tsv).is_file():
        raise ClipCapError(f"{images}: no *.tar shards or img2dataset folders, and no TSV "
                           f"({tsv}) for the original's {{row:08d}}.jpg layout")
    tsv = Path(tsv)
    with open(tsv, encoding="utf-8", newline="") as f:
        captions = [row[0] if row else "" for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [Shard(f"{k:05d}", lambda r=range(start, min(start + shard_size, len(captions))):
                  _read_tsv_rows(tsv, images, r, captions), min(shard_size, len(captions) - start),
                  _digest(str(images), start, captions[start:start + shard_size]))
            for k, start in enumerate(range(0, len(captions), shard_size))]
