"""Annotation files, each layout read by one reader: the images a file lists, their captions, files and domains.

The layouts (told apart by the file itself):

- Karpathy's split files, by split: ``dataset_coco.json`` (image ids: ``cocoid``) and
  ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` (ids: ``imgid``);
- the original's ``train_caption.json``: a JSON list of ``{"image_id", "caption"}``, one entry per caption;
- COCO-format captions files (COCO's ``captions_val2014.json``, nocaps' ``nocaps_val_4500_captions.json``
  with a ``domain`` per image): ``images`` with ``id`` and ``file_name``, ``annotations`` with
  ``image_id`` and ``caption``;
- Conceptual Captions' TSV (``caption<TAB>url``, no header, no quoting): the image id is the 0-based
  row, as the original names its downloads ``{row:08d}.jpg``;
- your own data: a folder in Hugging Face's ``imagefolder`` layout (``metadata.jsonl`` or
  ``metadata.csv`` with ``file_name`` and ``text``), or a CSV, JSONL or TSV of image path and caption
  (a TSV may be headerless ``path<TAB>caption``); the image id is the path as the file writes it;
- captions alone, for text-only training: a ``.txt`` file of one caption a line; a caption's id is
  its line number.

The same reading serves extraction (:mod:`clipcap.sources` makes shards of it) and evaluation
(:func:`load_annotations`), so that features and references agree on every id. What a file gets
wrong is refused in one line naming the file and the entry: ids that are not integers or strings,
one image listed twice, captions that are not strings, text that is not UTF-8, a CSV quote that
swallows the rows after it. Empty captions are dropped, and how many is said.
"""
from __future__ import annotations

import csv
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .files import ClipCapError, examples, open_regular, read_json

# Karpathy split names, and what each --split value takes from them.
KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",),
                   "trainval": ("train", "restval", "val")}
IMAGE_COLUMNS = ("file_name", "image", "path", "filepath", "filename", "image_path")
CAPTION_COLUMNS = ("text", "caption", "captions", "sentence", "sentences")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# What read_annotations reports as a file's layout.
KARPATHY_LAYOUTS = ("karpathy_coco", "karpathy_flickr")
OWN_DATA_LAYOUTS = ("imagefolder", "csv", "jsonl", "tsv", "karpathy_flickr")

ImageId = int | str  # see image_key
References = dict  # image id -> its reference captions, in the order the file lists the images
Images = dict  # image id -> what the annotations say about the image: "file" (relative path), "domain"


def image_key(image_id: Any) -> ImageId:
    """Ids compare as integers when they are integers or ASCII digit strings ("000012" is image 12;
    "²" is a digit to ``str.isdigit`` but not a number, so it stays a string)."""
    if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
        return int(image_id)
    if isinstance(image_id, str):
        return int(image_id) if image_id.isascii() and image_id.isdigit() else image_id
    raise ClipCapError(f"image id {image_id!r} is neither an integer nor a string")


@dataclass(slots=True)
class AnnotatedImage:
    """One image as an annotation file lists it."""

    image_id: ImageId
    entry: str  # where the file lists it first ("image entry 3", "annotation 7", "line 12"), for messages
    captions: list[str] = field(default_factory=list)
    caption_ids: list[Any] = field(default_factory=list)  # Karpathy's sentid, COCO's annotation id (else position)
    file: str | None = None  # its image file, relative, as the file writes it
    domain: str | None = None  # nocaps' in-domain, near-domain or out-domain
    split: str | None = None  # Karpathy's split
    dropped: int = 0  # its empty captions, left out

    def add(self, caption: str, caption_id: Any = None) -> None:
        """Keep ``caption`` unless it is empty (train.py refuses those; they score nothing)."""
        if caption.strip():
            self.captions.append(caption)
            self.caption_ids.append(caption_id)
        else:
            self.dropped += 1


