"""The feature store: CLIP embeddings in float16 ``.npy`` shards and a Parquet caption index.

The original keeps every embedding and caption in one pickle held in RAM and rewritten whole
every 10,000 captions. A store is a directory instead::

    store.json              format, CLIP model, embedding width, the shards in row order; "modality":
                            "text" for CLIP text embeddings of the captions (one row per caption)
    captions.parquet        caption, image_id, image_index (row of the caption's image embedding)
    skipped.tsv             images that could not be decoded: path TAB reason
    shards/NAME.npy         float16 [rows, D]: one row per image
    shards/NAME.parquet     that shard's captions (``row`` local to the shard); written after the
                            ``.npy``: the two together mark a finished shard
    pieces/NAME/PIECE.*     while a shard is written in pieces (by several processes), the same two
                            files for each piece; joined into the shard, then deleted

Pieces and shards are written one at a time, so an extraction killed at any point loses at most
the pieces in progress. Loading reads embedding rows on demand with ``pread`` (no memory map, whose
touched pages would count against the training process) and keeps captions in Arrow buffers,
not Python strings, so memory stays flat however large the store. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .featureset import FeatureSet, load_original_pickle, save_original_pickle
from .files import ClipCapError, atomic_write, write_json

FORMAT = "clipcap-feature-store"
VERSION = 1
STORE_FILE = "store.json"
INDEX_FILE = "captions.parquet"
SKIPPED_FILE = "skipped.tsv"
SHARD_DIR = "shards"
PIECE_DIR = "pieces"


# --------------------------------------------------------------------------- reading


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        try:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ClipCapError(f"{path}: unknown .npy version")
            shape, fortran, dtype = read_header(f)
        except (ValueError, EOFError) as e:
            raise ClipCapError(f"{path}: not a .npy file ({e})") from None
        if fortran or len(shape) != 2 or dtype.kind != "f":
            raise ClipCapError(f"{path}: expected a C-ordered [rows, D] float array, got {dtype} {shape}")
        offset = f.tell()
    if os.path.getsize(path) != offset + shape[0] * shape[1] * dtype.itemsize:
        raise ClipCapError(f"{path}: file size does not match its header {shape}: truncated?")
    return shape, dtype, offset


class ShardedEmbeddings:
    """Embedding rows of several ``.npy`` shards as one [N, D] array, read from disk on demand.

    Indexing with an int gives [D]; with a slice or an integer array, [n, D]. Safe to use from
    forked DataLoader workers (each process opens its own file handles).
    """

    def __init__(self, paths: Sequence[str | Path]):
        self._fds: dict[int, int] = {}
        self._pid = -1
        self.paths = [Path(p) for p in paths]
        layouts = [_npy_layout(p) for p in self.paths]
        widths = {shape[1] for shape, _, _ in layouts}
        dtypes = {dtype for _, dtype, _ in layouts}
        if len(widths) > 1 or len(dtypes) > 1:
            raise ClipCapError(f"{self.paths[0].parent}: shards differ in width {widths} or dtype {dtypes}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float16)
        self.dim = widths.pop() if widths else 0
        self.shape = (sum(shape[0] for shape, _, _ in layouts), self.dim)
        self.ndim = 2
        self.starts = np.cumsum([0] + [shape[0] for shape, _, _ in layouts])  # first global row of each shard
        self.offsets = [offset for _, _, offset in layouts]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked child must not share its parent's handles
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def _read(self, row: int, out: np.ndarray) -> None:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} embeddings")
        row %= len(self)
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        offset = self.offsets[shard] + (row - int(self.starts[shard])) * out.nbytes
        if os.preadv(self._fd(shard), [out], offset) != out.nbytes:
            raise ClipCapError(f"{self.paths[shard]}: short read at row {row}; the file changed on disk")

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            out = np.empty(self.dim, dtype=self.dtype)
            self._read(int(key), out)
            return out
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        for i, row in enumerate(rows):
            self._read(int(row), out[i])
        return out

    def nonfinite_rows(self, chunk_bytes: int = 64 * 2**20) -> np.ndarray:
        """Global indices of rows holding NaN or inf, found by reading each shard in chunks of
        about ``chunk_bytes`` (the memory a scan takes, however large the store)."""
        bad = []
        chunk = max(1, chunk_bytes // max(1, self.dim * self.dtype.itemsize))
        for shard, path in enumerate(self.paths):
            rows = int(self.starts[shard + 1] - self.starts[shard])
            with open(path, "rb") as f:
                f.seek(self.offsets[shard])
                for start in range(0, rows, chunk):
                    n = min(chunk, rows - start)
                    block = np.fromfile(f, dtype=self.dtype, count=n * self.dim).reshape(n, self.dim)
                    bad.append(np.flatnonzero(~np.isfinite(block).all(axis=1)) + int(self.starts[shard]) + start)
        return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.load(p, allow_pickle=False) for p in self.paths]) if self.paths \
            else np.zeros((0, self.dim), self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


class ArrowSequence(Sequence):
    """A read-only list over an Arrow column: millions of strings in two buffers, not Python objects."""

    def __init__(self, column: pa.ChunkedArray | pa.Array):
        self.column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            part = self.column.slice(start, max(0, stop - start)).to_pylist()
            return part[::step]
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(key)
        return self.column[key].as_py()

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), 10_000):
            yield from self.column.slice(start, 10_000).to_pylist()


def read_meta(store: str | Path) -> dict[str, Any]:
    """``store.json`` of a finished store, checked."""
    path = Path(store) / STORE_FILE
    if not path.is_file():
        raise ClipCapError(f"{store}: not a finished feature store (no {STORE_FILE}); if an extraction "
                           "was writing it, run it again to finish")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClipCapError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ClipCapError(f"{path}: not a version-{VERSION} {FORMAT} file")
    listing = "'shards' must be a list of {\"name\": ..., \"rows\": ...}"
    if not isinstance(meta.get("shards"), list):
        raise ClipCapError(f"{path}: {listing}, not {type(meta.get('shards')).__name__}")
    for i, entry in enumerate(meta["shards"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and type(entry.get("rows")) is int
                and entry["rows"] >= 0):
            raise ClipCapError(f"{path}: {listing}; entry {i} is {entry!r:.80}")
        if not _is_shard_name(entry["name"]):
            raise ClipCapError(f"{path}: shard name {entry['name']!r} is not a file name")
    return meta


def _is_shard_name(name: str) -> bool:
    """Whether ``name`` names a file in the shard folder, and nothing outside it."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def load_store(store: str | Path) -> FeatureSet:
    """The store as a FeatureSet whose embeddings are read from disk as rows are asked for."""
    store = Path(store)
    meta = read_meta(store)
    paths = [store / SHARD_DIR / f"{s['name']}.npy" for s in meta["shards"]]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing is not None:
        raise ClipCapError(f"{missing}: missing ({STORE_FILE} lists shard {missing.stem})")
    embeddings = ShardedEmbeddings(paths)
    if [int(n) for n in np.diff(embeddings.starts)] != [s["rows"] for s in meta["shards"]]:
        raise ClipCapError(f"{store}: shard sizes differ from {STORE_FILE}; the store was changed after writing")
    try:
        index = pq.read_table(store / INDEX_FILE)
        captions, image_ids = index.column("caption"), index.column("image_id")
        image_index = index.column("image_index").to_numpy()
    except (OSError, KeyError, pa.ArrowException) as e:
        raise ClipCapError(f"{store / INDEX_FILE}: unreadable caption index ({e})") from None
    if not (pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type)) or captions.null_count:
        first = pc.index(pc.is_null(captions), True).as_py() if captions.null_count else 0
        raise ClipCapError(f"{store / INDEX_FILE}: caption {first} (image id {image_ids[first].as_py()!r}) is "
                           f"{'missing (null)' if captions.null_count else captions.type}, not text")
    clip_model = meta.get("clip_model") if isinstance(meta.get("clip_model"), str) else None
    features = FeatureSet(embeddings, ArrowSequence(captions), image_index.astype(np.int64, copy=False),
                          ArrowSequence(image_ids), clip_model, meta.get("modality", "image"))
    features.validate(store)
    return features


