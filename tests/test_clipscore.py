"""CLIPScore on a tiny random CLIP with a word-level tokenizer, against CLIPModel's own features and
the formulas worked by hand; evaluate.py's --clipscore, --images and feature reuse."""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import caption_corpus
from PIL import Image

from clipcap.cli.evaluate import main as evaluate
from clipcap.clipscore import PREFIX, CLIPScorer
from clipcap.files import ClipCapError
from testing.tiny import make_tiny_clip

# Image id -> (domain, references, caption); the last caption is longer than the text tower's 16 tokens.
IMAGES = {
    11: ("in-domain", ["a red circle left of a blue square.", "a dog on a bench."], "a red circle left of a red star."),
    4: ("near-domain", ["a cat in a field.", "a horse in a field."], "a cat under a tree."),
    27: ("out-domain", ["two people are playing frisbee."], "a man riding a wave on top of a surfboard on the beach "
                                                          "next to a car under a tree."),
    9: ("in-domain", ["a bird on the beach."], "a dog next to a car."),
}


@pytest.fixture(scope="module")
def clip_with_tokenizer(tmp_path_factory):
    # At this seed the random towers find every caption closer to its image than orthogonal.
    return str(make_tiny_clip(tmp_path_factory.mktemp("clip_text"), corpus=caption_corpus() + [PREFIX], seed=4))


