"""Encoding datasets at scale: each image once, bad ones reported, resumable, split across torchrun ranks."""
from __future__ import annotations

import json
import os
import re
import runpy
import socket
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

from clipcap import extraction, files, locking, store
from clipcap.cli import parse_coco
from clipcap.cli.parse_captions import main as parse_captions
from clipcap.encoder import MAX_PIXELS, load_image, load_image_encoder
from clipcap.extraction import ImageItem, Shard, extract
from clipcap.files import ClipCapError
from clipcap.runtime import Processes
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


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_extraction_resumes_and_equals_an_uninterrupted_run(clip_dir, tmp_path, monkeypatch):
    paths, _ = odd_images(tmp_path / "images")
    shards = shards_of(paths, 3)  # two shards of three images; batches of one: three pieces each
    extract(shards, tmp_path / "whole", clip_dir, batch_size=1, num_workers=0)

    write_table, pieces_written = store.pq.write_table, []

    def killed_at_fourth_piece(table, where, **kwargs):
        if f"{os.sep}pieces{os.sep}" in str(where):
            pieces_written.append(where)
            if len(pieces_written) == 4:
                raise KeyboardInterrupt  # after the piece's .npy, before its index: the worst moment
        write_table(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", killed_at_fourth_piece)
    with pytest.raises(KeyboardInterrupt):
        extract(shards, tmp_path / "resumed", clip_dir, batch_size=1, num_workers=0)
    monkeypatch.setattr(store.pq, "write_table", write_table)
    assert not (tmp_path / "resumed" / "shards").exists() and not (tmp_path / "resumed.lock").exists()

    encoded = []
    encode_pieces = extraction._encode_pieces
    monkeypatch.setattr(extraction, "_encode_pieces", lambda shard, listing, mine, *a: (
        encoded.append((shard.name, mine)), encode_pieces(shard, listing, mine, *a)))
    extract(shards, tmp_path / "resumed", clip_dir, batch_size=1, num_workers=0)
    assert encoded == [("001", [0, 1, 2])]  # the finished pieces are kept
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")


class Rank(Processes):
    """Rank ``rank`` of ``world`` torchrun processes, run one after another in this process."""

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_ranks_share_out_pieces_of_every_shard_and_make_the_store_of_one_process(clip_dir, tmp_path, monkeypatch):
    """Four ranks, two shards: every rank gets work, each shard is split across ranks, and the store is
    one process's byte for byte (but for who wrote each shard), one rank killed and rerun on the way."""
    paths, _ = odd_images(tmp_path / "images")
    shards = shards_of(paths, 3)
    extract(shards, tmp_path / "one", clip_dir, batch_size=1, num_workers=0)

    encoded, encode_pieces = {}, extraction._encode_pieces

    def encode_and_note(shard, listing, mine, encoder, store_, batch_size, num_workers, max_pixels, progress, rank):
        if rank == "rank 1/4" and rank not in encoded:
            encoded[rank] = []
            raise KeyboardInterrupt  # killed before its first piece
        encoded.setdefault(rank, []).append((shard.name, mine))
        encode_pieces(shard, listing, mine, encoder, store_, batch_size, num_workers, max_pixels, progress, rank)

    monkeypatch.setattr(extraction, "_encode_pieces", encode_and_note)
    for rank in (3, 2, 1, 1, 0):  # rank 0 last: it joins the pieces and writes the index
        monkeypatch.setattr(extraction, "start_processes", lambda *args, **kwargs: Rank(rank, 4))
        try:
            result = extract(shards, tmp_path / "four", clip_dir, batch_size=1, num_workers=0)
        except KeyboardInterrupt:
            continue
        assert (result is None) == (rank != 0)
    assert encoded == {"rank 3/4": [("001", [0])], "rank 2/4": [("000", [2])], "rank 1/4": [("000", [1]), ("001", [2])],
                       "rank 0/4": [("000", [0]), ("001", [1])]}
    one, four = files_of(tmp_path / "one"), files_of(tmp_path / "four")
    assert sorted(one) == sorted(four)
    for name in ("000", "001"):
        path = f"shards/{name}.parquet"
        assert pq.read_table(tmp_path / "four" / path).equals(pq.read_table(tmp_path / "one" / path))
        assert pq.read_schema(tmp_path / "one" / path).metadata[b"clipcap.written_by"] == b"rank 0/1"
        del one[path], four[path]
    assert pq.read_schema(tmp_path / "four" / "shards" / "000.parquet").metadata[b"clipcap.written_by"] == \
        b"rank 0/4, rank 1/4, rank 2/4"
    assert one == four


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
    for i, path in enumerate(paths):  # img2dataset's files layout, one shard per folder: here one shard
        folder = tmp_path / "cc" / "00000"
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
    assert len(one) == 6 and list(one.captions) == list(two.captions) and list(one.image_ids) == list(two.image_ids)
    for name in ("captions.parquet", "skipped.tsv", "shards/00000.npy"):  # byte for byte
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    writers = [pq.read_schema(p).metadata[b"clipcap.written_by"]
               for p in (tmp_path / "two" / "shards").glob("*.parquet")]
    assert writers == [b"rank 0/2, rank 1/2"]  # one shard, and both processes encoded pieces of it


def test_extraction_removes_what_killed_runs_left(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    stale = tmp_path / "store" / "shards" / f".000.npy.abc.pid{dead_pid()}-{files._host()}.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    extract(shards_of(paths[:2], 1), tmp_path / "store", clip_dir, num_workers=0)
    assert not stale.exists() and len(load_store(tmp_path / "store")) == 4


def test_a_clip_that_does_not_load_fails_before_the_job_is_recorded(clip_dir, tmp_path):
    """So that the rerun with the right CLIP is not refused as another job's continuation."""
    paths, _ = odd_images(tmp_path / "images")
    with pytest.raises(ClipCapError, match="no_clip"):
        extract(shards_of(paths[:2], 1), tmp_path / "store", str(tmp_path / "no_clip"), num_workers=0)
    assert not (tmp_path / "store" / extraction.JOB_FILE).exists()
    extract(shards_of(paths[:2], 1), tmp_path / "store", clip_dir, num_workers=0)
    assert len(load_store(tmp_path / "store")) == 4


def test_a_second_writer_is_refused_and_a_dead_writers_lock_taken_over(clip_dir, tmp_path, capsys):
    paths, _ = odd_images(tmp_path / "images")
    out = tmp_path / "store"
    with locking.exclusive(out):  # a job writing the store (another open of the lock file: as another process)
        with pytest.raises(ClipCapError) as error:
            extract(shards_of(paths[:2], 1), out, clip_dir, num_workers=0)
        assert not out.exists()  # refused before writing anything
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{out}: pid {os.getpid()} on {socket.gethostname()} (")
    assert message.endswith(f"is writing it (lock {out}.lock); wait for it to finish, or stop it")

    lock, dead = tmp_path / "store.lock", dead_pid()  # left by a killed job
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "parse_coco.py",
                                "since": "2024-01-01 00:00:00"}))
    extract(shards_of(paths[:2], 1), out, clip_dir, num_workers=0)
    assert f"{lock}: taking over the lock of pid {dead} on {socket.gethostname()} (parse_coco.py, since 2024-01-01 " \
        "00:00:00), which is no longer running" in capsys.readouterr().out
    assert len(load_store(out)) == 4 and not lock.exists()


