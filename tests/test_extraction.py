"""Encoding datasets at scale: each image once, bad ones reported, resumable, split across torchrun ranks."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_encoder import photo, save
from test_files import dead_pid

from clipcap import extraction, files, store
from clipcap.encoder import load_image, load_image_encoder
from clipcap.extraction import ImageItem, Shard, extract
from clipcap.files import ClipCapError
from clipcap.store import load_store

REPO = Path(__file__).resolve().parents[1]


def odd_images(folder) -> tuple[list, list]:
    """Images that must be encoded, and images that must be skipped, of every awkward kind."""
    folder.mkdir()
    rgb = photo()
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    good = [save(rgb, folder / "plain.jpg"), save(rgb.convert("CMYK"), folder / "cmyk.jpg"),
            save(Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)), folder / "gray16.png"),
            save(rgb.convert("L"), folder / "gray.png"), save(rgb.convert("RGBA"), folder / "rgba.png"),
            save(frames[0], folder / "anim.gif", save_all=True, append_images=frames[1:])]
    jpeg = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    save(Image.new("RGB", (3000, 2000)), folder / "huge.png")
    bad = [folder / "truncated.jpg", folder / "empty.jpg", folder / "huge.png", folder / "missing.jpg"]
    return good, bad


def shards_of(paths, size):
    items = [ImageItem(i, [f"image {i} caption {j}" for j in range(2)], str(p)) for i, p in enumerate(paths)]
    parts = [items[start:start + size] for start in range(0, len(items), size)]
    return [Shard(f"{k:03d}", lambda part=part: (part, []), len(part)) for k, part in enumerate(parts)]


def test_extraction_encodes_odd_images_and_reports_bad_ones(clip_dir, tmp_path):
    good, bad = odd_images(tmp_path / "images")
    paths = [p for pair in zip(good, bad + bad[:2]) for p in pair]  # bad images in every batch
    assert extract(shards_of(paths, 5), tmp_path / "store", clip_dir, batch_size=3, num_workers=2,
                   max_pixels=5_000_000) == len(bad) + 2
    features = load_store(tmp_path / "store")
    assert features.embeddings.shape == (len(good), 16) and len(features) == 2 * len(good)
    assert sorted({paths[i] for i in features.image_ids}) == sorted(good)
    encoder = load_image_encoder(clip_dir)
    rows = [features.image_index[list(features.image_ids).index(paths.index(p))] for p in good]
    expected = encoder([load_image(p) for p in good]).half().float()
    stored = features.embeddings_at(np.asarray(rows, dtype=np.int64))
    assert torch.allclose(stored, expected, rtol=2e-3, atol=2e-3)
    assert (stored.abs().sum(dim=1) > 0).all()  # never the original's all-zero stand-in
    report = [line.split("\t") for line in (tmp_path / "store" / "skipped.tsv").read_text().splitlines()]
    reasons = {Path(path).name: reason for path, reason in report}
    assert len(report) == len(bad) + 2 and set(reasons) == {p.name for p in bad}
    assert "pixel limit" in reasons["huge.png"] and "No such file" in reasons["missing.jpg"]


def test_killed_extraction_resumes_and_equals_an_uninterrupted_run(clip_dir, tmp_path, monkeypatch):
    paths, _ = odd_images(tmp_path / "images")
    extract(shards_of(paths, 2), tmp_path / "whole", clip_dir, batch_size=2, num_workers=0)

    write_table = store.pq.write_table

    def killed_while_writing_second_shard(table, where, **kwargs):
        if ".001.parquet" in str(where):
            raise KeyboardInterrupt  # after the shard's .npy, before its index: the worst moment
        write_table(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", killed_while_writing_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract(shards_of(paths, 2), tmp_path / "resumed", clip_dir, batch_size=2, num_workers=0)
    monkeypatch.setattr(store.pq, "write_table", write_table)
    assert sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir()) == ["000.npy", "000.parquet", "001.npy"]

    encoded = []
    encode_shard = extraction._encode_shard
    monkeypatch.setattr(extraction, "_encode_shard", lambda shard, *a: (encoded.append(shard.name),
                                                                              encode_shard(shard, *a)))
    extract(shards_of(paths, 2), tmp_path / "resumed", clip_dir, batch_size=2, num_workers=0)
    assert encoded == ["001", "002"]  # the finished shard is kept
    for name in ["captions.parquet", *(f"shards/{s}.npy" for s in ("000", "001", "002"))]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_resuming_another_job_is_refused_naming_what_differs(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    shards = shards_of(paths[:2], 1)
    extract(shards, tmp_path / "store", clip_dir, num_workers=0)
    with pytest.raises(ClipCapError, match="was started with CLIP .*, not ViT-L/14; rerun with the same arguments, "
                                           "or delete .*store to start over"):  # refused before any download
        extract(shards, tmp_path / "store", "ViT-L/14", num_workers=0)
    with pytest.raises(ClipCapError, match="dtype 'float32', not 'bfloat16'"):
        extract(shards, tmp_path / "store", clip_dir, num_workers=0, dtype=torch.bfloat16)
    with pytest.raises(ClipCapError, match="max_pixels"):
        extract(shards, tmp_path / "store", clip_dir, num_workers=0, max_pixels=1000)
    extract(shards, tmp_path / "store", clip_dir, num_workers=0)  # the same job: resumes (nothing left to do)


@pytest.mark.distributed
def test_torchrun_two_processes_give_the_features_of_one(clip_dir, tmp_path, monkeypatch):
    paths, _ = odd_images(tmp_path / "images")
    for i, path in enumerate(paths):  # img2dataset's files layout, one shard per folder
        folder = tmp_path / "cc" / f"{i // 2:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:09d}{path.suffix}").write_bytes(path.read_bytes())
        (folder / f"{i:09d}.txt").write_text(f"caption of image {i}")
    args = ["parse_conceptual.py", "--split", "val", "--images", tmp_path / "cc", "--clip_model_type", clip_dir,
            "--feature_store", "--num_workers", 0, "--batch_size", 2]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*torchrun, *map(str, args), "--out_path", str(tmp_path / "two")], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.setattr(sys, "argv", [*map(str, args), "--out_path", str(tmp_path / "one")])
    runpy.run_path(str(REPO / "parse_conceptual.py"), run_name="__main__")
    one, two = load_store(tmp_path / "one"), load_store(tmp_path / "two")
    assert list(one.captions) == list(two.captions) and list(one.image_ids) == list(two.image_ids)
    assert np.array_equal(one.image_index, two.image_index)
    assert np.allclose(np.asarray(one.embeddings, dtype=np.float32), np.asarray(two.embeddings, dtype=np.float32),
                       rtol=2e-3, atol=2e-3)
    writers = {pq.read_schema(p).metadata[b"clipcap.written_by"] for p in (tmp_path / "two" / "shards").glob("*.parquet")}
    assert writers == {b"rank 0/2", b"rank 1/2"}


def test_extraction_removes_what_killed_runs_left(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    stale = tmp_path / "store" / "shards" / f".000.npy.abc.pid{dead_pid()}-{files._host()}.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    extract(shards_of(paths[:2], 1), tmp_path / "store", clip_dir, num_workers=0)
    assert not stale.exists() and len(load_store(tmp_path / "store")) == 4