# --------------------------------------------------------------------------- writing


def image_id_column(image_ids: Sequence[Any], where: str | Path, what: str = "caption") -> pa.Array:
    """Image ids (one per ``what``) as one Parquet column: all integers (int64) or all text. Ids of any other
    kind, of both kinds, or beyond 64 bits are refused, naming the first with one: a column holds one type."""
    ids, first = list(image_ids), {}
    for i, value in enumerate(ids):
        integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        kind = "int" if integer else "str" if isinstance(value, str) else None
        if kind is None:
            raise ClipCapError(f"{where}: {what} {i} has {type(value).__name__} {value!r:.40} as image id; a store's "
                               "image ids are all integers or all text")
        first.setdefault(kind, i)
        if len(first) == 2:
            j = first["int" if kind == "str" else "str"]
            raise ClipCapError(f"{where}: image ids must be all integers or all text: {what} {j} has "
                               f"{type(ids[j]).__name__} {ids[j]!r:.40}, "
                               f"{what} {i} {type(value).__name__} {value!r:.40}")
    if not ids:
        return pa.array([], pa.null())
    if "str" in first:
        return pa.array(ids, pa.string())
    ints = [int(value) for value in ids]
    huge = next((i for i, value in enumerate(ints) if not -2**63 <= value < 2**63), None)
    if huge is not None:
        raise ClipCapError(f"{where}: {what} {huge} has image id {ints[huge]}, beyond 64-bit integers")
    return pa.array(ints, pa.int64())



