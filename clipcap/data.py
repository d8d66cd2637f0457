"""What training reads: features from a pickle or a store, captions tokenised once (cached), batches."""
from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .featureset import FeatureSet, load_original_pickle
from .files import ClipCapError, atomic_write, user_cache
from .store import load_store


def load_features(path: str | Path) -> FeatureSet:
    """A feature pickle (``.pkl``) or a feature store directory."""
    path = Path(path)
    return load_store(path) if path.is_dir() else load_original_pickle(path)


def tokens_cache_path(data_path: str | Path) -> Path:
    """``x/oscar_split_ViT-B_32_train.pkl`` -> ``x/oscar_split_ViT-B_32_train_tokens.npz``.

    When the data's folder is not writable (a shared, read-only dataset), the cache goes to the
    user's cache directory instead, named by a hash of the data's path; where is printed.
    """
    data_path = Path(data_path)
    stem = data_path.name if data_path.is_dir() else data_path.stem
    if os.access(data_path.parent, os.W_OK):
        return data_path.with_name(f"{stem}_tokens.npz")
    digest = hashlib.sha256(str(data_path.resolve()).encode()).hexdigest()[:16]
    path = user_cache("tokens") / f"{stem}_{digest}_tokens.npz"
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
    chunks: list[np.ndarray] = []  # int32 per 10k captions: a list of Python ints would be many times larger
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer, batched: the Python wrapper's per-call cost adds up on millions
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
        blank = next((i for i, caption in enumerate(features.captions) if not caption.strip()), None)
        if blank is not None:  # what the readers drop; a caption of spaces would be trained on as text
            raise ClipCapError(f"{source}: caption {blank} (image id {features.image_ids[blank]!r}) is empty or "
                               "only whitespace")
        self.features = features
        self.ids, self.offsets = tokenize_captions(features.captions, tokenizer, cache)
        lengths = np.diff(self.offsets)
        if (lengths == 0).any():
            i = int(np.flatnonzero(lengths == 0)[0])
            raise ClipCapError(f"{source}: caption {i} (image id {features.image_ids[i]!r}) has no tokens")
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
