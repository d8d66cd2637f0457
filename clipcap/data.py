"""Cached CLIP features and their captions, tokenised once, batched for training.

Reads the original's feature pickle (``{"clip_embedding": [N, D], "captions": [{..., "clip_embedding": row}]}``)
without running pickled code, and the feature store of :mod:`clipcap.store`.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .files import ClipCapError, atomic_write


@dataclass
class FeatureSet:
    """CLIP embeddings of images and the captions that point at them (many captions per image)."""

    embeddings: torch.Tensor | np.ndarray  # [num_images, D]; for a store, any array-like read from disk
    captions: Sequence[str]  # one per caption (a list, or a store's Arrow-backed sequence)
    image_index: np.ndarray  # caption i describes embeddings[image_index[i]]
    image_ids: Sequence[Any]  # caption i's image id (COCO id, file key, ...)
    clip_model: str | None = None  # the CLIP that made the embeddings, when the file records it

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def embedding(self, row: int) -> torch.Tensor:
        """One embedding as float32 (fp16 features are upcast)."""
        return self.embeddings_at(np.array([row]))[0]

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

    def validate(self, source: str | Path) -> None:
        """Check the caption -> embedding indices and that every embedding is finite, naming the
        first bad ones: a NaN row would otherwise train to NaN weights without a word."""
        n = int(self.embeddings.shape[0])
        if len(self.image_index) != len(self.captions) or len(self.image_ids) != len(self.captions):
            raise ClipCapError(f"{source}: caption, index and image id lists differ in length")
        bad = np.flatnonzero((self.image_index < 0) | (self.image_index >= n))
        if bad.size:
            i = int(bad[0])
            raise ClipCapError(f"{source}: caption {i} points at embedding row {int(self.image_index[i])}, "
                               f"but the file has {n} rows")
        bad = nonfinite_rows(self.embeddings)
        if bad.size:
            captions = np.flatnonzero(np.isin(self.image_index, bad))
            raise ClipCapError(f"{source}: {bad.size} embedding rows hold NaN or inf: rows {_examples(bad.tolist())}"
                               f" (captions {_examples(captions.tolist())}); re-extract those images or drop them")


def nonfinite_rows(embeddings: Any) -> np.ndarray:
    """Indices of the embedding rows holding NaN or inf (a store scans its shards in chunks)."""
    if hasattr(embeddings, "nonfinite_rows"):
        return embeddings.nonfinite_rows()
    finite = torch.isfinite(torch.as_tensor(embeddings)).all(dim=1)
    return torch.nonzero(~finite).flatten().numpy()


def _examples(values: list[Any], n: int = 5) -> str:
    return ", ".join(map(repr, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


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
        caption, image_id, row = check_caption_entry(entry, i, path)
        captions.append(caption)
        ids.append(image_id)
        index[i] = row
    clip_model = data.get("clip_model") if isinstance(data.get("clip_model"), str) else None
    features = FeatureSet(embeddings, captions, index, ids, clip_model)
    features.validate(path)
    return features


def check_caption_entry(entry: Any, i: int, path: Path) -> tuple[str, Any, int]:
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
    extra ``clip_model`` key), atomically."""
    embeddings = features.embeddings if isinstance(features.embeddings, torch.Tensor) \
        else torch.as_tensor(np.asarray(features.embeddings))
    captions = [{"image_id": image_id, "caption": caption, "clip_embedding": int(row)}
                for caption, row, image_id in zip(features.captions, features.image_index, features.image_ids)]
    data = {"clip_embedding": embeddings, "captions": captions}
    if features.clip_model is not None:
        data["clip_model"] = features.clip_model
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f)


def load_features(path: str | Path) -> FeatureSet:
    """A feature pickle (``.pkl``) or a feature store directory."""
    path = Path(path)
    if path.is_dir():
        from .store import load_store

        return load_store(path)
    return load_original_pickle(path)