def _done(base: Path) -> bool:
    return base.with_name(base.name + ".npy").is_file() and base.with_name(base.name + ".parquet").is_file()


def shard_done(store: str | Path, name: str) -> bool:
    return _done(Path(store) / SHARD_DIR / name)


def piece_done(store: str | Path, shard: str, piece: str) -> bool:
    return _done(Path(store) / PIECE_DIR / shard / piece)


def write_shard(store: str | Path, name: str, embeddings: np.ndarray, captions: Sequence[str],
                image_ids: Sequence[Any], rows: Sequence[int], skipped: Sequence[tuple[str, str]] = (),
                written_by: str = "") -> None:
    """One finished shard: embeddings [n, D] (stored float16), captions pointing at local rows, the
    (path, reason) of each image skipped, and who wrote it (``rank 1/4``). The index is written
    last: it marks the shard done."""
    _write(Path(store) / SHARD_DIR / name, embeddings, captions, image_ids, rows, skipped, written_by)


def write_piece(store: str | Path, shard: str, piece: str, embeddings: np.ndarray, captions: Sequence[str],
                image_ids: Sequence[Any], rows: Sequence[int], skipped: Sequence[tuple[str, str]] = (),
                written_by: str = "") -> None:
    """One finished piece of a shard (a relative name, ``piece``), as :func:`write_shard` writes a shard."""
    _write(Path(store) / PIECE_DIR / shard / piece, embeddings, captions, image_ids, rows, skipped, written_by)


