"""predict.py and the Captioner API: any checkpoint, images or features in, COCO results out, bad input named."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import write_feature_pickle
from PIL import Image
from skimage import data as photos
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.captioner import Captioner, image_paths
from clipcap.checkpoint import infer_config, save_checkpoint
from clipcap.cli import run
from clipcap.cli.predict import main as predict
from clipcap.data import load_features
from clipcap.encoder import load_image, load_image_encoder
from clipcap.files import ClipCapError
from clipcap.model import ClipCap, ClipCapConfig, build_model, load_tokenizer
from testing.reference import original_beam, original_greedy


def tiny_clipcap(gpt2_dir, clip_model="ViT-B/32", prefix_size=16, **config) -> ClipCap:
    """A tiny ClipCap whose GPT-2 says "." often enough for captions to end at different lengths."""
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm=gpt2_dir, clip_model=clip_model, prefix_size=prefix_size,
                                      prefix_length=4, **config)).eval()
    with torch.no_grad():
        model.gpt.transformer.wte.weight[13] *= 5
    return model


@pytest.fixture(scope="module")
def model(gpt2_dir, clip_dir):
    return tiny_clipcap(gpt2_dir, clip_model=clip_dir)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "coco_prefix-009.safetensors")


@pytest.fixture(scope="module")
def original_checkpoint(model, tmp_path_factory):
    """The original's format: torch.save of the whole state dict, no config anywhere, old buffers included."""
    state = dict(model.state_dict())
    state["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path_factory.mktemp("original") / "coco_weights.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(photos, name)()).save(folder / f"{name}.jpg")
    Image.fromarray(photos.camera()).save(folder / "camera.png")  # grayscale
    return folder


def run_predict(*args, expect_exit: int | None = None, capsys=None):
    """predict.py in this process, as ``python predict.py ARGS`` runs it (clipcap.cli.run included)."""
    argv = [str(a) for a in args]
    if expect_exit is None:
        predict(argv)
        return
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: predict(argv))
    assert exit_info.value.code == expect_exit


def embed(clip_dir, paths) -> torch.Tensor:
    return load_image_encoder(clip_dir)([load_image(p) for p in paths])