@dataclass
class Annotations:
    """An annotation file read whole: its layout and every image it lists, in its order."""

    path: Path
    layout: str  # karpathy_coco, karpathy_flickr, caption_list, coco_format, conceptual_tsv, text, or own data's
    images: list[AnnotatedImage]
    root: Path  # where the images' relative files start unless told otherwise

    def select(self, split: str | None = None, include_restval: bool = True) -> list[AnnotatedImage]:
        """The images of ``split`` (Karpathy's files hold every split; ``train`` is train + restval unless
        ``include_restval`` is False); any other file is taken whole and takes no split. Says how many
        empty captions the chosen images had."""
        if self.layout not in KARPATHY_LAYOUTS:
            if split is not None:
                raise ClipCapError(f"{self.path}: --split applies to Karpathy's split files only (dataset_coco.json, "
                                   "dataset_flickr30k.json...); this file is taken whole")
            chosen = self.images
        else:
            if split is None:
                raise ClipCapError(f"{self.path}: Karpathy's split file holds every split; pass --split test or "
                                   "--split val to evaluate, --split train to train")
            if split not in KARPATHY_SPLITS:
                raise ClipCapError(f"{self.path}: unknown split {split!r} (choose from {', '.join(KARPATHY_SPLITS)})")
            wanted = set(KARPATHY_SPLITS[split])
            if split != "restval" and not include_restval:
                wanted.discard("restval")
            chosen = [image for image in self.images if image.split in wanted]
            if not chosen:
                splits = sorted({str(image.split) for image in self.images})
                raise ClipCapError(f"{self.path}: no image in split {split!r} (the file has {', '.join(splits)})")
        dropped = sum(image.dropped for image in chosen)
        if dropped:
            print(f"{self.path}: dropped {dropped} empty captions")
        return chosen


def read_annotations(path: str | Path) -> Annotations:
    """Any annotation file or folder of the layouts above, read whole; one-line errors for what is wrong."""
    path = Path(path)
    if path.is_dir():
        metadata = next((path / name for name in METADATA_FILES if (path / name).exists()), None)
        if metadata is None:
            raise ClipCapError(f"{path}: folder has no {' or '.join(METADATA_FILES)} (Hugging Face imagefolder "
                               "layout: file_name and text columns)")
        return Annotations(path, "imagefolder", _table_images(metadata, metadata.suffix[1:]), path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return Annotations(path, suffix[1:], _table_images(path, suffix[1:]), path.parent)
    if suffix == ".txt":
        return Annotations(path, "text", _text_lines(path), path.parent)
    if suffix == ".tsv":
        lines = _lines(path)
        first = next(lines, (1, ""))[1].split("\t")
        lines.close()
        if len(first) > 1 and first[1].startswith(("http://", "https://")):
            return Annotations(path, "conceptual_tsv", _conceptual_images(path), path.parent)
        return Annotations(path, "tsv", _table_images(path, "tsv"), path.parent)
    data = read_json(path, "annotations")
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] \
            and isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        coco = "cocoid" in data["images"][0]
        return Annotations(path, "karpathy_coco" if coco else "karpathy_flickr",
                           _karpathy_images(path, data["images"], "cocoid" if coco else "imgid"), path.parent)
    if isinstance(data, dict) and "annotations" in data:
        return Annotations(path, "coco_format", _coco_format_images(path, data), path.parent)
    if isinstance(data, list):
        return Annotations(path, "caption_list", _with_captions(path, data, {}), path.parent)
    raise ClipCapError(f"{path}: not a known annotations format (Karpathy's dataset_coco.json, COCO-format "
                       "annotations with 'annotations', or a list of {image_id, caption})")


# --------------------------------------------------------------------------- values


