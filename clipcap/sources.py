"""Where the images and captions come from: COCO, nocaps and Conceptual Captions, in the layouts in use.

Each reader turns its layout into :class:`clipcap.extraction.Shard` s of images with their
captions; :func:`clipcap.extraction.extract` encodes them. Readers list files, they decode nothing.

- COCO: Karpathy's ``dataset_coco.json`` (by split) or the original's ``train_caption.json``
  (a list of ``{"image_id", "caption"}``); images under ``train2014/`` and ``val2014/``.
- COCO-format captions files (nocaps' ``nocaps_val_4500_captions.json``, COCO's
  ``captions_val2014.json``): ``images`` with ``id`` and ``file_name``, ``annotations`` with
  ``image_id`` and ``caption``; the images in one folder under their ``file_name``.
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

from .encoder import IMAGE_EXTENSIONS
from .extraction import ImageItem, Shard
from .files import ClipCapError, open_regular, read_json, write_json

# Karpathy split names, and what each of our --split values takes from them.
KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",),
                   "trainval": ("train", "restval", "val")}
CONCEPTUAL_TSV = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _present(items: list[ImageItem]) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """The items whose file is there, and the others as skipped."""
    there = [Path(item.path).is_file() for item in items]
    return ([item for item, ok in zip(items, there) if ok],
            [(item.name, "not downloaded") for item, ok in zip(items, there) if not ok])


def chunked(items: list[ImageItem], shard_size: int) -> list[Shard]:
    """Fixed-size shards of an image list known up front, named by position, fingerprinted by their images;
    missing files are skipped."""
    parts = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    return [Shard(f"{k:05d}", lambda part=part: _present(part), len(part),
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
    write_json(path, references, indent=None)


# --------------------------------------------------------------------------- COCO-format captions (nocaps)


def coco_format_images(annotations: str | Path, images_root: str | Path) -> list[dict[str, Any]]:
    """A COCO-format captions file's images as ``{"id", "path", "captions": [{"caption", "id"}]}``, in file order.

    ``images_root/file_name`` is each image's file; an image without annotations keeps no
    caption (extraction reports it).
    """
    annotations, images_root = Path(annotations), Path(images_root)
    data = read_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ClipCapError(f"{annotations}: expected a COCO-format captions file ('images' and 'annotations' lists)")
    by_id: dict[int, dict[str, Any]] = {}
    for i, image in enumerate(data["images"]):
        try:
            image_id = int(image["id"])
            by_id[image_id] = {"id": image_id, "path": images_root / image["file_name"], "captions": []}
        except (KeyError, TypeError, ValueError):
            raise ClipCapError(f"{annotations}: image entry {i} needs an integer 'id' and a 'file_name'") from None
    for i, entry in enumerate(data["annotations"]):
        try:
            image_id = int(entry["image_id"])
            caption = {"caption": str(entry["caption"]), "id": entry.get("id", i)}
        except (KeyError, TypeError, ValueError):
            raise ClipCapError(f"{annotations}: annotation {i} needs an integer 'image_id' and a 'caption'") from None
        if image_id not in by_id:
            raise ClipCapError(f"{annotations}: annotation {i} is of image {image_id}, which 'images' does not list")
        by_id[image_id]["captions"].append(caption)
    if not by_id:
        raise ClipCapError(f"{annotations}: no images")
    return list(by_id.values())


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


# --------------------------------------------------------------------------- your own data
#
# - a folder in Hugging Face's ``imagefolder`` layout: ``metadata.jsonl`` or ``metadata.csv`` with
#   ``file_name`` and a caption column (``text`` or ``caption``; a list of several in JSONL, or
#   several rows per image), images relative to the folder;
# - a CSV, JSONL or TSV file of image path and caption (TSV may be headerless ``path<TAB>caption``),
#   paths relative to the file's folder or to ``images_root``;
# - Karpathy's ``dataset_flickr30k.json`` / ``dataset_flickr8k.json``, by split, images in ``images_root``.
#
# Image ids are Karpathy's ``imgid``, else the image's path as the file writes it ("dogs/1.jpg"),
# so that the same file serves as evaluation references (:func:`caption_references`).

IMAGE_COLUMNS = ("file_name", "image", "path", "filepath", "filename", "image_path")
CAPTION_COLUMNS = ("text", "caption", "captions", "sentence", "sentences")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def caption_layout(source: str | Path) -> str | None:
    """Which of the layouts above ``source`` is in, or None when it is none of them (COCO's
    ``dataset_coco.json``, Conceptual Captions' ``caption<TAB>url`` TSV, COCO-format annotations...)."""
    source = Path(source)
    suffix = source.suffix.lower()
    if source.is_dir():
        return "imagefolder"
    if suffix in (".csv", ".jsonl"):
        return suffix[1:]
    if suffix == ".tsv" and source.is_file():
        with open(source, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline().rstrip("\n").split("\t")
        return None if len(first) > 1 and first[1].startswith(("http://", "https://")) else "tsv"
    if suffix == ".json" and source.is_file():
        with open(source, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)  # Karpathy's COCO file names a cocoid in its first image entry
        return "karpathy" if '"sentences"' in head and '"cocoid"' not in head else None
    return None


def _column(names: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lower = {name.strip().lower(): name for name in names if name}
    return next((lower[w] for w in wanted if w in lower), None)


def _table_rows(path: Path, layout: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV, TSV or JSONL file; a headerless TSV gives ``path`` and ``caption``."""
    if layout == "jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ClipCapError(f"{path}: line {line_number} is not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ClipCapError(f"{path}: line {line_number} is not a JSON object")
                    yield line_number, row
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="," if layout == "csv" else "\t"))
    header, first = (rows[0], 1) if rows else ([], 0)
    if layout == "tsv" and not (_column(header, IMAGE_COLUMNS) and _column(header, CAPTION_COLUMNS)):
        header, first = ["path", "caption"], 0
    for line_number, values in enumerate(rows[first:], start=first + 1):
        if any(v.strip() for v in values):
            yield line_number, dict(zip(header, values))


def _table_images(path: Path, layout: str) -> list[tuple[str, list[str]]]:
    """(image path as written, its captions) in order of first appearance; rows of one image are joined."""
    images: dict[str, list[str]] = {}
    image_col = caption_col = None
    for line_number, row in _table_rows(path, layout):
        if image_col is None:
            image_col, caption_col = _column(row, IMAGE_COLUMNS), _column(row, CAPTION_COLUMNS)
            if image_col is None or caption_col is None:
                raise ClipCapError(f"{path}: needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption "
                                   f"column ({', '.join(CAPTION_COLUMNS)}); found {', '.join(map(str, row))}")
        name, captions = row.get(image_col), row.get(caption_col)
        if not isinstance(name, str) or not name.strip():
            raise ClipCapError(f"{path}: line {line_number} has no image path in '{image_col}'")
        if isinstance(captions, str) or captions is None:
            captions = [captions or ""]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ClipCapError(f"{path}: line {line_number}: '{caption_col}' must be a string or a list of strings")
        images.setdefault(Path(name.strip()).as_posix(), []).extend(c.strip() for c in captions if c.strip())
    if not images:
        raise ClipCapError(f"{path}: no rows")
    return list(images.items())


def _karpathy_images(path: Path, split: str | None) -> list[tuple[int, str, list[str]]]:
    """(imgid, file name, raw sentences) of one split of Karpathy's Flickr8k/30k file."""
    if split not in KARPATHY_SPLITS:
        raise ClipCapError(f"{path}: Karpathy's split file holds every split; pass --split "
                           f"({', '.join(KARPATHY_SPLITS)})")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ClipCapError(f"{path}: expected Karpathy's format, an object with an 'images' list")
    images = []
    for i, image in enumerate(data["images"]):
        try:
            if image["split"] in KARPATHY_SPLITS[split]:
                images.append((int(image["imgid"]), str(Path(image.get("filepath", "")) / image["filename"]),
                               [str(s["raw"]).strip() for s in image["sentences"]]))
        except (KeyError, TypeError, ValueError) as e:
            raise ClipCapError(f"{path}: image entry {i} lacks {e} (Karpathy format: filename, imgid, split, "
                               "sentences with raw)") from None
    if not images:
        raise ClipCapError(f"{path}: no image in split {split!r}")
    return images


def caption_images(source: str | Path, split: str | None = None) -> tuple[list[tuple[Any, str, list[str]]], Path]:
    """(image id, image path as written, captions) of a source in one of the layouts above, and the
    folder its paths are relative to by default. ``split`` is for Karpathy's files only."""
    source = Path(source)
    if not source.exists():
        raise ClipCapError(f"{source}: not found")
    layout = caption_layout(source)
    if layout is None:
        raise ClipCapError(f"{source}: not an image folder with metadata, a CSV/TSV/JSONL of image and caption, "
                           "or Karpathy's Flickr file (COCO: parse_coco.py; Conceptual Captions: parse_conceptual.py)")
    if layout == "karpathy":
        return _karpathy_images(source, split), source.parent
    if split is not None:
        raise ClipCapError(f"{source}: --split applies to Karpathy's Flickr files only; this source is taken whole")
    if layout == "imagefolder":
        metadata = next((source / name for name in METADATA_FILES if (source / name).is_file()), None)
        if metadata is None:
            raise ClipCapError(f"{source}: folder has no {' or '.join(METADATA_FILES)} (Hugging Face imagefolder "
                               "layout: file_name and text columns)")
        return [(name, name, captions) for name, captions in _table_images(metadata, metadata.suffix[1:])], source
    return [(name, name, captions) for name, captions in _table_images(source, layout)], source.parent


def caption_shards(source: str | Path, images_root: str | Path | None = None, split: str | None = None,
                   shard_size: int = 10_000) -> list[Shard]:
    """Shards of a source in one of the layouts above; missing image files are skipped and reported."""
    images, root = caption_images(source, split)
    root = Path(images_root) if images_root is not None else root
    return chunked([ImageItem(image_id, captions, str(root / name)) for image_id, name, captions in images], shard_size)


def caption_references(source: str | Path, split: str | None = None) -> dict[Any, list[str]] | None:
    """The captions of a source in one of the layouts above as evaluation references (keyed by the
    image ids of its features), or None when ``source`` is in none of them."""
    if caption_layout(source) is None:
        return None
    return {image_id: captions for image_id, _, captions in caption_images(source, split)[0] if captions}