def tokens_cache_path(data_path: str | Path) -> Path:
    """``x/oscar_split_ViT-B_32_train.pkl`` -> ``x/oscar_split_ViT-B_32_train_tokens.npz``.

    When the data's folder is not writable (a shared, read-only dataset), the cache goes to the
    user's cache directory instead, named by a hash of the data's path; where is printed.
    """
    data_path = Path(data_path)
    stem = data_path.name if data_path.is_dir() else data_path.stem
    if os.access(data_path.parent, os.W_OK):
        return data_path.with_name(f"{stem}_tokens.npz")
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipcap" / "tokens"
    digest = hashlib.sha256(str(data_path.resolve()).encode()).hexdigest()[:16]
    path = user_cache / f"{stem}_{digest}_tokens.npz"
    print(f"{data_path.parent} is not writable: caption tokens cached in {path}")
    return path


def _fingerprint(captions: Sequence[str], tokenizer: Any) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    for caption in captions:
        h.update(caption.encode())
        h.update(b"\0")
    return h.hexdigest()


def tokenize_captions(captions: Sequence[str], tokenizer: Any,
                      cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPT-2 ids of every caption as (flat ids, offsets); cached, and re-made when captions or tokenizer change."""
    fingerprint = _fingerprint(captions, tokenizer)
    if cache is not None and Path(cache).is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fingerprint:
                    return f["ids"], f["offsets"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    chunks: list[np.ndarray] = []  # int32 per 10k captions: a list of Python ints would take 10x the memory
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: the Python wrapper's per-call overhead dominates at 3M
    for start in tqdm(range(0, len(captions), 10_000), desc="tokenising captions", unit_scale=10_000,
                      disable=len(captions) <= 50_000):
        encoded = [e.ids for e in backend.encode_batch(list(captions[start:start + 10_000]), add_special_tokens=False)]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets[start + 1:start + 1 + len(encoded)] = offsets[start] + np.cumsum(lengths)
        chunks.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    if cache is not None:
        with atomic_write(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=flat, offsets=offsets, fingerprint=np.array(fingerprint))
    return flat, offsets


def max_caption_length(lengths: np.ndarray, limit: int | None = None) -> int:
    """The original's truncation length ``min(mean + 10 * std, max)``, capped at ``limit``."""
    length = int(min(lengths.mean() + 10 * lengths.std(), lengths.max()))
    return max(1, min(length, limit) if limit is not None else length)


class Batch(NamedTuple):
    """Captions right-padded with zeros to the longest: tokens [B, T], lengths [B], CLIP embeddings
    [B, D], and the flat indices of the real tokens in ``tokens`` (what ``ClipCap`` needs for its loss)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    embeddings: torch.Tensor
    positions: torch.Tensor


class CaptionDataset(Dataset):
    """Captions as GPT-2 ids with their CLIP embeddings, fetched a whole batch at a time.

    ``dataset[indices]`` gives the :class:`Batch` of those captions. One vectorised gather per batch
    instead of one Python call per caption; a DataLoader fetches it that way with
    ``batch_size=None`` and a sampler of index lists. Captions are truncated by the original's rule.
    """

    def __init__(self, features: FeatureSet, tokenizer: Any, cache: str | Path | None = None,
                 max_positions: int | None = None, source: str | Path = "features"):
        if len(features) == 0:
            raise ClipCapError(f"{source}: no captions to train on")
        self.features = features
        self.ids, self.offsets = tokenize_captions(features.captions, tokenizer, cache)
        lengths = np.diff(self.offsets)
        if (lengths == 0).any():
            i = int(np.flatnonzero(lengths == 0)[0])
            raise ClipCapError(f"{source}: caption {i} (image id {features.image_ids[i]!r}) is empty")
        self.max_length = max_caption_length(lengths, max_positions)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        captions = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[captions]
        lengths = np.minimum(self.offsets[captions + 1] - starts, self.max_length)
        columns = np.arange(lengths.max())
        real = columns < lengths[:, None]
        tokens = np.where(real, self.ids[np.where(real, starts[:, None] + columns, 0)], 0).astype(np.int64)
        embeddings = self.features.embeddings_at(self.features.image_index[captions])
        return Batch(torch.from_numpy(tokens), torch.from_numpy(lengths), embeddings,
                     torch.from_numpy(np.flatnonzero(real)))
