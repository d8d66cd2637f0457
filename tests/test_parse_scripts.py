"""parse_coco.py and parse_conceptual.py on small datasets in every input layout they read."""
from __future__ import annotations

import csv
import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from clipcap import sources, store
from clipcap.cli.parse_conceptual import parse_args
from clipcap.data import load_features
from clipcap.encoder import load_image, load_image_encoder
from clipcap.featureset import load_original_pickle
from clipcap.sources import add_period, conceptual_shards

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]


def jpeg(name: str, size=(72, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(photos, name)()).resize(size).save(buffer, format="JPEG")
    return buffer.getvalue()


def run_script(script: str, *args, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(REPO / script), run_name="__main__")


def expected_embeddings(clip_dir, paths) -> torch.Tensor:
    """Each image encoded on its own, straight from the file: what the store must hold."""
    encoder = load_image_encoder(clip_dir)
    return encoder([load_image(p) for p in paths]).half().float()


def assert_rows_match(features, rows, expected):
    stored = features.embeddings_at(np.asarray(rows, dtype=np.int64))
    assert torch.allclose(stored, expected, rtol=2e-3, atol=2e-3)


@pytest.fixture
def coco(tmp_path):
    """Karpathy's dataset_coco.json over five photos (train, restval, train, test, test) and a corrupt file."""
    root = tmp_path / "coco"
    splits = ["train", "restval", "train", "test", "test"]
    images = []
    for i, (name, split) in enumerate(zip(PHOTOS, splits), start=1):
        folder = "train2014" if split != "test" else "val2014"
        path = root / folder / f"COCO_{folder}_{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(name))
        images.append({"filepath": folder, "filename": path.name, "cocoid": i, "split": split,
                       "sentences": [{"raw": f"{name} number {j}", "sentid": 10 * i + j} for j in range(5)]})
    (root / "train2014" / "COCO_train2014_000000000099.jpg").write_bytes(b"<html>not an image</html>")
    images.append({"filepath": "train2014", "filename": "COCO_train2014_000000000099.jpg", "cocoid": 99,
                   "split": "train", "sentences": [{"raw": "a broken file", "sentid": 990}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return root


def test_parse_coco_encodes_each_image_once_into_the_original_pickle(coco, clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "oscar_split_tiny_train.pkl"
    run_script("parse_coco.py", "--annotations", coco / "dataset_coco.json", "--images_root", coco,
               "--clip_model_type", clip_dir, "--out_path", out, "--shard_size", 2, "--num_workers", 1,
               monkeypatch=monkeypatch)
    features = load_original_pickle(out)
    assert features.embeddings.shape == (3, 16)  # train + restval images, each encoded once
    assert features.clip_model == str(clip_dir)  # the CLIP is recorded, for training to pass on
    assert sorted(features.captions) == sorted(f"{n} number {j}" for n in PHOTOS[:3] for j in range(5))
    rows = [features.image_index[features.captions.index(f"{n} number 0")] for n in PHOTOS[:3]]
    assert_rows_match(features, rows, expected_embeddings(
        clip_dir, [coco / "train2014" / f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)]))
    for image_id, caption, row in zip(features.image_ids, features.captions, features.image_index):
        assert row == rows[image_id - 1] and caption.startswith(PHOTOS[image_id - 1])
    report = (tmp_path / "oscar_split_tiny_train_skipped.tsv").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(f"{coco}/train2014/COCO_train2014_000000000099.jpg\t")
    assert "3 images, 15 captions; 1 images skipped" in capsys.readouterr().out
    assert not (tmp_path / "oscar_split_tiny_train.pkl.parts").exists()


def test_parse_coco_test_split_writes_store_and_references(coco, clip_dir, tmp_path, monkeypatch):
    out, refs = tmp_path / "test_store", tmp_path / "refs.json"
    run_script("parse_coco.py", "--annotations", coco / "dataset_coco.json", "--images_root", coco, "--split", "test",
               "--clip_model_type", clip_dir, "--out_path", out, "--references_path", refs, "--feature_store",
               "--num_workers", 0, monkeypatch=monkeypatch)
    features = load_features(out)
    assert len(features) == 10 and features.embeddings.shape == (2, 16) and features.clip_model == str(clip_dir)
    assert sorted(set(features.image_ids)) == [4, 5]
    references = json.loads(refs.read_text())
    assert references["images"] == [{"id": 4}, {"id": 5}]
    assert references["annotations"][0] == {"image_id": 4, "caption": "rocket number 0", "id": 40}
    assert len(references["annotations"]) == 10


def test_parse_coco_checks_and_writes_the_references_before_encoding(coco, clip_dir, tmp_path, monkeypatch, capsys):
    """A --references_path that cannot be written is refused before any work; the references need no
    features, so they are written first, and a run killed while writing them leaves nothing a rerun refuses."""
    out, refs = tmp_path / "test.pkl", tmp_path / "refs.json"
    args = ["--annotations", coco / "dataset_coco.json", "--images_root", coco, "--split", "test",
            "--clip_model_type", clip_dir, "--out_path", out, "--num_workers", 0]
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_script("parse_coco.py", *args, "--references_path", tmp_path / "folder", monkeypatch=monkeypatch)
    assert exit_.value.code == 2 and not out.exists() and not (tmp_path / "test.pkl.parts").exists()
    error = capsys.readouterr().err
    assert error == f"error: --references_path {tmp_path / 'folder'}: is a folder, expected a file name\n"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    write_json = sources.write_json
    monkeypatch.setattr(sources, "write_json", killed)
    with pytest.raises(SystemExit) as exit_:
        run_script("parse_coco.py", *args, "--references_path", refs, monkeypatch=monkeypatch)
    assert exit_.value.code == 130
    monkeypatch.setattr(sources, "write_json", write_json)
    run_script("parse_coco.py", *args, "--references_path", refs, monkeypatch=monkeypatch)
    assert json.loads(refs.read_text())["images"] == [{"id": 4}, {"id": 5}]
    assert sorted(set(load_original_pickle(out).image_ids)) == [4, 5]


def test_parse_coco_reads_the_original_annotations(coco, clip_dir, tmp_path, monkeypatch, capsys):
    # The original's train_caption.json: a list of captions; image 4 exists only under val2014/.
    annotations = [{"image_id": i, "id": 100 * i + j, "caption": f"caption {j} of {i}"} for i in (4, 1) for j in range(2)]
    (tmp_path / "train_caption.json").write_text(json.dumps(annotations))
    out = tmp_path / "train.pkl"
    run_script("parse_coco.py", "--annotations", tmp_path / "train_caption.json", "--images_root", coco,
               "--clip_model_type", clip_dir, "--out_path", out, "--num_workers", 0, monkeypatch=monkeypatch)
    features = load_original_pickle(out)
    assert features.captions == [a["caption"] for a in annotations] and features.image_ids == [4, 4, 1, 1]
    assert_rows_match(features, features.image_index[[0, 2]], expected_embeddings(
        clip_dir, [coco / "val2014" / "COCO_val2014_000000000004.jpg", coco / "train2014" / "COCO_train2014_000000000001.jpg"]))

    # Run again by mistake: the finished pickle is kept, not encoded over.
    before = out.stat().st_mtime_ns
    run_script("parse_coco.py", "--annotations", tmp_path / "train_caption.json", "--images_root", coco,
               "--clip_model_type", clip_dir, "--out_path", out, "--num_workers", 0, monkeypatch=monkeypatch)
    assert out.stat().st_mtime_ns == before
    assert f"{out}: kept as a finished run wrote it" in capsys.readouterr().out


def test_add_period_as_the_original():
    assert add_period("a dog on a bench") == "a dog on a bench."
    assert add_period("  a dog on a bench . ") == "a dog on a bench."
    assert add_period("a dog.") == "a dog."


CC_CAPTIONS = ["a man in a space suit ", "a cup of coffee .", "a cat", "a rocket launch", "deep space"]


def conceptual_layouts(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """The same five images (row 1 missing, row 3 truncated) in the three layouts parse_conceptual.py reads."""
    data = {row: jpeg(name) for row, name in enumerate(PHOTOS) if row != 1}
    data[3] = data[3][:200]
    tsv = root / "Validation_GCC-1.1.0-Validation.tsv"
    with open(tsv, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([c, f"http://example.com/{i}.jpg"] for i, c in enumerate(CC_CAPTIONS))
    original = root / "original" / "val"
    files = root / "files"
    webdataset = root / "webdataset"
    for folder in (original, files / "00000", files / "00001", webdataset):
        folder.mkdir(parents=True)
    for row, image in data.items():
        (original / f"{row:08d}.jpg").write_bytes(image)
        key = f"{row // 3:05d}{row % 3:04d}"  # img2dataset's key: shard then index, 3 per shard here
        (files / key[:5] / f"{key}.jpg").write_bytes(image)
        (files / key[:5] / f"{key}.txt").write_text(CC_CAPTIONS[row])
    for shard in ("00000", "00001"):
        with tarfile.open(webdataset / f"{shard}.tar", "w") as tar:
            for member in sorted((files / shard).iterdir()):
                tar.add(member, arcname=member.name)
    return {"original": (original, tsv), "files": (files, None), "webdataset": (webdataset, None)}


def test_parse_conceptual_reads_every_layout_alike(clip_dir, tmp_path, monkeypatch):
    layouts = conceptual_layouts(tmp_path)
    results = {}
    for layout, (images, tsv) in layouts.items():
        out = tmp_path / f"{layout}.pkl"
        run_script("parse_conceptual.py", "--split", "val", "--images", images, "--tsv", tsv or tmp_path / "none.tsv",
                   "--clip_model_type", clip_dir, "--out_path", out, "--num_workers", 0, monkeypatch=monkeypatch)
        results[layout] = load_original_pickle(out), (tmp_path / f"{layout}_skipped.tsv").read_text()
    for features, report in results.values():
        assert features.captions == ["a man in a space suit.", "a cat.", "deep space."]
        assert features.clip_model == str(clip_dir)
        assert_rows_match(features, features.image_index, expected_embeddings(
            clip_dir, [tmp_path / "original" / "val" / f"{row:08d}.jpg" for row in (0, 2, 4)]))
        assert "truncated" in report.lower()
    assert results["files"][0].image_ids == results["webdataset"][0].image_ids == ["000000000", "000000002", "000010001"]
    assert results["original"][0].image_ids == ["00000000", "00000002", "00000004"]
    assert "00000001.jpg\tnot downloaded" in results["original"][1]

    store = tmp_path / "webdataset_store"
    images, _ = layouts["webdataset"]
    run_script("parse_conceptual.py", "--split", "val", "--images", images, "--clip_model_type", clip_dir,
               "--out_path", store, "--feature_store", "--num_workers", 0, monkeypatch=monkeypatch)
    features = load_features(store)
    assert features.clip_model == str(clip_dir) and list(features.captions) == results["webdataset"][0].captions


def test_parse_conceptual_takes_the_original_command_line():
    """The original README's line: --num_threads (its download threads) sets the decoding workers."""
    args = parse_args(["--clip_model_type", "ViT-B/32", "--data_root", "/data/cc", "--num_threads", "16",
                       "--out_path", "cc.pkl"])
    assert (args.clip_model, args.data_root, args.num_workers, args.split, args.out) == \
        ("ViT-B/32", "/data/cc", 16, "both", "cc.pkl")
    assert parse_args([]).num_workers is None and parse_args([]).device == "auto"  # the defaults still apply


@pytest.fixture
def nocaps(tmp_path):
    """nocaps_val_4500_captions.json in small: four images (ids not in file order), one not downloaded,
    one without annotations."""
    folder = tmp_path / "nocaps" / "val"
    folder.mkdir(parents=True)
    ids = {"astronaut": 7, "coffee": 0, "rocket": 12, "chelsea": 5}
    images = [{"id": i, "file_name": f"{i:016x}.jpg", "open_images_id": f"{i:016x}", "domain": "near-domain",
               "coco_url": f"https://example.com/nocaps/val/{i:016x}.jpg", "height": 48, "width": 72}
              for i in ids.values()]
    for name, i in ids.items():
        if name != "rocket":
            (folder / f"{i:016x}.jpg").write_bytes(jpeg(name))
    annotations = [{"image_id": i, "caption": f"{name} caption {j}", "id": 10 * i + j}
                   for name, i in ids.items() if name != "chelsea" for j in range(10)]
    path = tmp_path / "nocaps" / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"licenses": [], "info": {}, "images": images, "annotations": annotations}))
    return path, folder


def test_parse_nocaps_keys_features_by_nocaps_id(nocaps, clip_dir, tmp_path, monkeypatch, capsys):
    annotations, folder = nocaps
    out = tmp_path / "nocaps.pkl"
    run_script("parse_nocaps.py", "--annotations", annotations, "--images", folder, "--clip_model", clip_dir,
               "--out", out, "--num_workers", 0, "--device", "cpu", monkeypatch=monkeypatch)  # the new spellings
    features = load_original_pickle(out)
    assert features.clip_model == str(clip_dir)
    assert features.image_ids == [7] * 10 + [0] * 10
    assert features.captions == [f"{name} caption {j}" for name in ("astronaut", "coffee") for j in range(10)]
    assert_rows_match(features, features.image_index[[0, 10]],
                      expected_embeddings(clip_dir, [folder / f"{7:016x}.jpg", folder / f"{0:016x}.jpg"]))
    report = (tmp_path / "nocaps_skipped.tsv").read_text().splitlines()
    assert sorted(report) == sorted([f"{folder / f'{12:016x}.jpg'}\tnot downloaded",
                                     f"{folder / f'{5:016x}.jpg'}\tno caption"])
    assert "2 images, 20 captions; 2 images skipped" in capsys.readouterr().out

    # By default, a store (or pickle) under ./data/nocaps named by the CLIP.
    monkeypatch.chdir(tmp_path)
    run_script("parse_nocaps.py", "--annotations", annotations, "--images", folder, "--clip_model_type", clip_dir,
               "--feature_store", "--num_workers", 0, monkeypatch=monkeypatch)
    store = load_features(tmp_path / "data" / "nocaps" / f"nocaps_val_{Path(clip_dir).name}")
    assert list(store.image_ids) == features.image_ids and store.clip_model == str(clip_dir)


def test_parse_nocaps_names_a_file_that_is_not_coco_format(coco, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_script("parse_nocaps.py", "--annotations", coco / "dataset_coco.json", "--images", coco,
                   monkeypatch=monkeypatch)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {coco / 'dataset_coco.json'}: expected a COCO-format "
                                               "captions file ('images' and 'annotations' lists)")

def test_killed_parse_coco_resumes_only_the_same_job(coco, clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "train.pkl"
    args = ["--annotations", coco / "dataset_coco.json", "--images_root", coco, "--clip_model_type", clip_dir,
            "--out_path", out, "--num_workers", 0]
    write_table = store.pq.write_table

    def killed_at_second_shard(table, where, **kwargs):
        if ".00001.parquet" in str(where):
            raise KeyboardInterrupt
        write_table(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", killed_at_second_shard)
    with pytest.raises(SystemExit) as exit_:
        run_script("parse_coco.py", *args, "--shard_size", 2, monkeypatch=monkeypatch)
    assert exit_.value.code == 130
    monkeypatch.setattr(store.pq, "write_table", write_table)
    capsys.readouterr()

    def refused(*more) -> str:
        with pytest.raises(SystemExit) as exit_:
            run_script("parse_coco.py", *args, *more, monkeypatch=monkeypatch)
        assert exit_.value.code == 2 and not out.exists()
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "rerun with the same arguments, or delete" in error
        return error

    assert "was started with shard_size 2, not 3; other images in shard 00000 and 1 more" in refused("--shard_size", 3)
    assert "was started with split 'train', not 'trainval'" in refused("--shard_size", 2, "--split", "trainval")
    original = (coco / "dataset_coco.json").read_text()
    (coco / "dataset_coco.json").write_text(original.replace("chelsea number 0", "an edited caption"))  # edited since
    assert "was started with other images in shard 00001" in refused("--shard_size", 2)
    (coco / "dataset_coco.json").write_text(original)

    run_script("parse_coco.py", *args, "--shard_size", 2, monkeypatch=monkeypatch)  # the same job: resumes
    features = load_original_pickle(out)
    assert sorted(set(features.image_ids)) == [1, 2, 3] and len(features) == 15
    assert "3 images, 15 captions; 1 images skipped" in capsys.readouterr().out


def parse_coco_with(coco, clip_dir, tmp_path, monkeypatch, edit) -> Path:
    """parse_coco.py on the fixture's train split after ``edit`` of its annotations; returns the pickle."""
    data = json.loads((coco / "dataset_coco.json").read_text())
    edit(data["images"])
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    run_script("parse_coco.py", "--annotations", tmp_path / "dataset.json", "--images_root", coco,
               "--clip_model_type", clip_dir, "--out_path", tmp_path / "train.pkl", "--num_workers", 0,
               monkeypatch=monkeypatch)
    return tmp_path / "train.pkl"


def test_parse_coco_drops_empty_captions(coco, clip_dir, tmp_path, monkeypatch, capsys):
    def empty_two(images):
        images[0]["sentences"][1]["raw"] = ""
        images[2]["sentences"][3]["raw"] = "  "

    features = load_original_pickle(parse_coco_with(coco, clip_dir, tmp_path, monkeypatch, empty_two))
    assert len(features) == 13 and all(c.strip() for c in features.captions)  # what train.py accepts
    assert f"{tmp_path / 'dataset.json'}: dropped 2 empty captions" in capsys.readouterr().out


def test_parse_coco_reports_a_missing_image_where_it_is_listed(coco, clip_dir, tmp_path, monkeypatch):
    def add_missing(images):
        images.append({"filepath": "train2014", "filename": "COCO_train2014_000000000077.jpg", "cocoid": 77,
                       "split": "train", "sentences": [{"raw": "never downloaded", "sentid": 770}]})

    parse_coco_with(coco, clip_dir, tmp_path, monkeypatch, add_missing)
    report = (tmp_path / "train_skipped.tsv").read_text()
    assert f"{coco}/train2014/COCO_train2014_000000000077.jpg\t" in report and "val2014" not in report


def test_webdataset_shards_are_fingerprinted_by_size_and_time(tmp_path):
    webdataset = conceptual_layouts(tmp_path)["webdataset"][0]
    before = [s.fingerprint for s in conceptual_shards(webdataset)]
    with tarfile.open(webdataset / "00001.tar", "a") as tar:
        tar.addfile(tarfile.TarInfo("extra.txt"), io.BytesIO())
    after = [s.fingerprint for s in conceptual_shards(webdataset)]
    assert after[0] == before[0] and after[1] != before[1]


def test_parse_conceptual_skips_fifos_instead_of_waiting_on_them(clip_dir, tmp_path):
    layouts = conceptual_layouts(tmp_path)
    files, webdataset = layouts["files"][0], layouts["webdataset"][0]
    (files / "00000" / "000000002.txt").unlink()
    os.mkfifo(files / "00000" / "000000002.txt")  # a caption nobody will ever write
    os.mkfifo(webdataset / "00002.tar")
    for stats in (webdataset / "00000_stats.json", files / "00001_stats.json"):  # img2dataset's, read for a count
        os.mkfifo(stats)
    for layout, images in (("files", files), ("webdataset", webdataset)):
        out = tmp_path / f"{layout}.pkl"
        run = subprocess.run([sys.executable, "parse_conceptual.py", "--split", "val", "--images", str(images),
                              "--clip_model_type", clip_dir, "--out_path", str(out), "--num_workers", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        report = (tmp_path / f"{layout}_skipped.tsv").read_text()
        assert "not a regular file (a FIFO)" in report, report