def test_a_rerun_completes_what_a_concurrent_or_killed_run_left(clip_dir, tmp_path):
    """A shard's .npy gone (deleted by a concurrent run's cleanup): the rerun encodes that shard again."""
    paths, _ = odd_images(tmp_path / "images")
    shards = shards_of(paths, 2)
    extract(shards, tmp_path / "whole", clip_dir, num_workers=0)
    extract(shards, tmp_path / "store", clip_dir, num_workers=0)
    (tmp_path / "store" / "shards" / "001.npy").unlink()
    (tmp_path / "store" / "store.json").unlink()
    extract(shards, tmp_path / "store", clip_dir, num_workers=0)
    assert files_of(tmp_path / "store") == files_of(tmp_path / "whole")


def test_pointless_options_are_refused_before_any_work(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    for option, message in [({"max_pixels": 0}, "--max_pixels 0: must be at least 1 (every image would be skipped)"),
                            ({"max_pixels": -5}, "--max_pixels -5: must be at least 1"),
                            ({"num_workers": -1}, "--num_workers -1: must be 0 (decode in the main process) or more"),
                            ({"batch_size": 0}, "--batch_size 0: must be at least 1")]:
        with pytest.raises(ClipCapError, match=re.escape(message)):
            extract(shards_of(paths, 2), tmp_path / "store", clip_dir, **option)
        assert not (tmp_path / "store").exists()
    (tmp_path / "images" / "captions.csv").write_text(f"file_name,text\n{paths[0].name},a photo\n")
    with pytest.raises(ClipCapError, match=re.escape("--max_pixels 0: must be at least 1")):  # from the command too
        parse_captions([str(tmp_path / "images" / "captions.csv"), "--clip_model", clip_dir, "--max_pixels", "0",
                        "--out", str(tmp_path / "features.pkl")])
    assert not (tmp_path / "features.pkl.parts").exists()


def test_a_rerun_of_parse_coco_writes_the_references_a_crash_lost(clip_dir, tmp_path, monkeypatch, capsys):
    """Killed while writing its references (written first, before any encoding): the rerun writes both; a rerun of a
    finished run keeps its pickle."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    images = []
    for i in (1, 2):
        save(photo(), root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": "test",
                       "sentences": [{"raw": f"photo {i} caption {j}", "sentid": 10 * i + j} for j in range(2)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    out, references = tmp_path / "test.pkl", tmp_path / "references.json"
    args = ["--annotations", str(root / "dataset_coco.json"), "--images_root", str(root), "--split", "test",
            "--clip_model", clip_dir, "--out", str(out), "--references_path", str(references), "--num_workers", "0"]

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(parse_coco, "write_coco_references", killed)
    with pytest.raises(KeyboardInterrupt):
        parse_coco.main(args)
    monkeypatch.undo()
    assert not out.exists() and not references.exists()
    parse_coco.main(args)
    assert json.loads(references.read_text())["images"] == [{"id": 1}, {"id": 2}]
    written = out.stat().st_mtime_ns
    parse_coco.main(args)
    assert out.stat().st_mtime_ns == written
    assert f"{out}: kept as a finished run wrote it (delete it to encode the images again)" in capsys.readouterr().out
    with pytest.raises(ClipCapError, match=re.escape(f"{out}: was made with max_pixels {MAX_PIXELS}, not 1000000; "
                                                     f"rerun with the same arguments, or delete {out} to encode")):
        parse_coco.main([*args, "--max_pixels", "1000000"])  # another job: the finished pickle is not kept for it
    assert out.stat().st_mtime_ns == written


def test_image_ids_a_store_cannot_hold_are_refused_before_their_shard_is_encoded(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    shards = shards_of(paths[:4], 2)
    items = shards[1].list_items()[0]
    items[1].image_id = "three"  # one shard with ids of both kinds
    with pytest.raises(ClipCapError, match="shard 001: image ids must be all integers or all text: image 0 has int 2, "
                                           "image 1 str 'three'"):
        extract(shards, tmp_path / "store", clip_dir, num_workers=0)
    items[0].image_id = "two"  # two shards, each of one kind
    with pytest.raises(ClipCapError, match="shard 000 has int64 image ids, shard 001 string; a store's image ids are "
                                           "all integers or all text"):
        extract(shards, tmp_path / "store", clip_dir, num_workers=0)
    assert not (tmp_path / "store" / "pieces" / "001").exists()  # refused before encoding it
