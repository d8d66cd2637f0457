"""Shared fixtures: a tiny GPT-2 with a tokenizer trained on the fly, and small feature files.

Everything goes through save_pretrained / from_pretrained, the path real checkpoints take.
torch and transformers are imported by the fixtures, not here: under pytest-xdist the controlling
process loads this file too, and runs no test.
"""
from __future__ import annotations

import pickle
import random
import socket

import pytest

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow", "sheep"]
PLACES = ["on a bench", "in a field", "next to a car", "under a tree", "on the beach"]


def caption_corpus() -> list[str]:
    """Captions in the style of COCO, used to train the tiny tokenizer."""
    shapes = [f"a {c} {s} left of a {c2} {s2}." for c in COLOURS for s in SHAPES for c2 in COLOURS[:3] for s2 in SHAPES[:2]]
    animals = [f"a {a} {p}." for a in ANIMALS for p in PLACES]
    return shapes + animals + ["a man riding a wave on top of a surfboard!", "two people are playing frisbee."]


# The longest modules first (about 85, 40, 35, 30, 25 and 25 s on a 2-core machine): xdist hands out whole
# modules in this order (make test turns off its own order, by test count), so the workers' last modules
# are short ones and the workers finish together.
LONGEST_FIRST = ("test_reproduce_end_to_end.py", "test_training.py", "test_evaluation.py", "test_gpu_check.py",
                 "test_bad_inputs.py", "test_demo.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def quiet_single_threaded_torch() -> None:
    """The test models are tiny: one thread is fastest, and two threads on a busy 2-core machine
    can be 20 times slower (each small op waits for a descheduled thread)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 (width 32, 2 layers) and its tokenizer, saved like a hub checkpoint."""
    from testing.tiny import make_tiny_gpt2

    return str(make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), caption_corpus()))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (32 px images, 16-d embeddings) and its image processor, saved like a hub checkpoint."""
    from testing.tiny import make_tiny_clip

    return str(make_tiny_clip(tmp_path_factory.mktemp("clip")))


def write_feature_pickle(path, captions_per_image: list[list[str]], dim: int = 16, seed: int = 0, dtype=None):
    """The original's feature pickle: one random embedding per image (float32 unless ``dtype``), several
    captions each."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(len(captions_per_image), dim, generator=g).to(dtype)
    captions = [{"image_id": 1000 + i, "id": len(caps) * i + j, "caption": c, "clip_embedding": i}
                for i, caps in enumerate(captions_per_image) for j, c in enumerate(caps)]
    random.Random(seed).shuffle(captions)
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": embeddings, "captions": captions}, f)
    return path


@pytest.fixture
def feature_pickle(tmp_path):
    """Eight images with two captions each, in the original's pickle format."""
    corpus = caption_corpus()
    return write_feature_pickle(tmp_path / "oscar_split_ViT-B_32_train.pkl",
                                [[corpus[i * 7], corpus[i * 7 + 3]] for i in range(8)])


@pytest.fixture
def offline_openai_clip(monkeypatch, tmp_path):
    """OpenAI's ResNet CLIP URLs pointed at a closed local port, and an empty cache: as if offline."""
    from clipcap import resnet_clip

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, url in resnet_clip.URLS.items():
        monkeypatch.setitem(resnet_clip.URLS, name, url.replace("https://openaipublic.azureedge.net",
                                                                f"http://127.0.0.1:{port}"))
    monkeypatch.setattr(resnet_clip, "CACHE", tmp_path / "clip_cache")
    return tmp_path / "clip_cache"
