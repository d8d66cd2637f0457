"""Image decoding, OpenAI's preprocessing and the CLIP image encoder."""
from __future__ import annotations

import io
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
from skimage import data as photos
from transformers import CLIPImageProcessorPil, CLIPModel

from clipcap import features as features_module
from clipcap import files, store
from clipcap.features import ImageItem, Preprocess, Shard, extract, load_image, load_image_encoder
from clipcap.files import ClipCapError
from clipcap.store import load_store

from test_files import dead_pid

REPO = Path(__file__).resolve().parents[1]


def openai_processor(**overrides) -> CLIPImageProcessorPil:
    """transformers' PIL implementation of the ViT-B/32 processor: an independent reference."""
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, **overrides)


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea", "camera", "hubble_deep_field"])
def test_preprocessing_matches_reference_on_real_photos(photo):
    image = Image.fromarray(getattr(photos, photo)()).convert("RGB")
    expected = openai_processor()(image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(Preprocess()([image]), expected, atol=1e-5)


def test_centre_crop_rounds_like_torchvision():
    # rocket is 640x427 -> 335x224: 111 spare columns. torchvision's CenterCrop (which OpenAI
    # uses) starts at round(55.5) = 56; transformers' processor starts at 111 // 2 = 55.
    image = Image.fromarray(photos.rocket())
    resized = openai_processor(do_center_crop=False)(image, return_tensors="pt")["pixel_values"]
    assert resized.shape[-2:] == (224, 335)
    assert torch.allclose(Preprocess()([image]), resized[..., 56:56 + 224], atol=1e-5)


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def photo(size=(64, 48)) -> Image.Image:
    return Image.fromarray(photos.astronaut()).resize(size)


def test_load_image_decodes_every_mode_to_rgb(tmp_path):
    rgb = photo()
    gray16 = Image.fromarray(np.full((20, 30), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    cases = {
        "cmyk.jpg": save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95),
        "gray.png": save(rgb.convert("L"), tmp_path / "gray.png"),
        "rgba.png": save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
        "palette.png": save(rgb.convert("P"), tmp_path / "palette.png"),
        "gray16.png": save(gray16, tmp_path / "gray16.png"),
        "anim.gif": save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:]),
    }
    for name, path in cases.items():
        image = load_image(path)
        assert image.mode == "RGB", name
    assert np.asarray(load_image(cases["gray16.png"])).min() == 128  # scaled, not clipped to white
    assert tuple(np.asarray(load_image(cases["anim.gif"]))[0, 0]) == (255, 0, 0)  # first frame
    assert np.array_equal(np.asarray(load_image(cases["rgba.png"])), np.asarray(rgb))
    cmyk = np.asarray(load_image(cases["cmyk.jpg"]), dtype=float)
    assert np.abs(cmyk - np.asarray(rgb, dtype=float)).mean() < 10  # colours survive the CMYK round trip


def test_load_image_reads_file_objects():
    buffer = io.BytesIO()
    photo().save(buffer, format="JPEG")
    buffer.seek(0)
    assert load_image(buffer, name="member.jpg").size == (64, 48)


def test_bad_images_raise_one_clear_error(tmp_path):
    jpeg = save(photo(), tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"<html>404 not found</html>")
    save(Image.new("L", (4000, 3000)), tmp_path / "huge.png")  # 12 Mpx of zeros: a few kB on disk
    for name, reason in [("truncated.jpg", "truncated"), ("empty.jpg", "unreadable"), ("text.jpg", "unreadable"),
                         ("missing.jpg", "No such file"), ("huge.png", "pixel limit")]:
        with pytest.raises(ClipCapError, match=reason) as e:
            load_image(tmp_path / name, max_pixels=10_000_000)
        assert str(e.value).startswith(str(tmp_path / name))


def test_encoder_gives_clip_image_features(clip_dir):
    encoder = load_image_encoder(clip_dir)
    images = [photo((50, 40)), photo((30, 90)).convert("L").convert("RGB")]
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32) and encoder.dim == 16
    with torch.no_grad():
        expected = CLIPModel.from_pretrained(clip_dir).get_image_features(pixel_values=pixels).pooler_output
    embeddings = encoder.encode(pixels)
    assert embeddings.shape == (2, 16) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings, expected, atol=1e-5)  # projected, not L2-normalised
    half = load_image_encoder(clip_dir, dtype=torch.bfloat16).encode(pixels)
    assert torch.allclose(half, expected, atol=0.1, rtol=0.05)