def test_images_to_coco_results_match_the_original_decoders(checkpoint, model, gpt2_dir, clip_dir, image_dir,
                                                            tmp_path, capsys):
    paths = image_paths([image_dir])
    assert [p.name for p in paths] == ["astronaut.jpg", "camera.png", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    tokenizer = load_tokenizer(gpt2_dir)
    embeds = embed(clip_dir, paths)
    out = tmp_path / "captions.json"
    run_predict("--checkpoint", checkpoint, "--images", image_dir, "--out", out, "--greedy", "--max_length", 20)
    results = json.loads(out.read_text())
    assert [r["image_id"] for r in results] == [str(p) for p in paths]
    assert [r["caption"] for r in results] == [tokenizer.decode(original_greedy(model, e, max_length=20))
                                               for e in embeds]
    assert "wrote" in capsys.readouterr().err
    run_predict("--checkpoint", checkpoint, "--images", image_dir, "--out", out, "--max_length", 20, "--batch_size", 2)
    assert [r["caption"] for r in json.loads(out.read_text())] == \
           [tokenizer.decode(original_beam(model, e, max_length=20)[0][0]) for e in embeds]


def test_features_give_one_caption_per_image(checkpoint, model, gpt2_dir, tmp_path):
    pickle = write_feature_pickle(tmp_path / "feats.pkl", [["a cat.", "a cat on a mat."], ["a dog."], ["a cow."] * 3])
    out = tmp_path / "results.json"
    run_predict("--checkpoint", checkpoint, "--features", pickle, "--out", out, "--max_length", 20)
    results = json.loads(out.read_text())
    features = load_features(pickle)
    first_row = {}
    for image_id, row in zip(features.image_ids, features.image_index):
        first_row.setdefault(image_id, int(row))
    assert [r["image_id"] for r in results] == list(first_row)  # distinct ids, as they first appear
    assert sorted(first_row) == [1000, 1001, 1002]
    tokenizer = load_tokenizer(gpt2_dir)
    assert [r["caption"] for r in results] == [
        tokenizer.decode(original_beam(model, features.embeddings_at(np.array([row]))[0], max_length=20)[0][0]) for row in first_row.values()]


def test_original_checkpoint_loads_without_flags(original_checkpoint, checkpoint, image_dir, gpt2_dir, clip_dir,
                                                 capsys):
    """No config: everything inferred from shapes; GPT-2's tokenizer and the CLIP given as folders (offline)."""
    images = [image_dir / "chelsea.jpg", image_dir / "rocket.jpg"]
    ours = Captioner.from_checkpoint(checkpoint)
    theirs = Captioner.from_checkpoint(original_checkpoint, lm=gpt2_dir, clip_model=clip_dir)
    assert theirs.model.config.prefix_length == 4 and theirs.model.config.prefix_size == 16
    assert theirs.caption(images, strategy="greedy", max_length=20) == \
           ours.caption(images, strategy="greedy", max_length=20)
    run_predict("--checkpoint", original_checkpoint, "--lm", gpt2_dir, "--clip_model", clip_dir,
                "--images", *images, "--greedy", "--max_length", 20)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{p}\t{c[0]}" for p, c in zip(images, ours.caption(images, strategy="greedy", max_length=20))]


def test_sampling_flags_give_several_captions(checkpoint, image_dir, tmp_path):
    out = tmp_path / "samples.json"
    run_predict("--checkpoint", checkpoint, "--images", image_dir / "coffee.jpg", "--top_p", 0.95,
                "--num_captions", 4, "--seed", 3, "--out", out)
    results = json.loads(out.read_text())
    assert len(results) == 4 and {r["image_id"] for r in results} == {str(image_dir / "coffee.jpg")}
    assert len({r["caption"] for r in results}) > 1
    again = tmp_path / "again.json"
    run_predict("--checkpoint", checkpoint, "--images", image_dir / "coffee.jpg", "--top_p", 0.95,
                "--num_captions", 4, "--seed", 3, "--out", again)
    assert json.loads(again.read_text()) == results


def test_bad_image_is_skipped_with_one_line(checkpoint, image_dir, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "captions.json"
    run_predict("--checkpoint", checkpoint, "--images", bad, image_dir / "rocket.jpg", "--greedy", "--out", out)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("skipped")] == [
        line for line in err if str(bad) in line and "unreadable image" in line]
    assert [r["image_id"] for r in json.loads(out.read_text())] == [str(image_dir / "rocket.jpg")]


@pytest.mark.parametrize("case", ["empty folder", "no match", "not clipcap", "not a checkpoint", "width",
                                  "no readable image", "beams over vocabulary", "samples over vocabulary"])
def test_bad_input_is_one_line_error(case, checkpoint, gpt2_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    not_clipcap = tmp_path / "gpt2.pt"
    torch.save(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=1, vocab_size=10)).state_dict(), not_clipcap)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    wide = write_feature_pickle(tmp_path / "wide.pkl", [["a cat."]], dim=512)
    text = tmp_path / "text.png"
    text.write_text("hello")
    args, expected = {
        "empty folder": (["--checkpoint", checkpoint, "--images", empty], f"{empty}: folder has no images"),
        "no match": (["--checkpoint", checkpoint, "--images", f"{tmp_path}/*.jpeg"], "no file matches"),
        "not clipcap": (["--checkpoint", not_clipcap, "--images", text], f"{not_clipcap}: not a ClipCap checkpoint"),
        "not a checkpoint": (["--checkpoint", garbage, "--images", text], f"{garbage}: not a readable checkpoint"),
        "width": (["--checkpoint", checkpoint, "--features", wide],
                  f"{wide}: features are 512-d, but the checkpoint takes 16-d"),
        "no readable image": (["--checkpoint", checkpoint, "--images", text], "none of the 1 images could be read"),
        "beams over vocabulary": (["--checkpoint", checkpoint, "--features", wide, "--beam_size", 100_000],
                                  "beam_size 100000 is over the model's vocabulary of"),
        "samples over vocabulary": (["--checkpoint", checkpoint, "--features", wide, "--sample", "--num_captions",
                                     100_000], "num_captions 100000 is over the model's vocabulary of"),
    }[case]
    run_predict(*args, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1]


@pytest.mark.parametrize("out", ["features", "checkpoint", "image", "paired config", "link to checkpoint",
                                 "folder's weights"])
