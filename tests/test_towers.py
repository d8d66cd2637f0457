"""Any CLIP-family image tower in transformers (CLIP, SigLIP...): features as the model's own processor and
get_image_features give them, through every command that takes images, with no extra flag."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from skimage import data as photos
from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessorPil, Siglip2ImageProcessorPil

from clipcap import encoder as encoder_module
from clipcap.captioner import Captioner
from clipcap.cli.parse_captions import main as parse_captions
from clipcap.cli.predict import main as predict
from clipcap.cli.train import main as train
from clipcap.data import load_features
from clipcap.encoder import Preprocess, load_image_encoder
from clipcap.files import ClipCapError
from testing.tiny import make_tiny_siglip


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> str:
    """A tiny random SigLIP (32 px, 32-d embeddings) and its processor, saved like a hub checkpoint."""
    return str(make_tiny_siglip(tmp_path_factory.mktemp("siglip")))


def pictures() -> list[Image.Image]:
    """Photos whose resized long side leaves an odd number of pixels to crop (where roundings differ), a
    square one, and a portrait one."""
    return [Image.fromarray(photos.astronaut()).resize((50, 37)), Image.fromarray(photos.coffee()).resize((32, 32)),
            Image.fromarray(photos.chelsea()).resize((41, 67))]


def reference(folder: str, images: list[Image.Image]) -> torch.Tensor:
    """The model's own processor (its PIL implementation) followed by its get_image_features."""
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    with torch.no_grad():
        model = AutoModel.from_pretrained(folder)
        return model.get_image_features(**processor(images, return_tensors="pt")).pooler_output


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_features_are_the_models_processor_then_get_image_features(tower, clip_dir, siglip_dir):
    folder = clip_dir if tower == "clip" else siglip_dir
    encoder = load_image_encoder(folder)
    expected = reference(folder, pictures())
    assert encoder.dim == expected.shape[1] == (16 if tower == "clip" else 32)
    assert torch.allclose(encoder(pictures()), expected, atol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the images' features differ: the comparison can fail
    if tower == "siglip":  # the whole image squeezed to 32x32, no crop; mean = std = 0.5
        assert encoder.transform.resize_to == (32, 32) and encoder.transform.mean == (0.5, 0.5, 0.5)
        assert encoder.transform.crop(pictures()[2]).shape == (3, 32, 32)


def test_openai_clips_keep_openai_preprocessing(clip_dir, monkeypatch):
    """Under an OpenAI name the centre crop rounds as torchvision's (OpenAI's transform), not as transformers'."""
    own = load_image_encoder(clip_dir).transform
    monkeypatch.setitem(encoder_module.OPENAI_CHECKPOINTS, "ViT-B/32", clip_dir)  # as if it were OpenAI's
    openai = load_image_encoder("ViT-B/32").transform
    assert openai == Preprocess(size=32, crop_size=32)
    image = pictures()[0]  # 50x37 -> 43x32: 11 spare columns, the crop starts at round(5.5) = 6 or at 5
    resized = torch.from_numpy(np.array(image.resize((43, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(openai.crop(image), resized[:, :, 6:38]) and torch.equal(own.crop(image), resized[:, :, 5:37])


def test_processors_and_models_it_cannot_follow_are_refused(clip_dir, gpt2_dir, tmp_path):
    for name, processor, problem in [
        ("nocrop", CLIPImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False), "aspect ratio"),
        ("padded", CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32, do_pad=True), "pads"),
        ("scaled", CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32, rescale_factor=1 / 127.5),
         "scales pixels by 0.00784"),
        ("naflex", Siglip2ImageProcessorPil(), "its own number of patches"),
    ]:
        folder = shutil.copytree(clip_dir, tmp_path / name)
        processor.save_pretrained(folder)
        kind = type(processor).__name__
        with pytest.raises(ClipCapError, match=f"{name}: its image processor \\({kind}\\) .*{problem}"):
            load_image_encoder(str(folder))
    with pytest.raises(ClipCapError, match="a gpt2 model has no get_image_features"):
        load_image_encoder(gpt2_dir)


def test_a_siglip_tower_goes_through_every_command_without_a_flag(siglip_dir, gpt2_dir, tmp_path, capsys):
    """Extraction (in DataLoader workers), training, predict, the Python API, a Hub folder and the web page:
    the tower is named once, at extraction, and recorded from there on."""
    from fastapi.testclient import TestClient

    from clipcap.app import create_app

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["astronaut.png", "coffee.png", "chelsea.png"]
    captions = {"astronaut.png": "a person in a white suit.", "coffee.png": "a cup of coffee.",
                "chelsea.png": "a cat on a rug."}
    for picture, name in zip(pictures(), names):
        picture.save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": [captions[n]] * 4}) + "\n"
                                                   for n in names))
    parse_captions([str(folder), "--clip_model", siglip_dir, "--num_workers", "1", "--batch_size", "2"])
    features = load_features(tmp_path / f"photos_{Path(siglip_dir).name}.pkl")
    assert features.clip_model == siglip_dir and features.modality == "image"
    _, rows = features.first_rows()
    assert torch.allclose(features.embeddings_at(rows), reference(siglip_dir, pictures()), atol=2e-2)  # float16

    result = train(["--data", str(tmp_path / f"photos_{Path(siglip_dir).name}.pkl"), "--out_dir", str(tmp_path / "run"),
                    "--gpt2", gpt2_dir, "--epochs", "1", "--bs", "4", "--prefix_length", "2"])
    checkpoint = result["checkpoint"]
    with safe_open(checkpoint, framework="pt") as f:
        assert json.loads(f.metadata()["clipcap_config"])["clip_model"] == siglip_dir

    captioner = Captioner.from_pretrained(checkpoint)
    expected = captioner.caption([folder / n for n in names], strategy="greedy")
    assert captioner.encoder.transform.resize_to == (32, 32)  # SigLIP's own tower and preprocessing
    capsys.readouterr()
    predict(["--checkpoint", checkpoint, "--images", str(folder / names[0]), "--greedy"])
    assert capsys.readouterr().out == f"{folder / names[0]}\t{expected[0][0]}\n"

    saved = captioner.save_pretrained(tmp_path / "hub")
    assert json.loads((saved / "config.json").read_text())["clip_model"] == siglip_dir
    assert siglip_dir in (saved / "README.md").read_text()
    assert Captioner.from_pretrained(str(saved)).caption([folder / n for n in names], strategy="greedy") == expected

    client = TestClient(create_app([checkpoint]))
    upload = io.BytesIO()
    Image.open(folder / names[1]).save(upload, format="PNG")
    answer = client.post("/api/caption", data={"checkpoint": checkpoint, "strategy": "greedy"},
                         files={"image": ("coffee.png", upload.getvalue(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == expected[1]