def test_unknown_encoders_are_clear_errors(tmp_path, offline_openai_clip):
    with pytest.raises(ClipCapError, match="not a CLIP checkpoint"):
        load_image_encoder(str(tmp_path))
    (tmp_path / "weights.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ClipCapError, match="weights.pt: not a TorchScript archive or state dict"):
        load_image_encoder(str(tmp_path / "weights.pt"))
    with pytest.raises(ClipCapError, match=r"cannot download .*/RN50x4.pt .*download it yourself and put it at"):
        load_image_encoder("RN50x4")


# --------------------------------------------------------------------------- the extraction pipeline


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
    stored = torch.stack([features.embedding(int(r)) for r in rows])
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
    encode_shard = features_module._encode_shard
    monkeypatch.setattr(features_module, "_encode_shard", lambda shard, *a: (encoded.append(shard.name),
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


# --------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (300, 300), (1000, 250), (250, 1000), (1791, 224),
                                  (1600, 200), (200, 1600), (50, 30)])
def test_ordinary_aspect_ratios_are_resized_whole_as_torchvision(size):
    # Up to MAX_RESIZE_RATIO crops wide the image is resized whole: bit for bit the reference.
    image = Image.fromarray(photos.astronaut()).resize(size)
    resized = openai_processor(do_center_crop=False, do_normalize=False, do_rescale=False)(
        image, return_tensors="pt")["pixel_values"][0]
    top, left = (int(round((n - 224) / 2.0)) for n in resized.shape[-2:])
    assert torch.equal(Preprocess().crop(image), resized[:, top:top + 224, left:left + 224].round().to(torch.uint8))


@pytest.mark.parametrize("size", [(3000, 150), (150, 3000)])
def test_elongated_images_resize_only_the_span_the_crop_keeps(size):
    image = Image.fromarray(photos.astronaut()).resize(size)
    resized = openai_processor(do_center_crop=False, do_normalize=False, do_rescale=False)(
        image, return_tensors="pt")["pixel_values"][0]
    top, left = (int(round((n - 224) / 2.0)) for n in resized.shape[-2:])
    expected = resized[:, top:top + 224, left:left + 224]
    assert (Preprocess().crop(image).float() - expected).abs().max() <= 2  # the same pixels, resampled alike


def test_a_tiny_very_wide_image_takes_little_memory(tmp_path):
    # 65000x1 PNG (a few hundred bytes): resized whole to 224 px high it would need over 10 GB.
    Image.new("RGB", (65000, 1), (200, 10, 10)).save(tmp_path / "wide.png")
    assert (tmp_path / "wide.png").stat().st_size < 1000
    script = f"""
import resource
from clipcap.features import Preprocess, load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))  # a blow-up fails here, not the machine
pixels = Preprocess().crop(load_image({str(tmp_path / "wide.png")!r}))
assert tuple(pixels.shape) == (3, 224, 224) and pixels[:, 100, 100].tolist() == [200, 10, 10], pixels.shape
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout) < 200  # MB more than the imports took


class unblock_after:
    """Open ``fifo`` for writing after ``seconds``, so that a reader stuck on it returns: a hang becomes a failure."""

    def __init__(self, fifo, seconds=30):
        import threading
        self.timer = threading.Timer(seconds, lambda: os.close(os.open(fifo, os.O_WRONLY)))
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with unblock_after(fifo), pytest.raises(ClipCapError, match=r"x\.jpg: not a regular file \(a FIFO\)"):
        load_image(fifo)
    with unblock_after(fifo), pytest.raises(ClipCapError, match="not a regular file"):
        ImageItem(0, ["a caption"], str(fifo)).open()
    with pytest.raises(ClipCapError, match="not a regular file"):
        load_image(tmp_path)


def test_extraction_removes_what_killed_runs_left(clip_dir, tmp_path):
    paths, _ = odd_images(tmp_path / "images")
    stale = tmp_path / "store" / "shards" / f".000.npy.abc.pid{dead_pid()}-{files._host()}.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a shard")
    extract(shards_of(paths[:2], 1), tmp_path / "store", clip_dir, num_workers=0)
    assert not stale.exists() and len(load_store(tmp_path / "store")) == 4
