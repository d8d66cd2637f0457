"""A set of CLIP image embeddings and the captions that point at them, and the original's pickle of it.

The original's ``parse_coco.py`` writes ``{"clip_embedding": [N, D], "captions": [{..., "clip_embedding": row}]}``;
it is read here without running pickled code, and checked (indices in range, embeddings finite,
captions text) so that bad data fails in one line instead of training to NaN.

Text-only training (CapDec) uses the same layout for CLIP *text* embeddings, one per caption; such
a file says so (``"modality": "text"``, a key the original's train.py ignores), so that they are
never captioned as if they were images.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .files import ClipCapError, atomic_write, examples

# What a feature file's embeddings are of: images (every file that does not say), or captions (CapDec).
MODALITIES = ("image", "text")


@dataclass
class FeatureSet:
    """CLIP embeddings of images and the captions that point at them (many captions per image)."""

    embeddings: torch.Tensor | np.ndarray  # [num_images, D]; for a store, any array-like read from disk
    captions: Sequence[str]  # one per caption (a list, or a store's Arrow-backed sequence)
    image_index: np.ndarray  # caption i describes embeddings[image_index[i]]
    image_ids: Sequence[Any]  # caption i's image id (COCO id, file key, ...)
    clip_model: str | None = None  # the CLIP that made the embeddings, when the file records it
    modality: str = "image"  # "text": CLIP text embeddings of the captions themselves, one per caption

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def embeddings_at(self, rows: np.ndarray) -> torch.Tensor:
        """Embedding rows [n, D] as float32, in one gather."""
        if isinstance(self.embeddings, torch.Tensor):
            return self.embeddings[torch.from_numpy(rows)].float()
        return torch.as_tensor(np.asarray(self.embeddings[rows]), dtype=torch.float32)

    def first_rows(self, limit: int | None = None) -> tuple[list[Any], np.ndarray]:
        """Each image's id and embedding row, images in order of first appearance (the first ``limit``)."""
        first: dict[Any, int] = {}
        for image_id, row in zip(self.image_ids, self.image_index):
            if image_id not in first:
                if len(first) == limit:
                    break
                first[image_id] = int(row)
        return list(first), np.fromiter(first.values(), dtype=np.int64, count=len(first))

    def check_images(self, source: str | Path) -> None:
        """Refuse text embeddings where image embeddings are needed: a caption of a text embedding would
        be scored as a caption of an image."""
        if self.modality == "text":
            raise ClipCapError(f"{source}: holds CLIP text embeddings of captions (parse_captions.py --text_only), "
                               "not image embeddings: caption images, or features made from images")

    def validate(self, source: str | Path) -> None:
        """Check that the embeddings have a width, the caption -> embedding indices and that every embedding
        is finite, naming the first bad ones: a NaN row would otherwise train to NaN weights without a word."""
        if self.modality not in MODALITIES:
            raise ClipCapError(f"{source}: modality {self.modality!r} is neither of {', '.join(MODALITIES)}")
        n = int(self.embeddings.shape[0])
        if n and self.dim == 0:
            raise ClipCapError(f"{source}: the embeddings are 0-dimensional ([{n}, 0]): no image features to train on")
        if len(self.image_index) != len(self.captions) or len(self.image_ids) != len(self.captions):
            raise ClipCapError(f"{source}: caption, index and image id lists differ in length")
        bad = np.flatnonzero((self.image_index < 0) | (self.image_index >= n))
        if bad.size:
            i = int(bad[0])
            raise ClipCapError(f"{source}: caption {i} points at embedding row {int(self.image_index[i])}, "
                               f"but the file has {n} rows")
        bad = _nonfinite_rows(self.embeddings)
        if bad.size:
            captions = np.flatnonzero(np.isin(self.image_index, bad))
            raise ClipCapError(f"{source}: {bad.size} embedding rows hold NaN or inf: rows {examples(bad.tolist())}"
                               f" (captions {examples(captions.tolist())}); re-extract those images or drop them")


def _nonfinite_rows(embeddings: Any) -> np.ndarray:
    """Indices of the embedding rows holding NaN or inf (a store scans its shards in chunks)."""
    if hasattr(embeddings, "nonfinite_rows"):
        return embeddings.nonfinite_rows()
    finite = torch.isfinite(torch.as_tensor(embeddings)).all(dim=1)
    return torch.nonzero(~finite).flatten().numpy()


