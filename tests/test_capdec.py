"""Text-only training (CapDec): captions encoded by the CLIP's text tower, noise in training, images captioned.

The text towers are held against transformers' own get_text_features (OpenAI's files' tower against
OpenAI's encode_text: tests/test_resnet_clip.py); the noise against CapDec's recipe: normalise, add
N(0, variance) per coordinate, normalise again.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import caption_corpus
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from clipcap import store
from clipcap.captioner import Captioner
from clipcap.checkpoint import parse_config, read_checkpoint
from clipcap.cli.evaluate import main as evaluate
from clipcap.cli.parse_captions import main as parse_captions
from clipcap.cli.predict import main as predict
from clipcap.cli.train import main as train
from clipcap.data import load_features
from clipcap.featureset import load_original_pickle
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model
from clipcap.text_encoder import load_text_encoder
from testing.tiny import make_tiny_clip, make_tiny_siglip

CAPTIONS = {1: ["a red circle.", "a circle that is red."], 2: ["a blue square.", "a dog on the beach."],
            3: ["a cat under a tree."]}


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, str]:
    """A tiny CLIP and a tiny SigLIP, both towers and a tokenizer each."""
    root = tmp_path_factory.mktemp("towers")
    return {"clip": str(make_tiny_clip(root / "clip", corpus=caption_corpus())),
            "siglip": str(make_tiny_siglip(root / "siglip", corpus=caption_corpus()))}


def text_features(folder: str, captions: list[str]) -> torch.Tensor:
    """The model's get_text_features of its tokenizer's ids, padded to the text tower's length (as SigLIP needs);
    SigLIP's without an attention mask, as it was trained (and as transformers 4's SigLIP tokenizer gave them)."""
    model = AutoModel.from_pretrained(folder)
    tokens = AutoTokenizer.from_pretrained(folder)(captions, padding="max_length", truncation=True, return_tensors="pt",
                                                    max_length=model.config.text_config.max_position_embeddings)
    if model.config.model_type == "siglip":
        tokens.pop("attention_mask")
    with torch.no_grad():
        return model.get_text_features(**tokens).pooler_output


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_text_features_are_the_models_get_text_features(towers, tower):
    captions = ["a red circle.", "a dog on the beach.", " ".join(["a red square"] * 10)]  # the last is cut to 16
    encoder = load_text_encoder(towers[tower])
    expected = text_features(towers[tower], captions)
    assert encoder.dim == expected.shape[1] and encoder.context_length == 16
    assert torch.allclose(encoder(captions), expected, atol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 0.1
    if tower == "siglip":  # SigLIP's own tokenizer class, whose attention mask would change the embeddings
        assert type(encoder.tokenizer).__name__ == "SiglipTokenizer"
        tokens = encoder.tokenize(captions)
        with torch.no_grad():
            masked = AutoModel.from_pretrained(towers[tower]).get_text_features(**tokens).pooler_output
        assert not torch.allclose(masked, expected, atol=1e-3)


def write_source(root: Path, layout: str) -> tuple[list[str], dict[int | str, list[str]]]:
    """An annotation file of ``layout`` (none of its images exists); parse_captions' arguments, and the captions
    each id must get."""
    if layout == "txt":
        lines = [c for cs in CAPTIONS.values() for c in cs]
        (root / "captions.txt").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
        return [str(root / "captions.txt")], {1: [lines[0]], 2: [lines[1]], 4: [lines[2]], 5: [lines[3]],
                                              6: [lines[4]]}
    if layout == "karpathy_coco":  # test images are left out by --split train
        images = [{"filepath": "train2014", "filename": f"{k}.jpg", "cocoid": k, "sentences": [{"raw": c} for c in cs],
                   "split": "train" if k < 3 else "restval"} for k, cs in CAPTIONS.items()]
        images.append({"filepath": "val2014", "filename": "9.jpg", "cocoid": 9, "split": "test",
                       "sentences": [{"raw": "a test caption."}]})
        (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
        return [str(root / "dataset_coco.json"), "--split", "train"], CAPTIONS
    if layout == "coco_format":
        data = {"images": [{"id": k, "file_name": f"{k}.jpg"} for k in CAPTIONS],
                "annotations": [{"image_id": k, "caption": c, "id": 10 * k + j} for k, cs in CAPTIONS.items()
                                for j, c in enumerate(cs)]}
        (root / "captions_val2014.json").write_text(json.dumps(data))
        return [str(root / "captions_val2014.json")], CAPTIONS
    if layout == "conceptual_tsv":  # the period parse_conceptual adds, added
        (root / "Train_GCC-training.tsv").write_text("a red circle\thttp://x/0\na blue square .\thttp://x/1\n")
        return [str(root / "Train_GCC-training.tsv")], {0: ["a red circle."], 1: ["a blue square."]}
    (root / "photos").mkdir()  # an imagefolder whose images are not there
    (root / "photos" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.jpg", "text": cs}) + "\n"
                                                            for k, cs in CAPTIONS.items()))
    return [str(root / "photos")], {f"{k}.jpg": cs for k, cs in CAPTIONS.items()}


@pytest.mark.parametrize("layout", ["txt", "karpathy_coco", "coco_format", "conceptual_tsv", "imagefolder"])
def test_text_only_encodes_the_captions_of_any_source(towers, tmp_path, layout):
    arguments, expected = write_source(tmp_path, layout)
    out = tmp_path / "text.pkl"
    parse_captions([*arguments, "--text_only", "--clip_model", towers["clip"], "--out", str(out), "--batch_size", "2"])
    features = load_features(out)
    assert features.modality == "text" and features.clip_model == towers["clip"]
    assert [(i, c) for i, c in zip(features.image_ids, features.captions)] == \
        [(i, c) for i, cs in expected.items() for c in cs]
    assert list(features.image_index) == list(range(len(features)))  # one embedding per caption
    expected = text_features(towers["clip"], features.captions)
    assert torch.allclose(features.embeddings_at(features.image_index), expected, atol=1e-2)  # stored in float16


def test_the_text_file_is_the_originals_layout_marked_as_text(towers, tmp_path):
    """The original's train.py reads it as it reads image features; the marker survives the store both ways;
    a rerun keeps it, and the default name says what it holds."""
    arguments, _ = write_source(tmp_path, "karpathy_coco")
    parse_captions([*arguments, "--text_only", "--clip_model", towers["clip"]])
    path = tmp_path / "dataset_coco_clip_text_train.pkl"
    with open(path, "rb") as f:
        data = pickle.load(f)  # as the original's ClipCocoDataset does
    prefixes, captions = data["clip_embedding"], data["captions"]
    assert data["modality"] == "text" and prefixes.shape == (5, 16)
    assert [(c["image_id"], c["caption"]) for c in captions][:2] == [(1, "a red circle."), (1, "a circle that is red.")]
    assert torch.equal(prefixes[captions[3]["clip_embedding"]], load_original_pickle(path).embeddings[3])
    store.from_pickle(path, tmp_path / "store")
    assert load_features(tmp_path / "store").modality == "text"
    store.to_pickle(tmp_path / "store", tmp_path / "back.pkl")
    assert load_original_pickle(tmp_path / "back.pkl").modality == "text"
    parse_captions([*arguments, "--text_only", "--clip_model", towers["clip"], "--feature_store"])
    assert json.loads((tmp_path / "dataset_coco_clip_text_train" / "store.json").read_text())["modality"] == "text"


def test_noise_is_capdecs_in_training_only():
    """What the mapper sees in training: the embedding normalised, N(0, variance) added to each coordinate,
    normalised again (CapDec's noise injection); without normalisation, the raw embedding plus the noise.
    In evaluation, the embedding alone."""
    seen = []
    embeds = 5 * torch.randn(8, 64)
    unit = embeds / embeds.norm(dim=1, keepdim=True)
    for normalize in (True, False):
        config = ClipCapConfig(prefix_size=64, prefix_length=2, normalize_prefix=normalize, noise_variance=0.016,
                               lm_config=dict(model_type="gpt2", vocab_size=50, n_positions=16, n_embd=8, n_layer=1,
                                               n_head=1))
        model = build_model(config, pretrained_lm=False)
        model.clip_project.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        model.train()
        torch.manual_seed(7)
        model.prefix(embeds)
        model.prefix(embeds)
        model.eval()
        model.prefix(embeds)
        first, second, evaluated = seen[-3:]
        torch.manual_seed(7)
        noisy = (unit if normalize else embeds) + torch.randn(8, 64) * 0.016 ** 0.5
        expected = noisy / noisy.norm(dim=1, keepdim=True) if normalize else noisy
        torch.testing.assert_close(first, expected)
        assert not torch.allclose(first, second)  # fresh noise at every step
        assert torch.equal(evaluated, unit if normalize else embeds)


def test_text_only_training_records_its_settings_and_captions_images(towers, gpt2_dir, tmp_path, capsys):
    arguments, _ = write_source(tmp_path, "txt")
    parse_captions([*arguments, "--text_only", "--clip_model", towers["siglip"], "--out", str(tmp_path / "t.pkl")])
    flags = ["--data", str(tmp_path / "t.pkl"), "--gpt2", gpt2_dir, "--epochs", "1", "--bs", "2",
             "--prefix_length", "2"]
    capsys.readouterr()
    train([*flags, "--out_dir", str(tmp_path / "plain")])
    warnings = [line for line in capsys.readouterr().out.splitlines() if "text embeddings" in line]
    assert len(warnings) == 2 and "--noise_variance" in warnings[0] and "--normalize_prefix" in warnings[1]
    result = train([*flags, "--out_dir", str(tmp_path / "capdec"), "--normalize_prefix", "--noise_variance", "0.016"])
    assert "text embeddings" not in capsys.readouterr().out
    _, config = read_checkpoint(result["checkpoint"])
    assert (config.noise_variance, config.normalize_prefix, config.clip_model) == (0.016, True, towers["siglip"])
    assert json.loads(Path(result["config"]).read_text())["noise_variance"] == 0.016
    captioner = Captioner.from_pretrained(result["checkpoint"])  # images: the SigLIP's image tower, normalised
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    embedding = captioner.embed([image])
    assert captioner.caption([image], strategy="greedy") == captioner.caption_embeddings(
        10 * embedding, strategy="greedy")  # the length of an image embedding does not count


def test_text_embeddings_are_never_captioned_as_images(towers, gpt2_dir, tmp_path):
    arguments, _ = write_source(tmp_path, "karpathy_coco")
    text = tmp_path / "text.pkl"
    parse_captions([*arguments, "--text_only", "--clip_model", towers["clip"], "--out", str(text)])
    config = ClipCapConfig(prefix_size=16, prefix_length=2, gpt2=gpt2_dir, clip_model=towers["clip"])
    from clipcap.checkpoint import save_checkpoint

    checkpoint = str(save_checkpoint(build_model(config), tmp_path / "model.safetensors"))
    refusal = f"{text}: holds CLIP text embeddings of captions .*not image embeddings"
    with pytest.raises(ClipCapError, match=refusal):
        predict(["--checkpoint", checkpoint, "--features", str(text)])
    with pytest.raises(ClipCapError, match=refusal):
        evaluate(["--checkpoint", checkpoint, "--features", str(text), "--annotations", arguments[0],
                  "--split", "test"])
    with pytest.raises(ClipCapError, match=refusal):
        Captioner.from_pretrained(checkpoint).caption_features(load_features(text), source=text)
    with pytest.raises(ClipCapError, match=f"--val_data {text} \\(captioned for --val_captions\\): holds CLIP text"):
        train(["--data", str(text), "--val_data", str(text), "--val_captions", "2", "--gpt2", gpt2_dir,
               "--out_dir", str(tmp_path / "run")])


def test_a_checkpoints_noise_variance_is_a_number_of_at_least_0():
    assert parse_config({"noise_variance": 0}, "c.json").noise_variance == 0.0  # JSON written by hand
    assert parse_config({}, "c.json").noise_variance == 0.0  # checkpoints from before it existed
    for bad in (-0.5, True, "0.016", None):
        with pytest.raises(ClipCapError, match=f"c.json: config noise_variance must be a number of at least 0, got "
                                               f"{re.escape(repr(bad))}"):
            parse_config({"noise_variance": bad}, "c.json")


@pytest.mark.parametrize("arguments, message", [
    (["--noise_variance", "-0.1"], "--noise_variance must be a non-negative number, got -0.1"),
    (["--noise_variance", "nan"], "--noise_variance must be a non-negative number, got nan"),
])
def test_bad_noise_is_refused(feature_pickle, tmp_path, arguments, message):
    with pytest.raises(ClipCapError, match=message):
        train(["--data", str(feature_pickle), "--out_dir", str(tmp_path / "run"), *arguments])


def test_bad_text_only_input_is_refused(towers, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ClipCapError, match="empty.txt: no captions"):
        parse_captions([str(tmp_path / "empty.txt"), "--text_only", "--clip_model", towers["clip"]])
    (tmp_path / "c.txt").write_text("a dog.\n")
    with pytest.raises(ClipCapError, match="--images_root images: --text_only reads no image"):
        parse_captions([str(tmp_path / "c.txt"), "--text_only", "--images_root", "images"])
    with pytest.raises(ClipCapError, match="--split applies to Karpathy's split files only"):
        parse_captions([str(tmp_path / "c.txt"), "--text_only", "--split", "train"])
    bare = make_tiny_clip(tmp_path / "bare")  # no tokenizer files
    with pytest.raises(ClipCapError, match="its tokenizer .* knows no words"):
        parse_captions([str(tmp_path / "c.txt"), "--text_only", "--clip_model", str(bare)])
    assert not list(tmp_path.glob("*.pkl"))