def _text(path: Path, entry: str, what: str, value: Any) -> str:
    """``value`` if it is a string that is text (no lone surrogate from a JSON escape), else a one-line error."""
    if not isinstance(value, str):
        raise ClipCapError(f"{path}: {entry}: {what} is {json.dumps(value)[:40]}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ClipCapError(f"{path}: {entry}: {what} {value[:40]!r} holds a lone surrogate, not text") from None
    return value


def _image_id(path: Path, entry: str, what: str, value: Any) -> ImageId:
    if isinstance(value, str):
        _text(path, entry, what, value)
    try:
        return image_key(value)
    except ClipCapError:
        raise ClipCapError(f"{path}: {entry}: {what} {json.dumps(value)[:40]} is neither an integer nor a "
                           "string") from None


def _optional_text(path: Path, entry: str, what: str, value: Any) -> str | None:
    return None if value is None else _text(path, entry, what, value)


def _listed_once(path: Path, seen: dict[ImageId, int], image_id: ImageId, i: int, what: str) -> None:
    """Refuse a second entry for one image: merging or re-pointing it would be silent damage."""
    first = seen.setdefault(image_id, i)
    if first != i:
        raise ClipCapError(f"{path}: image entries {first} and {i} have the same {what} {image_id!r}; "
                           "each image must be listed once")


# --------------------------------------------------------------------------- JSON layouts


def _karpathy_images(path: Path, entries: list[Any], id_key: str) -> list[AnnotatedImage]:
    """Karpathy's split file: each image once with its ``split``, ``sentences`` (``raw``) and file.
    COCO's raw sentences are kept as written (the original trained on them); Flickr's are stripped."""
    images, seen = [], {}
    for i, entry in enumerate(entries):
        where = f"image entry {i}"
        if not isinstance(entry, dict) or id_key not in entry or "split" not in entry \
                or not isinstance(entry.get("sentences"), list):
            raise ClipCapError(f"{path}: {where} needs '{id_key}', 'split' and a 'sentences' list (Karpathy's format: "
                               f"filepath, filename, {id_key}, split, sentences with raw)")
        image_id = _image_id(path, where, id_key, entry[id_key])
        _listed_once(path, seen, image_id, i, id_key)
        filename = _optional_text(path, where, "'filename'", entry.get("filename"))
        filepath = _optional_text(path, where, "'filepath'", entry.get("filepath"))
        image = AnnotatedImage(image_id, where, split=entry["split"],
                               file="/".join(filter(None, (filepath, filename))) if filename else None)
        for j, sentence in enumerate(entry["sentences"]):
            if not isinstance(sentence, dict) or "raw" not in sentence:
                raise ClipCapError(f"{path}: {where}: sentence {j} has no 'raw'")
            raw = _text(path, f"{where} sentence {j}", "'raw'", sentence["raw"])
            image.add(raw if id_key == "cocoid" else raw.strip(), sentence.get("sentid", j))
        images.append(image)
    return images


def _caption_of(path: Path, i: int, annotation: Any) -> tuple[ImageId, str]:
    """The image id and caption of one entry of a COCO-format ``annotations`` list or of a caption list."""
    where = f"annotation {i}"
    if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
        raise ClipCapError(f"{path}: {where} needs 'image_id' and a 'caption' string")
    return (_image_id(path, where, "image_id", annotation["image_id"]),
            _text(path, where, "'caption'", annotation["caption"]))


def _coco_format_images(path: Path, data: dict[str, Any]) -> list[AnnotatedImage]:
    """COCO format: the listed images in order (each once), then any image only the annotations name."""
    listed, annotations = data.get("images", []), data["annotations"]
    if not isinstance(listed, list) or not isinstance(annotations, list):
        raise ClipCapError(f"{path}: 'images' and 'annotations' must be lists (COCO format)")
    by_id: dict[ImageId, AnnotatedImage] = {}
    seen: dict[ImageId, int] = {}
    for i, entry in enumerate(listed):
        where = f"image entry {i}"
        if not isinstance(entry, dict) or "id" not in entry:
            raise ClipCapError(f"{path}: {where} needs an 'id' (COCO format: id, file_name)")
        image_id = _image_id(path, where, "id", entry["id"])
        _listed_once(path, seen, image_id, i, "id")
        by_id[image_id] = AnnotatedImage(image_id, where,
                                         file=_optional_text(path, where, "'file_name'", entry.get("file_name")),
                                         domain=_optional_text(path, where, "'domain'", entry.get("domain")))
    return _with_captions(path, annotations, by_id)


def _with_captions(path: Path, annotations: list[Any], by_id: dict[ImageId, AnnotatedImage]) -> list[AnnotatedImage]:
    """``by_id`` with the caption of each annotation added to its image; an image only the annotations name
    comes after, in order of first appearance (the original's ``train_caption.json`` names every image so)."""
    for i, annotation in enumerate(annotations):
        image_id, caption = _caption_of(path, i, annotation)
        by_id.setdefault(image_id, AnnotatedImage(image_id, f"annotation {i}")).add(caption, annotation.get("id", i))
    if not by_id:
        raise ClipCapError(f"{path}: no captions")
    return list(by_id.values())


# --------------------------------------------------------------------------- text layouts


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, line breaks (``\\n``, ``\\r\\n``, ``\\r``) removed; a
    byte-order mark is skipped. What is not a regular file, or not UTF-8, is refused naming the line."""
    try:
        f = open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ClipCapError(f"{path}: annotations file not found") from None
    except OSError as e:
        raise ClipCapError(f"{path}: cannot read the annotations ({e.strerror})") from None
    number = 0
    with f:
        for chunk in f:
            for raw in chunk.splitlines():
                number += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ClipCapError(f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start}: "
                                       f"{raw[e.start:e.start + 4]!r}); save the file as UTF-8") from None
                yield number, line.removeprefix("\ufeff") if number == 1 else line


def conceptual_captions(path: str | Path) -> list[str]:
    """A Conceptual Captions TSV's captions by row (``caption<TAB>url``, no header): row ``i`` is image ``i``.

    Read without quoting, as the format has none: a quote is a character of its caption. Empty
    captions stay, so that rows keep their numbers.
    """
    path = Path(path)
    captions = []
    for number, line in _lines(path):
        caption, tab, _ = line.partition("\t")
        if not tab:
            raise ClipCapError(f"{path}: line {number} is not 'caption<TAB>url'")
        captions.append(caption)
    if not captions:
        raise ClipCapError(f"{path}: empty file")
    return captions


def _text_lines(path: Path) -> list[AnnotatedImage]:
    """A caption per line, stripped; blank lines are no caption. Each is an image of its own, with no file."""
    captions = []
    for number, line in _lines(path):
        if line.strip():
            captions.append(AnnotatedImage(number, f"line {number}"))
            captions[-1].add(line.strip())
    if not captions:
        raise ClipCapError(f"{path}: no captions (one a line)")
    return captions


def _conceptual_images(path: Path) -> list[AnnotatedImage]:
    images = []
    for row, caption in enumerate(conceptual_captions(path)):
        image = AnnotatedImage(row, f"line {row + 1}", file=f"{row:08d}.jpg")
        image.add(caption)
        images.append(image)
    return images


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of a CSV file. A quoted field may not run over lines: captions hold no line
    breaks, and an unmatched quote would swallow every row after it into one caption."""
    at = [0]

    def lines() -> Iterator[str]:
        for number, line in _lines(path):
            at[0] = number
            yield line

    reader = csv.reader(lines(), strict=True)
    while True:
        start = at[0] + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if at[0] > start:
                raise _runs_over_lines(path, start, at[0], f" ({e})") from None
            raise ClipCapError(f"{path}: line {at[0]} is not valid CSV ({e})") from None
        if at[0] != start:
            raise _runs_over_lines(path, start, at[0])
        yield start, values


def _runs_over_lines(path: Path, start: int, end: int, problem: str = "") -> ClipCapError:
    return ClipCapError(f"{path}: line {start}: a quoted field runs on to line {end}{problem}; an unmatched quote? "
                        "A caption must fit on its line")


def _table_rows(path: Path, layout: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV, TSV or JSONL file; a headerless TSV gives ``path`` and ``caption``.
    TSV has no quoting: a field is what lies between tabs."""
    if layout == "jsonl":
        for line_number, line in _lines(path):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ClipCapError(f"{path}: line {line_number} is not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ClipCapError(f"{path}: line {line_number} is not a JSON object")
                yield line_number, row
        return
    rows = _csv_rows(path) if layout == "csv" else ((n, line.split("\t")) for n, line in _lines(path))
    header = None
    for line_number, values in rows:
        if header is None:
            header = values
            if layout == "tsv" and not (_column(header, IMAGE_COLUMNS) and _column(header, CAPTION_COLUMNS)):
                header = ["path", "caption"]
            else:
                continue
        if any(v.strip() for v in values):
            yield line_number, dict(zip(header, values))


def _column(names: Any, wanted: tuple[str, ...]) -> str | None:
    lower = {name.strip().lower(): name for name in names if isinstance(name, str) and name}
    return next((lower[w] for w in wanted if w in lower), None)


def _table_images(path: Path, layout: str) -> list[AnnotatedImage]:
    """Own data's images in order of first appearance, by path as written; rows of one image are joined.
    Captions are stripped; a CSV/TSV row without a caption cell has an empty one."""
    images: dict[str, AnnotatedImage] = {}
    image_col = caption_col = None
    for line_number, row in _table_rows(path, layout):
        where = f"line {line_number}"
        if image_col is None:
            image_col, caption_col = _column(row, IMAGE_COLUMNS), _column(row, CAPTION_COLUMNS)
            if image_col is None or caption_col is None:
                raise ClipCapError(f"{path}: needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption "
                                   f"column ({', '.join(CAPTION_COLUMNS)}); found {', '.join(map(str, row))}")
        name, captions = row.get(image_col), row.get(caption_col, "" if layout != "jsonl" else None)
        if not isinstance(name, str) or not name.strip():
            raise ClipCapError(f"{path}: line {line_number} has no image path in '{image_col}'")
        _text(path, where, f"'{image_col}'", name)
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ClipCapError(f"{path}: line {line_number}: '{caption_col}' must be a string or a list of strings")
        name = Path(name.strip()).as_posix()
        image = images.setdefault(name, AnnotatedImage(name, where, file=name))
        for caption in captions:
            image.add(_text(path, where, f"'{caption_col}'", caption).strip())
    if not images:
        raise ClipCapError(f"{path}: no rows")
    return list(images.values())


# --------------------------------------------------------------------------- evaluation references


def load_annotations(path: str | Path, split: str | None = None) -> tuple[References, Images]:
    """The references of an annotation file of any layout above (``split`` for Karpathy's files) and what
    it says about their images: the image file (COCO ``file_name``, Karpathy ``filepath/filename``, own
    data's path) and nocaps' ``domain``. Images without captions are not references."""
    path = Path(path)
    images = [image for image in read_annotations(path).select(split) if image.captions]
    if not images:
        raise ClipCapError(f"{path}: no captions")
    about = {image.image_id: {key: value for key, value in (("file", image.file), ("domain", image.domain))
                              if value is not None} for image in images}
    return {image.image_id: image.captions for image in images}, {k: v for k, v in about.items() if v}


def load_references(path: str | Path, split: str | None = None) -> References:
    """The references of :func:`load_annotations` alone: image id -> captions, in the file's order."""
    return load_annotations(path, split)[0]


def image_files(references: References, images: Images, folder: str | Path, only_common_images: bool = False,
                ref_source: str = "references") -> dict[ImageId, Path]:
    """The image file of each reference image under ``folder``, by the annotations' relative path (or,
    failing that, its file name alone: COCO's images may lie in one folder). Missing files are an error,
    unless ``only_common_images``, which leaves those images out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClipCapError(f"{folder} (--images): folder not found")
    unnamed = [k for k in references if not images.get(k, {}).get("file")]
    if unnamed:
        raise ClipCapError(f"{ref_source}: no image file named for {len(unnamed)} images "
                           f"(e.g. {examples(unnamed, 3)}); --images needs COCO-format images[].file_name or "
                           "Karpathy's filepath/filename")
    found, missing = {}, []
    for k in references:
        relative = Path(images[k]["file"])
        path = next((p for p in (folder / relative, folder / relative.name) if p.is_file()), None)
        if path is None:
            missing.append(str(relative))
        else:
            found[k] = path
    if missing and not only_common_images:
        raise ClipCapError(f"{folder} (--images): {len(missing)} of the {len(references)} images of {ref_source} "
                           f"are missing (e.g. {examples(missing, 3)}); score the others with --only_common_images")
    if not found:
        raise ClipCapError(f"{folder} (--images): none of the images of {ref_source} is there "
                           f"(e.g. {examples(missing, 3)})")
    return found