def test_out_never_replaces_an_input(out, model, checkpoint, image_dir, tmp_path, capsys):
    """--out naming one of predict's inputs (after links) is refused before any work, and the input stays."""
    features = write_feature_pickle(tmp_path / "f.pkl", [["a cat."]])
    original = save_checkpoint(model, tmp_path / "run-001.pt")  # and its config, run-001.json
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(checkpoint)
    (tmp_path / "link.safetensors").symlink_to(checkpoint)
    image = image_dir / "rocket.jpg"
    args, target = {
        "features": (["--checkpoint", checkpoint, "--features", features], features),
        "checkpoint": (["--checkpoint", checkpoint, "--features", features], checkpoint),
        "image": (["--checkpoint", checkpoint, "--images", image_dir], image),
        "paired config": (["--checkpoint", original, "--features", features], tmp_path / "run-001.json"),
        "link to checkpoint": (["--checkpoint", tmp_path / "link.safetensors", "--features", features], checkpoint),
        "folder's weights": (["--checkpoint", folder, "--features", features], checkpoint),
    }[out]
    before = target.read_bytes()
    run_predict(*args, "--out", target, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {target}: is the input --")
    assert target.read_bytes() == before


def test_printed_lines_escape_tabs_and_newlines_in_names(checkpoint, image_dir, tmp_path, capsys):
    """Without --out, each caption is one line of two tab-separated fields, whatever the file names hold."""
    names = ["a\nb.jpg", "tab\there.jpg", "back\\slash\r.jpg"]
    for name in names:
        (tmp_path / name).write_bytes((image_dir / "rocket.jpg").read_bytes())
    paths = [tmp_path / name for name in names]
    run_predict("--checkpoint", checkpoint, "--images", *paths, "--greedy", "--max_length", 8)
    lines = capsys.readouterr().out.split("\n")
    assert lines.pop() == "" and len(lines) == 3
    unescape = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 2 for f in fields)
    assert [re.sub(r"\\[\\tnr]", lambda m: unescape[m[0]], f[0]) for f in fields] == [str(p) for p in paths]
    assert fields[0][0].endswith("a\\nb.jpg") and fields[2][0].endswith("back\\\\slash\\r.jpg")


def test_resnet_clip_offline_is_a_clear_error(gpt2_dir, image_dir, tmp_path, offline_openai_clip):
    """An inferred 640-d checkpoint wants RN50x4, fetched from OpenAI; offline, a one-line error says where to put it."""
    path = tmp_path / "rn50x4.pt"
    torch.save(tiny_clipcap(gpt2_dir, prefix_size=640).state_dict(), path)
    captioner = Captioner.from_checkpoint(path, lm=gpt2_dir)
    assert captioner.clip_model == "RN50x4"
    with pytest.raises(ClipCapError, match=r"cannot download .*/RN50x4.pt .*; download it yourself and put it at "
                                           + re.escape(str(offline_openai_clip / "RN50x4.pt")) + "$"):
        captioner.caption([image_dir / "rocket.jpg"])
    features = write_feature_pickle(tmp_path / "rn.pkl", [["a cat."]], dim=640)
    assert len(captioner.caption_features(load_features(features), max_length=5)) == 1  # features need no CLIP


def test_clip_width_must_match_checkpoint(gpt2_dir, clip_dir, image_dir, tmp_path):
    path = save_checkpoint(tiny_clipcap(gpt2_dir, clip_model=clip_dir, prefix_size=24), tmp_path / "m.safetensors")
    with pytest.raises(ClipCapError, match="gives 16-d embeddings, but the checkpoint takes 24-d"):
        Captioner.from_checkpoint(path).caption([image_dir / "rocket.jpg"])


def released(mapping_type: str, **config) -> dict[str, torch.Tensor]:
    """The state dict of one of the original's released models (GPT-2 small), shapes only, as saved by
    transformers 4.10 (with the attention buffers)."""
    with torch.device("meta"):
        state = ClipCap(ClipCapConfig(mapping_type=mapping_type, **config), GPT2LMHeadModel(GPT2Config())).state_dict()
    state = dict(state)
    for i in range(12):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.empty(1, 1, 1024, 1024, device="meta")
    return state


@pytest.mark.parametrize("name, state, expected", [
    ("COCO / Conceptual MLP", released("mlp", prefix_length=10, prefix_size=512),
     dict(mapping_type="mlp", prefix_length=10, prefix_size=512, clip_model="ViT-B/32", normalize_prefix=False,
          only_prefix=False)),
    ("COCO transformer", released("transformer", prefix_length=40, prefix_length_clip=40, prefix_size=640),
     dict(mapping_type="transformer", prefix_length=40, prefix_length_clip=40, prefix_size=640, num_layers=8,
          clip_model="RN50x4", normalize_prefix=True, only_prefix=True)),
])
def test_released_weights_configuration_is_inferred(name, state, expected):
    config = infer_config(state)
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.lm, config.lm_config["n_embd"], config.lm_config["n_layer"]) == ("gpt2", 768, 12)

