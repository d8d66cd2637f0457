"""Where the images to encode are: COCO, nocaps, Conceptual Captions and your own data, cut into shards.

Annotation files are read by :mod:`clipcap.annotations`; this module finds each image's file and
cuts the images into :class:`Shard` s of :class:`ImageItem` s, which :func:`clipcap.extraction.extract`
encodes. It lists files, it decodes nothing.

- COCO (Karpathy's ``dataset_coco.json`` or the original's ``train_caption.json``): images under
  ``train2014/`` and ``val2014/``.
- COCO-format captions files (nocaps' ``nocaps_val_4500_captions.json``): the images in one folder
  under their ``file_name``.
- Conceptual Captions: img2dataset output (webdataset ``*.tar`` shards, or its ``files`` layout of
  numbered folders holding ``{key}.jpg`` + ``{key}.txt``), or the original's layout (the TSV beside
  ``{split}/{row:08d}.jpg``).
- Your own data (an imagefolder, a CSV/JSONL/TSV, Karpathy's Flickr file): the images under the
  paths the file writes, relative to its folder or to ``images_root``.
- Captions alone, for text-only training (:func:`text_shards`): every caption of any of these
  annotation files, or of a ``.txt`` of one caption a line, as an item of its own; no image is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from .annotations import OWN_DATA_LAYOUTS, AnnotatedImage, conceptual_captions, read_annotations
from .encoder import IMAGE_EXTENSIONS
from .files import ClipCapError, open_regular, read_json, write_json

CONCEPTUAL_TSV = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}


@dataclass
class ImageItem:
    """One image to encode once, and every caption that describes it."""

    image_id: Any
    captions: list[str]
    path: str  # the image file, or the tar archive that holds it
    span: tuple[int, int] | None = None  # (offset, size) of the image inside the archive
    name: str = ""  # for the skip report; defaults to ``path``

    def __post_init__(self) -> None:
        self.name = self.name or self.path

    def open(self) -> IO[bytes]:
        if self.span is None:
            return open_regular(self.path)
        with open_regular(self.path) as f:
            f.seek(self.span[0])
            return io.BytesIO(f.read(self.span[1]))


@dataclass
class Shard:
    """A unit of work and of output: its images are listed only when the shard is processed."""

    name: str
    list_items: Callable[[], tuple[list[ImageItem], list[tuple[str, str]]]]  # items, and (path, reason) skipped
    size: int | None = None  # images expected, for the progress bar
    fingerprint: str = ""  # what defines its images, known before they are listed (see extract's resume check)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _present(items: list[ImageItem]) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """The items whose file is there, and the others as skipped."""
    there = [Path(item.path).is_file() for item in items]
    return ([item for item, ok in zip(items, there) if ok],
            [(item.name, "not downloaded") for item, ok in zip(items, there) if not ok])


def chunked(items: list[ImageItem], shard_size: int, files: bool = True) -> list[Shard]:
    """Fixed-size shards of an image list known up front, named by position, fingerprinted by their images;
    missing files are skipped (unless ``files`` is False: items without files, text-only training's)."""
    parts = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    return [Shard(f"{k:05d}", lambda part=part: _present(part) if files else (part, []), len(part),
                  _digest([(item.image_id, item.path, item.span, item.captions) for item in part]))
            for k, part in enumerate(parts)]


def file_shards(images: list[AnnotatedImage], images_root: str | Path, shard_size: int = 10_000) -> list[Shard]:
    """Shards of images whose files lie under ``images_root`` at the path the annotations write."""
    root = Path(images_root)
    return chunked([ImageItem(image.image_id, image.captions, str(root / image.file)) for image in images],
                   shard_size)


def _require_files(path: str | Path, images: list[AnnotatedImage], names: str) -> None:
    unnamed = next((image for image in images if image.file is None), None)
    if unnamed is not None:
        raise ClipCapError(f"{path}: image {unnamed.image_id!r} ({unnamed.entry}) has no file name ({names})")


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


def coco_images(annotations: str | Path, split: str = "train", include_restval: bool = True) -> list[AnnotatedImage]:
    """COCO's images of ``split`` with their captions, in file order: Karpathy's ``dataset_coco.json`` by
    split (``train`` = train + restval unless ``include_restval`` is False), or the original's
    ``train_caption.json`` whole, whatever ``split`` says."""
    read = read_annotations(annotations)
    if read.layout not in ("karpathy_coco", "caption_list"):
        raise ClipCapError(f"{annotations}: expected Karpathy's dataset_coco.json or a list of "
                           "{image_id, caption} like train_caption.json")
    images = read.select(split if read.layout == "karpathy_coco" else None, include_restval)
    named = next((image for image in images if not isinstance(image.image_id, int)), None)
    if named is not None:
        raise ClipCapError(f"{annotations}: {named.entry}: image id {named.image_id!r} is not an integer "
                           "(COCO's image files are named by it)")
    return images


def coco_items(images: list[AnnotatedImage], images_root: str | Path) -> list[ImageItem]:
    """The images to encode, each at its file under ``images_root`` (see :func:`coco_image_path`)."""
    root = Path(images_root)
    return [ImageItem(image.image_id, image.captions,
                      str(coco_image_path(root, image.image_id, root / image.file if image.file else None)))
            for image in images]


def coco_shards(images: list[AnnotatedImage], images_root: str | Path, shard_size: int = 10_000) -> list[Shard]:
    return chunked(coco_items(images, images_root), shard_size)


def write_coco_references(images: list[AnnotatedImage], path: str | Path) -> None:
    """COCO-format references (``{"images", "annotations"}``), what evaluation reads."""
    references = {"images": [{"id": image.image_id} for image in images],
                  "annotations": [{"image_id": image.image_id, "caption": caption, "id": caption_id} for image in images
                                  for caption, caption_id in zip(image.captions, image.caption_ids)]}
    write_json(path, references, indent=None)


# --------------------------------------------------------------------------- COCO-format captions (nocaps)


def coco_format_shards(annotations: str | Path, images_root: str | Path, shard_size: int = 10_000) -> list[Shard]:
    """Shards of a COCO-format captions file's images, each ``images_root/file_name``; an image without
    annotations keeps no caption (extraction reports it)."""
    read = read_annotations(annotations)
    if read.layout != "coco_format":
        raise ClipCapError(f"{annotations}: expected a COCO-format captions file ('images' and 'annotations' lists)")
    images = read.select()
    _require_files(annotations, images, "COCO format: images[] with id and file_name")
    return file_shards(images, images_root, shard_size)


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
    """img2dataset's ``{shard}_stats.json`` says how many images a shard holds (for the progress bar only)."""
    try:
        return int(read_json(stats, "stats")["successes"])
    except (ClipCapError, ValueError, KeyError, TypeError):
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
    captions = conceptual_captions(tsv)
    return [Shard(f"{k:05d}", lambda r=range(start, min(start + shard_size, len(captions))):
                  _read_tsv_rows(tsv, images, r, captions), min(shard_size, len(captions) - start),
                  _digest(str(images), start, captions[start:start + shard_size]))
            for k, start in enumerate(range(0, len(captions), shard_size))]


# --------------------------------------------------------------------------- your own data


def caption_shards(source: str | Path, images_root: str | Path | None = None, split: str | None = None,
                   shard_size: int = 10_000) -> list[Shard]:
    """Shards of your own data: an image folder with metadata, a CSV/TSV/JSONL of image and caption, or
    Karpathy's Flickr file (by ``split``); image paths relative to the source's folder or ``images_root``.
    Image ids are Karpathy's ``imgid``, else the path as the file writes it, so that the same source
    serves as evaluation references. Missing image files are skipped and reported."""
    read = read_annotations(source)
    if read.layout not in OWN_DATA_LAYOUTS:
        raise ClipCapError(f"{source}: not an image folder with metadata, a CSV/TSV/JSONL of image and caption, "
                           "or Karpathy's Flickr file (COCO: parse_coco.py; Conceptual Captions: parse_conceptual.py)")
    images = read.select(split)
    _require_files(source, images, "Karpathy's format: filepath, filename")
    return file_shards(images, images_root if images_root is not None else read.root, shard_size)


# --------------------------------------------------------------------------- captions alone


def text_shards(source: str | Path, split: str | None = None, shard_size: int = 10_000) -> list[Shard]:
    """Shards of the captions of any annotation file (``split`` for Karpathy's files, train = train + restval)
    or of a ``.txt`` of one caption a line: one item per caption, with its image's id (a ``.txt`` line's
    number), and no image file. Conceptual Captions' get the period that parse_conceptual adds."""
    read = read_annotations(source)
    tidy = add_period if read.layout == "conceptual_tsv" else str
    items = [ImageItem(image.image_id, [tidy(caption)], "", name=f"{source} {image.entry}")
             for image in read.select(split) for caption in image.captions]
    if not items:
        raise ClipCapError(f"{source}: no captions")
    return chunked(items, shard_size, files=False)
