"""The demo as the project's end-to-end learning check: drawn images -> CLIP features -> training ->
beam-search captions -> COCO metrics, on tiny random backbones, at a reduced size."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from clipcap.annotations import load_references
from clipcap.data import load_features
from clipcap.sources import coco_images, coco_items
from demo.shapes import (
    BACKGROUND,
    BASELINE,
    COLOURS,
    MODEL,
    SHAPES,
    SIZES,
    DemoConfig,
    draw_scene,
    make_shapes_dataset,
    real_backbones_cached,
    run,
)

CAPTION = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (left of|next to) "
                     rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\.")


def test_scene_captions_name_what_is_drawn():
    """Each half of the picture holds one shape of the colour, size and shape its captions name."""
    rng = random.Random(3)
    for _ in range(30):
        image, captions = draw_scene(rng)
        parsed = [CAPTION.fullmatch(c) for c in captions]
        assert all(parsed), captions
        assert parsed[0].group(1, 2, 3, 5, 6, 7) == parsed[1].group(1, 2, 3, 5, 6, 7)
        pixels = np.asarray(image)
        halves = (pixels[:, :image.width // 2], pixels[:, image.width // 2:])
        for half, (size, colour, shape) in zip(halves, (parsed[0].group(1, 2, 3), parsed[0].group(5, 6, 7))):
            drawn = (half != BACKGROUND).any(axis=2)
            assert (half[drawn] == COLOURS[colour]).all()
            rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
            width = cols[-1] - cols[0] + 1
            assert (width > 0.35 * image.width) == (size == "large")
            fill = drawn.sum() / (width * (rows[-1] - rows[0] + 1))  # square 1, circle pi/4, triangle 1/2
            assert {"square": fill > 0.95, "circle": 0.7 < fill < 0.85, "triangle": 0.4 < fill < 0.6}[shape], fill


def test_dataset_reads_like_karpathy_split_file(tmp_path):
    annotations = make_shapes_dataset(tmp_path, n_train=6, n_test=3, seed=1)
    train = coco_items(coco_images(annotations, "train"), annotations.parent)
    test = coco_items(coco_images(annotations, "test"), annotations.parent)
    assert [image.image_id for image in train] == list(range(6)) and [image.image_id for image in test] == [6, 7, 8]
    assert all(Path(image.path).is_file() and len(image.captions) == 2 for image in train + test)
    references = load_references(annotations, "test")
    assert list(references) == [6, 7, 8] and all(CAPTION.fullmatch(c) for refs in references.values() for c in refs)
    again = make_shapes_dataset(tmp_path / "again", n_train=6, n_test=3, seed=1)
    assert json.loads(again.read_text()) == json.loads(annotations.read_text())  # the seed fixes the dataset


def test_real_backbones_are_used_when_cached(tmp_path, monkeypatch):
    """The demo switches to CLIP ViT-B/32 and GPT-2 when both are in the Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert not real_backbones_cached()
    for repo, weights in (("openai/clip-vit-base-patch32", "pytorch_model.bin"), ("gpt2", "model.safetensors")):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        for name in ("config.json", weights):
            (folder / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / ("0" * 40) / name).write_text("{}")
        assert real_backbones_cached() == (repo == "gpt2")  # both are needed


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run(DemoConfig(out=str(out), real=False, n_train=1000, n_test=100, epochs=5, metrics=("CIDEr",),
                               gallery_size=6))


@pytest.mark.java
def test_held_out_captions_come_from_the_images(demo):
    """CIDEr of the captions of unseen images is far above a caption-only model's, which is trained
    the same way on the same captions with every image embedding zeroed."""
    _, summary = demo
    scores = summary["held_out_scores"]
    from_images, caption_only = scores[MODEL]["CIDEr"], scores[BASELINE]["CIDEr"]
    assert caption_only < 250  # one caption for every image: some of its words are in most references
    assert from_images > 300 and from_images > caption_only + 200, scores  # the paper's units, x100
    assert scores[MODEL]["exact_match"] > scores[BASELINE]["exact_match"]


@pytest.mark.java
def test_features_go_through_the_extraction_path(demo):
    out, summary = demo
    train, test = load_features(out / "features" / "train"), load_features(out / "features" / "test")
    assert (len(train.captions), len(test.captions)) == (2000, 200)
    assert train.dim == test.dim == 128
    assert summary["backbones"] == "tiny random" and "TINY RANDOM" in summary["about"]


@pytest.mark.java
def test_report_folder(demo):
    out, summary = demo
    report = out / "report"
    assert json.loads((report / "metrics.json").read_text()) == summary
    assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "gallery.html").read_text()
    shown = re.findall(r'<img src="(images/[^"]+)"', page)
    assert len(shown) == 6 and all((report / src).is_file() for src in shown)
    captions = json.loads((report / "captions.json").read_text())
    first = captions[MODEL][str(1000)]
    assert CAPTION.fullmatch(first) and first in page
