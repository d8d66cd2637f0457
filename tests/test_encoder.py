"""Image decoding, OpenAI's preprocessing and the CLIP image encoder."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from transformers import CLIPImageProcessorPil, CLIPModel

from clipcap.encoder import Preprocess, _to_rgb, load_image, load_image_encoder
from clipcap.extraction import ImageItem
from clipcap.files import ClipCapError

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


def float64_conversion(image: Image.Image) -> np.ndarray:
    """How 16-bit and float images were turned to 8 bits at first (float64 copies): the pixels to keep."""
    values = np.asarray(image, dtype=np.float64)
    values = values * 255 if image.mode == "F" else values / 257
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def high_depth_image(mode: str) -> Image.Image:
    """Every 16-bit value (256x256), or for I and F values around and beyond the range, and every rounding edge."""
    if mode.startswith("I;16"):
        values = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
        return Image.frombytes(mode, (256, 256), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    rng = np.random.default_rng(0)
    if mode == "I":
        edges = (257 * np.arange(256) + 128)[:, None] + np.arange(-2, 3)
        values = np.concatenate([rng.integers(-2**31, 2**31, 4000), rng.integers(-70000, 140000, 4000), edges.ravel()])
        return Image.fromarray(np.resize(values, (80, 116)).astype(np.int32))
    edges = (np.arange(256)[:, None] + np.array([0.499, 0.5, 0.501])) / 255
    values = np.concatenate([rng.uniform(-0.5, 1.5, 5000), edges.ravel(), [0, 1, -np.inf, np.inf, 1e30]])
    return Image.fromarray(np.resize(values, (100, 60)).astype(np.float32))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I", "F"])
def test_high_bit_depth_images_keep_their_pixels(mode):
    image = high_depth_image(mode)
    assert image.mode == mode
    expected = float64_conversion(image)
    rgb = _to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))


def test_a_16_bit_image_converts_without_float_copies():
    """A 16-bit PNG decodes small (~75 KB for 40 Mpx) but took ~20 bytes a pixel in float64 copies to convert."""
    width, height = 4000, 4000
    image = Image.fromarray(np.tile((np.arange(width) * 16).astype(np.uint16), (height, 1)))
    tracemalloc.start()
    try:
        rgb = _to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(rgb)[7, 1000].tolist() == [62] * 3  # (16000 + 128) // 257
    assert peak < width * height / 2  # Python and numpy memory: a band of rows at a time, never the whole image


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
    pixels = encoder.transform(images)
    assert pixels.shape == (2, 3, 32, 32) and encoder.dim == 16
    with torch.no_grad():
        expected = CLIPModel.from_pretrained(clip_dir).get_image_features(pixel_values=pixels).pooler_output
    embeddings = encoder.encode(pixels)
    assert embeddings.shape == (2, 16) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings, expected, atol=1e-5)  # projected, not L2-normalised
    half = load_image_encoder(clip_dir, dtype=torch.bfloat16).encode(pixels)
    assert torch.allclose(half, expected, atol=0.1, rtol=0.05)


def test_unknown_encoders_are_clear_errors(tmp_path, offline_openai_clip):
    with pytest.raises(ClipCapError, match="not a CLIP checkpoint directory \\("):
        load_image_encoder(str(tmp_path))
    with pytest.raises(ClipCapError, match="someone/no-such-clip: .*not loadable from the Hugging Face Hub"):
        load_image_encoder("someone/no-such-clip")  # offline, as the tests are
    (tmp_path / "weights.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ClipCapError, match="weights.pt: not a TorchScript archive or state dict"):
        load_image_encoder(str(tmp_path / "weights.pt"))
    with pytest.raises(ClipCapError, match=r"cannot download .*/RN50x4.pt .*download it yourself and put it at"):
        load_image_encoder("RN50x4")


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
from clipcap.encoder import Preprocess, load_image
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