def _write(base: Path, embeddings: np.ndarray, captions: Sequence[str], image_ids: Sequence[Any],
           rows: Sequence[int], skipped: Sequence[tuple[str, str]], written_by: str) -> None:
    with atomic_write(base.with_name(base.name + ".npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(embeddings, dtype=np.float16))
    table = pa.table({"caption": pa.array(list(captions), pa.string()),
                      "image_id": image_id_column(image_ids, base), "row": pa.array(list(rows), pa.int64())})
    table = table.replace_schema_metadata({"clipcap.skipped": json.dumps([list(s) for s in skipped]),
                                           "clipcap.written_by": written_by})
    with atomic_write(base.with_name(base.name + ".parquet")) as tmp:
        pq.write_table(table, tmp)


def join_pieces(store: str | Path, shard: str, pieces: Sequence[str]) -> None:
    """Write shard ``shard`` from its finished ``pieces``, in that order, then delete its pieces."""
    store = Path(store)
    folder = store / PIECE_DIR / shard
    missing = [piece for piece in pieces if not piece_done(store, shard, piece)]
    if missing:
        raise ClipCapError(f"{store}: shard {shard} has {len(missing)} unfinished pieces ({', '.join(missing[:3])}); "
                           "run the extraction again to finish them")
    embeddings, captions, image_ids, rows, skipped, writers = [], [], [], [], [], []
    for piece in pieces:
        table = pq.read_table(folder / f"{piece}.parquet")
        rows += (table.column("row").to_numpy() + sum(len(e) for e in embeddings)).tolist()
        embeddings.append(np.load(folder / f"{piece}.npy", allow_pickle=False))
        captions += table.column("caption").to_pylist()
        image_ids += table.column("image_id").to_pylist()
        skipped += json.loads(table.schema.metadata[b"clipcap.skipped"])
        writers.append(table.schema.metadata[b"clipcap.written_by"].decode())
    write_shard(store, shard, np.concatenate(embeddings), captions, image_ids, rows, skipped,
                ", ".join(dict.fromkeys(w for w in writers if w)))
    shutil.rmtree(folder)


def merge(store: str | Path, names: Sequence[str], meta: dict[str, Any] | None = None) -> int:
    """Join finished shards, in the order given, into the store's index; returns the number skipped."""
    store = Path(store)
    missing = [n for n in names if not shard_done(store, n)]
    if missing:
        raise ClipCapError(f"{store}: {len(missing)} shards are unfinished ({', '.join(missing[:3])}...); "
                           "run the extraction again to finish them")
    tables, skipped, start = [], [], 0
    for name in names:
        table = pq.read_table(store / SHARD_DIR / f"{name}.parquet")
        tables.append(pa.table({"caption": table.column("caption"), "image_id": table.column("image_id"),
                                "image_index": pc.add(table.column("row"), start)}))
        skipped += json.loads(table.schema.metadata[b"clipcap.skipped"])
        start += _npy_layout(store / SHARD_DIR / f"{name}.npy")[0][0]
    kinds = {}
    for name, table in zip(names, tables):
        if not pa.types.is_null(table.schema.field("image_id").type):
            kinds.setdefault(str(table.schema.field("image_id").type), name)
    if len(kinds) > 1:
        (kind_a, a), (kind_b, b) = list(kinds.items())[:2]
        raise ClipCapError(f"{store}: shard {a} has {kind_a} image ids, shard {b} {kind_b}; a store's image ids are "
                           "all integers or all text")
    index = pa.concat_tables(tables, promote_options="default") if tables else None
    _finish(store, names, index, skipped, meta)
    shutil.rmtree(store / PIECE_DIR, ignore_errors=True)  # what a run killed between joining and deleting left
    return len(skipped)


def _finish(store: Path, names: Sequence[str], index: pa.Table | None, skipped: Sequence[Sequence[str]],
            meta: dict[str, Any] | None) -> None:
    """Write ``captions.parquet``, ``skipped.tsv`` and, last, ``store.json``: a store is loadable
    only once everything it lists is on disk."""
    if index is None:
        index = pa.table({"caption": pa.array([], pa.string()), "image_id": pa.array([], pa.int64()),
                          "image_index": pa.array([], pa.int64())})
    with atomic_write(store / INDEX_FILE) as tmp:
        pq.write_table(index, tmp)
    with atomic_write(store / SKIPPED_FILE) as tmp:
        tmp.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
    shapes = [_npy_layout(store / SHARD_DIR / f"{name}.npy")[0] for name in names]
    meta = {"format": FORMAT, "version": VERSION, **(meta or {}), "dim": int(shapes[0][1]) if shapes else 0,
            "num_images": sum(int(rows) for rows, _ in shapes), "num_captions": index.num_rows,
            "num_skipped": len(skipped), "shards": [{"name": n, "rows": int(rows)} for n, (rows, _) in zip(names, shapes)]}
    write_json(store / STORE_FILE, meta)


def write(features: FeatureSet, store: str | Path, shard_rows: int = 100_000, **meta: Any) -> Path:
    """Write a FeatureSet as a store, ``shard_rows`` embedding rows per shard, captions in their order."""
    store = Path(store)
    if (store / STORE_FILE).exists():
        raise ClipCapError(f"{store}: a feature store is already there")
    n = int(features.embeddings.shape[0])
    if n == 0:
        raise ClipCapError(f"{store}: no embeddings to write")
    image_ids = image_id_column(features.image_ids, store)
    image_index = np.asarray(features.image_index, dtype=np.int64)
    shard_of = image_index // shard_rows
    names = []
    for k, start in enumerate(range(0, n, shard_rows)):
        chosen = np.flatnonzero(shard_of == k)
        embeddings = features.embeddings[start:start + shard_rows]
        embeddings = embeddings.cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        names.append(f"{k:05d}")
        write_shard(store, names[-1], embeddings, [features.captions[i] for i in chosen],
                    [features.image_ids[i] for i in chosen], image_index[chosen] - start)
    index = pa.table({"caption": pa.array(list(features.captions), pa.string()), "image_id": image_ids,
                      "image_index": pa.array(image_index)})
    if features.clip_model is not None:
        meta.setdefault("clip_model", features.clip_model)
    if features.modality != "image":
        meta.setdefault("modality", features.modality)
    _finish(store, names, index, [], meta)
    return store


def to_pickle(store: str | Path, path: str | Path) -> None:
    """A store as the original's pickle (all embeddings loaded: meant for stores that fit in RAM)."""
    save_original_pickle(load_store(store), path)


def from_pickle(path: str | Path, store: str | Path) -> Path:
    """The original's pickle (loaded without running code) as a store."""
    return write(load_original_pickle(path), store, source=str(path))