@pytest.fixture
def nocaps(tmp_path):
    """Image files (32 px on the short side, so no resizing) and nocaps-style references naming them."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, size in zip(IMAGES, [(32, 32), (48, 32), (32, 40), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{k:04d}.png")
    annotations = tmp_path / "nocaps_val.json"
    annotations.write_text(json.dumps({
        "images": [{"id": k, "file_name": f"{k:04d}.png", "domain": d} for k, (d, _, _) in IMAGES.items()],
        "annotations": [{"image_id": k, "id": 10 * k + j, "caption": r}
                        for k, (_, refs, _) in IMAGES.items() for j, r in enumerate(refs)]}))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": c} for k, (_, _, c) in IMAGES.items()]))
    return folder, annotations, results


def by_hand(clip_dir: str, folder: Path) -> tuple[dict, torch.Tensor]:
    """CLIP-S and RefCLIP-S per image from CLIPModel.get_image_features / get_text_features."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    context, eos = model.config.text_config.max_position_embeddings, model.config.text_config.eos_token_id

    def text(t: str) -> list[float]:
        ids = tokenizer(PREFIX + t)["input_ids"]
        ids = ids if len(ids) <= context else ids[:context - 1] + [eos]  # cut, keeping the end token
        with torch.no_grad():
            return model.get_text_features(input_ids=torch.tensor([ids])).pooler_output[0].tolist()

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pixels = processor([Image.open(folder / f"{k:04d}.png").convert("RGB") for k in IMAGES],
                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        images = model.get_image_features(pixel_values=pixels).pooler_output
    scores = {}
    for (k, (_, refs, caption)), image in zip(IMAGES.items(), images.tolist()):
        c = text(caption)
        clip_s = 2.5 * max(cos(image, c), 0.0)
        ref_s = max(max(cos(c, text(r)) for r in refs), 0.0)
        scores[k] = {"CLIP-S": clip_s, "RefCLIP-S": 2 * clip_s * ref_s / (clip_s + ref_s) if clip_s + ref_s else 0.0}
    return scores, images


def test_tiny_tokenizer_ends_with_the_eos_and_truncates(clip_with_tokenizer):
    from transformers import AutoTokenizer, CLIPConfig

    clip_dir = clip_with_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    text = CLIPConfig.from_pretrained(clip_dir).text_config
    ids = tokenizer(["A dog on a bench.", "a dog " * 20], truncation=True, max_length=16)["input_ids"]
    assert ids[0][0] == text.bos_token_id and ids[0][-1] == text.eos_token_id and len(ids[1]) == 16
    assert ids[1][-1] == text.eos_token_id and max(max(i) for i in ids) < text.vocab_size


def test_clipscore_equals_clip_features_and_the_formulas(clip_with_tokenizer, nocaps):
    folder, _, _ = nocaps
    expected, images = by_hand(clip_with_tokenizer, folder)
    scorer = CLIPScorer(clip_with_tokenizer)
    embedded, skipped = scorer.embed_images({k: folder / f"{k:04d}.png" for k in IMAGES})
    assert skipped == [] and list(embedded) == list(IMAGES)
    embeds = torch.stack(list(embedded.values()))
    assert torch.allclose(embeds, images, atol=1e-5)
    got = scorer({k: c for k, (_, _, c) in IMAGES.items()}, {k: refs for k, (_, refs, _) in IMAGES.items()}, embeds)
    assert list(got) == list(IMAGES)
    for k in IMAGES:
        assert got[k] == pytest.approx(expected[k], abs=1e-5)
    assert all(v["CLIP-S"] > 0 and v["RefCLIP-S"] > 0 for v in got.values())
    # Negative cosines count as zero, and so does a harmonic mean with a zero.
    flipped = scorer({k: c for k, (_, _, c) in IMAGES.items()}, {k: r for k, (_, r, _) in IMAGES.items()}, -embeds)
    assert all(v == {"CLIP-S": 0.0, "RefCLIP-S": 0.0} for v in flipped.values())
    with pytest.raises(ClipCapError, match="3 image embeddings for 4 captions"):
        scorer({k: c for k, (_, _, c) in IMAGES.items()}, {k: r for k, (_, r, _) in IMAGES.items()}, embeds[:3])


def test_clipscore_model_is_checked_before_any_work(clip_dir, nocaps, tmp_path, monkeypatch):
    """A CLIP folder without tokenizer files loads a tokenizer of two special tokens, which would score every
    caption as unknown words; that, and a CLIP that is not there, fail before captioning or Java start."""
    from clipcap.cli import evaluate as cli_evaluate

    with pytest.raises(ClipCapError, match=r"^.*clip.* \(--clipscore_model\): its tokenizer knows no words \(2 tokens\); "
                                           r"the folder lacks CLIP's tokenizer files"):
        CLIPScorer(clip_dir)  # conftest's tiny CLIP has no tokenizer
    folder, annotations, results = nocaps

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(cli_evaluate, "Scorer", no_work)
    monkeypatch.setattr(cli_evaluate, "load_features", no_work)
    for model, message in [(clip_dir, "tokenizer knows no words"), (str(tmp_path / "nowhere"), "nowhere "
                                                                    r"\(--clipscore_model\): not a CLIP checkpoint")]:
        with pytest.raises(ClipCapError, match=message):
            evaluate(["--checkpoint", str(tmp_path / "absent.safetensors"), "--features", str(results),
                      "--annotations", str(annotations), "--clipscore", "--clipscore_model", model])


@pytest.mark.java
def test_evaluate_clipscore_from_images_features_and_per_domain(clip_with_tokenizer, nocaps, tmp_path, capsys):
    folder, annotations, results = nocaps
    expected, images = by_hand(clip_with_tokenizer, folder)
    common = ["--results", str(results), "--annotations", str(annotations), "--metrics", "CIDEr", "--clipscore",
              "--clipscore_model", clip_with_tokenizer, "--device", "cpu"]

    evaluate([*common, "--images", str(folder), "--out", str(tmp_path / "m.json"),
              "--per_image", str(tmp_path / "p.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    per_image = json.loads((tmp_path / "p.json").read_text())
    assert [(r["image_id"], r["domain"]) for r in per_image] == [(k, d) for k, (d, _, _) in IMAGES.items()]
    for row in per_image:  # in the units of every score here, the paper's x100
        assert {k: row[k] for k in ("CLIP-S", "RefCLIP-S")} == \
            pytest.approx({k: 100 * v for k, v in expected[row["image_id"]].items()}, abs=1e-3)
    for subset, ids in [("entire", list(IMAGES)), ("in-domain", [11, 9]), ("out-domain", [27])]:
        assert list(metrics[subset]) == ["CIDEr", "CLIP-S", "RefCLIP-S"]
        for key in ("CLIP-S", "RefCLIP-S"):
            assert metrics[subset][key] == pytest.approx(100 * np.mean([expected[k][key] for k in ids]), abs=1e-3)

    # Features made by the same CLIP serve instead of the image files; from another CLIP they cannot.
    features = tmp_path / "features.pkl"
    for clip_model in (clip_with_tokenizer, "ViT-B/32"):
        with open(features, "wb") as f:
            pickle.dump({"clip_embedding": images, "clip_model": clip_model,
                         "captions": [{"image_id": k, "caption": "x", "clip_embedding": i}
                                      for i, k in enumerate(IMAGES)]}, f)
        if clip_model == "ViT-B/32":
            with pytest.raises(ClipCapError, match=f"--clipscore: the run's image embeddings are made by ViT-B/32, "
                                                   f"not {re.escape(clip_with_tokenizer)}; pass --images FOLDER"):
                evaluate([*common, "--features", str(features), "--out", str(tmp_path / "f.json")])
            continue
        evaluate([*common, "--features", str(features), "--out", str(tmp_path / "f.json")])
        from_features = json.loads((tmp_path / "f.json").read_text())
        for subset in metrics:
            assert from_features[subset] == pytest.approx(metrics[subset], abs=1e-3)

    # An unreadable image is skipped and named, before any scoring; the others are scored as before.
    (folder / "0027.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    capsys.readouterr()
    evaluate([*common, "--images", str(folder), "--per_image", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("skipped")] == \
        [line for line in err.splitlines() if "0027.png" in line] and "0027.png" in err
    assert "scored 3 of the 4 reference images (1 unreadable, skipped)" in out and "| out-domain |" not in out
    clip_scores = [{k: row[k] for k in ("image_id", "domain", "CLIP-S", "RefCLIP-S")}
                   for row in json.loads((tmp_path / "p.json").read_text())]
    assert clip_scores == [pytest.approx({k: row[k] for k in ("image_id", "domain", "CLIP-S", "RefCLIP-S")}, abs=1e-3)
                           for row in per_image if row["image_id"] != 27]


@pytest.mark.java
def test_evaluate_captions_the_images_folder(clip_with_tokenizer, gpt2_dir, nocaps, tmp_path, capsys):
    from clipcap.captioner import Captioner
    from clipcap.checkpoint import save_checkpoint
    from clipcap.featureset import FeatureSet
    from clipcap.model import ClipCapConfig, build_model

    folder, annotations, _ = nocaps
    checkpoint = save_checkpoint(build_model(ClipCapConfig(prefix_size=16, prefix_length=2, gpt2=gpt2_dir,
                                                           clip_model=clip_with_tokenizer)), tmp_path / "tiny.safetensors")
    evaluate(["--checkpoint", str(checkpoint), "--images", str(folder), "--annotations", str(annotations),
              "--metrics", "CIDEr", "--greedy", "--batch_size", "3", "--device", "cpu",
              "--out", str(tmp_path / "m.json"), "--save_captions", str(tmp_path / "captions.json")])
    captions = json.loads((tmp_path / "captions.json").read_text())
    direct = Captioner.from_checkpoint(checkpoint).caption([folder / f"{k:04d}.png" for k in IMAGES], strategy="greedy")
    assert captions == [{"image_id": k, "caption": c[0]} for k, c in zip(IMAGES, direct)]
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"entire", "in-domain", "near-domain", "out-domain"}
    capsys.readouterr()

    # One captioning loop: files, PIL images and features of their embeddings caption alike, sampling over more
    # images than a batch included (one seeded stream for the run, not one per batch).
    captioner, files = Captioner.from_checkpoint(checkpoint), [folder / f"{k:04d}.png" for k in IMAGES]
    embeds = captioner.embed(files)
    features = FeatureSet(embeds, ["x"] * 4, np.arange(4), list(IMAGES), clip_with_tokenizer)
    sampled = dict(strategy="sample", seed=5, num_captions=2, max_length=8, batch_size=3)
    by_features = captioner.caption_features(features, **sampled)
    assert [r["image_id"] for r in by_features] == [k for k in IMAGES for _ in range(2)]
    assert captioner.caption(files, **sampled) == captioner.caption([Image.open(f) for f in files], **sampled) \
        == [[r["caption"] for r in by_features if r["image_id"] == k] for k in IMAGES]
    results, skipped = captioner.caption_files(files, **sampled)
    assert skipped == [] and [r["caption"] for r in results] == [r["caption"] for r in by_features]

    # An unreadable image is skipped and named; the others are captioned and scored, and the table says so.
    (folder / "0027.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ClipCapError, match=r"--out .*0011.png: is the input --images .*0011.png"):
        evaluate(["--checkpoint", str(checkpoint), "--images", str(folder), "--annotations", str(annotations),
                  "--out", str(folder / "0011.png")])
    evaluate(["--checkpoint", str(checkpoint), "--images", str(folder), "--annotations", str(annotations),
              "--metrics", "CIDEr", "--greedy", "--batch_size", "3", "--device", "cpu", "--per_image",
              str(tmp_path / "p.json"), "--save_captions", str(tmp_path / "captions.json")])
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("skipped")] == \
        [line for line in err.splitlines() if "0027.png" in line] and "0027.png" in err
    assert "scored 3 of the 4 reference images (1 unreadable, skipped)" in out
    assert json.loads((tmp_path / "captions.json").read_text()) == [c for c in captions if c["image_id"] != 27]
    per_image = json.loads((tmp_path / "p.json").read_text())
    assert [(r["image_id"], r["domain"]) for r in per_image] == [(11, "in-domain"), (4, "near-domain"), (9, "in-domain")]
    assert "| out-domain |" not in out  # its one image was unreadable

    (folder / "0004.png").unlink()
    with pytest.raises(ClipCapError, match=r"images \(--images\): 1 of the 4 images of .*nocaps_val.json are "
                                           r"missing \(e.g. '0004.png'\); .*--only_common_images"):
        evaluate(["--checkpoint", str(checkpoint), "--images", str(folder), "--annotations",
                  str(annotations), "--metrics", "CIDEr"])