def _load_storage_safely(data: bytes) -> Any:
    # Tensors inside a plain pickle keep their storage as torch.save bytes; the stock hook
    # loads those with weights_only=False, so route them through the safe loader instead.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and tensors; refuses anything that runs code."""

    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_safely
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_original_pickle(path: str | Path) -> FeatureSet:
    """The original's ``parse_coco.py`` / ``parse_conceptual.py`` output, loaded without running code."""
    path = Path(path)
    if not path.is_file():
        raise ClipCapError(f"{path}: feature file not found")
    try:
        with open(path, "rb") as f:
            data = _TensorOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError, IndexError, TypeError) as e:
        raise ClipCapError(f"{path}: not a readable feature pickle, truncated or corrupt ({e})") from None
    if not isinstance(data, dict) or "clip_embedding" not in data or "captions" not in data:
        raise ClipCapError(f"{path}: expected a dict with 'clip_embedding' and 'captions'")
    try:
        embeddings = torch.as_tensor(data["clip_embedding"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ClipCapError(f"{path}: 'clip_embedding' is not an [N, D] array of numbers ({e})") from None
    if embeddings.ndim != 2 or not (embeddings.is_floating_point() or embeddings.dtype in (torch.int32, torch.int64)):
        raise ClipCapError(f"{path}: 'clip_embedding' must be [N, D] numbers, got {embeddings.dtype} "
                           f"of shape {tuple(embeddings.shape)}")
    if not isinstance(data["captions"], list):
        raise ClipCapError(f"{path}: 'captions' must be a list, got {type(data['captions']).__name__}")
    captions, ids, index = [], [], np.zeros(len(data["captions"]), dtype=np.int64)
    for i, entry in enumerate(data["captions"]):
        caption, image_id, row = _check_caption_entry(entry, i, path)
        captions.append(caption)
        ids.append(image_id)
        index[i] = row
    clip_model = data.get("clip_model") if isinstance(data.get("clip_model"), str) else None
    features = FeatureSet(embeddings, captions, index, ids, clip_model, data.get("modality", "image"))
    features.validate(path)
    return features


def _check_caption_entry(entry: Any, i: int, path: Path) -> tuple[str, Any, int]:
    """(caption, image id, embedding row) of entry ``i``, or a one-line error naming what is wrong."""
    if not isinstance(entry, dict) or "caption" not in entry or "clip_embedding" not in entry:
        raise ClipCapError(f"{path}: caption entry {i} needs 'caption' and 'clip_embedding', got {entry!r:.80}")
    caption, row = entry["caption"], entry["clip_embedding"]
    image_id = entry.get("image_id", row)
    try:
        hash(image_id)
    except TypeError:
        raise ClipCapError(f"{path}: caption {i} has image_id {image_id!r:.80}, which is not a number or text") from None
    where = f"{path}: caption {i} (image id {image_id!r})"
    if not isinstance(caption, str):
        raise ClipCapError(f"{where} is {type(caption).__name__} {caption!r:.40}, not text")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ClipCapError(f"{where} is not valid Unicode ({e.reason} at character {e.start})") from None
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
        raise ClipCapError(f"{where} has clip_embedding {row!r:.40}, not a row number")
    return caption, image_id, int(row)


def save_original_pickle(features: FeatureSet, path: str | Path) -> None:
    """Write the original's pickle layout (readable by the original's train.py, which ignores the
    extra ``clip_model`` and ``modality`` keys), atomically."""
    embeddings = features.embeddings if isinstance(features.embeddings, torch.Tensor) \
        else torch.as_tensor(np.asarray(features.embeddings))
    captions = [{"image_id": image_id, "caption": caption, "clip_embedding": int(row)}
                for caption, row, image_id in zip(features.captions, features.image_index, features.image_ids)]
    data = {"clip_embedding": embeddings, "captions": captions}
    if features.clip_model is not None:
        data["clip_model"] = features.clip_model
    if features.modality != "image":
        data["modality"] = features.modality
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f)
