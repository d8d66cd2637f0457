"""Your own data: parse_captions.py over every layout it reads, and the same files as evaluation references."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from clipcap.annotations import load_references
from clipcap.checkpoint import save_checkpoint
from clipcap.cli.evaluate import main as evaluate
from clipcap.cli.parse_captions import main as parse_captions
from clipcap.data import load_features
from clipcap.encoder import load_image, load_image_encoder
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model

EVALUATE = evaluate

# The images every layout describes (path as written -> captions), and one listed but missing.
IMAGES = {"dogs/astronaut.jpg": ["an astronaut in a white suit.", "a person posing with a flag."],
          "coffee.png": ["a cup of coffee on a saucer."],
          "cats/chelsea.jpg": ["a cat looking to the side.", "a tabby cat.", "an orange cat on a rug."]}
MISSING = "dogs/missing.jpg"


def write_photos(root: Path) -> None:
    for name in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(getattr(photos, Path(name).stem)()).resize((64, 48))
        picture.save(root / name)


def rows() -> list[tuple[str, str]]:
    """One (path, caption) row per caption, an image's rows apart, and a row for the missing file."""
    return [(name, c) for i in range(3) for name, captions in IMAGES.items() if i < len(captions)
            for c in [captions[i]]] + [(MISSING, "a dog that is not there.")]


def write_csv(path: Path, header: tuple[str, str] | None, delimiter: str = ",") -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerows(([header] if header else []) + rows())
    path.write_text(buffer.getvalue())


def write_jsonl(path: Path, image: str, caption: str, as_lists: bool) -> None:
    entries = [{image: name, caption: captions if as_lists else captions[0]} for name, captions in IMAGES.items()]
    if not as_lists:  # the other captions as further rows of the same image
        entries += [{image: name, caption: c} for name, captions in IMAGES.items() for c in captions[1:]]
    entries.append({image: MISSING, caption: "a dog that is not there."})
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")


def make_layout(tmp_path: Path, layout: str) -> tuple[list[str], dict]:
    """Write ``layout``; returns parse_captions.py's arguments and the references its features must match."""
    by_path = dict(IMAGES)
    if layout == "imagefolder_jsonl":
        write_photos(tmp_path / "photos")
        write_jsonl(tmp_path / "photos" / "metadata.jsonl", "file_name", "text", as_lists=True)
        return [str(tmp_path / "photos")], by_path
    if layout == "imagefolder_csv":
        write_photos(tmp_path / "photos")
        write_csv(tmp_path / "photos" / "metadata.csv", ("file_name", "caption"))
        return [str(tmp_path / "photos")], by_path
    write_photos(tmp_path / "images")
    if layout == "csv":
        write_csv(tmp_path / "captions.csv", ("image", "caption"))
        return [str(tmp_path / "captions.csv"), "--images_root", str(tmp_path / "images")], by_path
    if layout == "jsonl":
        write_jsonl(tmp_path / "captions.jsonl", "path", "caption", as_lists=False)
        return [str(tmp_path / "captions.jsonl"), "--images_root", str(tmp_path / "images")], by_path
    if layout == "tsv_headerless":
        write_csv(tmp_path / "captions.tsv", None, delimiter="\t")
        return [str(tmp_path / "captions.tsv"), "--images_root", str(tmp_path / "images")], by_path
    if layout == "tsv_header":
        write_csv(tmp_path / "images" / "captions.tsv", ("file_name", "text"), delimiter="\t")
        return [str(tmp_path / "images" / "captions.tsv")], by_path  # paths relative to the file's folder
    assert layout == "karpathy"
    splits = {"dogs/astronaut.jpg": "train", "coffee.png": "restval", "cats/chelsea.jpg": "test", MISSING: "train"}
    entries = [{"filename": name, "imgid": i, "split": splits[name], "sentids": [],
                "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 10 * i + j}
                              for j, c in enumerate(IMAGES.get(name, ["a dog that is not there."]))]}
               for i, name in enumerate([*IMAGES, MISSING])]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return [str(tmp_path / "dataset_flickr30k.json"), "--images_root", str(tmp_path / "images"), "--split", "train"], \
        {0: IMAGES["dogs/astronaut.jpg"], 1: IMAGES["coffee.png"]}


LAYOUTS = ["imagefolder_jsonl", "imagefolder_csv", "csv", "jsonl", "tsv_headerless", "tsv_header", "karpathy"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parse_captions_reads_every_layout(layout, tmp_path, clip_dir, capsys):
    args, expected = make_layout(tmp_path, layout)
    out = tmp_path / "features.pkl"
    parse_captions([*args, "--clip_model_type", clip_dir, "--out_path", str(out), "--num_workers", "0", "--shard_size", "2"])
    features = load_features(out)
    got: dict = {}
    for image_id, caption in zip(features.image_ids, features.captions):
        got.setdefault(image_id, []).append(caption)
    assert got == expected
    assert features.embeddings.shape == (len(expected), 16) and features.clip_model == clip_dir
    # each image's row holds its own embedding, as the image encodes on its own
    names = {image_id: name for image_id, name in zip(expected, IMAGES)} if layout == "karpathy" \
        else {name: name for name in expected}
    root = Path(args[0]) if layout.startswith("imagefolder") else tmp_path / "images"
    encoder = load_image_encoder(clip_dir)
    for image_id, row in zip(features.image_ids, features.image_index):
        expected_embedding = encoder([load_image(root / names[image_id])])[0].half().float()
        torch.testing.assert_close(features.embeddings_at(np.array([row]))[0], expected_embedding, rtol=2e-3, atol=2e-3)
    report = (tmp_path / "features_skipped.tsv").read_text().splitlines()
    assert report == [f"{root / MISSING}\tnot downloaded"]
    assert f"{len(expected)} images" in capsys.readouterr().out

    # The same file is the evaluation references: every image it lists, found or not.
    missing = 3 if layout == "karpathy" else MISSING
    assert load_references(args[0], "train" if layout == "karpathy" else None) == \
        {**expected, missing: ["a dog that is not there."]}


def test_karpathy_splits_and_default_output_name(tmp_path, clip_dir):
    args, _ = make_layout(tmp_path, "karpathy")
    parse_captions([args[0], "--images_root", str(tmp_path / "images"), "--split", "test", "--clip_model_type", clip_dir,
           "--num_workers", "0"])
    features = load_features(tmp_path / f"dataset_flickr30k_{Path(clip_dir).name}_test.pkl")
    assert set(features.image_ids) == {2} and len(features) == 3
    assert load_references(args[0], "test") == {2: IMAGES["cats/chelsea.jpg"]}
    with pytest.raises(ClipCapError, match=r"dataset_flickr30k\.json: Karpathy's split file holds every split"):
        load_references(args[0])


@pytest.mark.java
def test_evaluate_scores_features_of_your_own_data(tmp_path, clip_dir, gpt2_dir, capsys):
    """The whole path: parse_captions.py, a checkpoint, evaluate.py with the image folder as references
    (less the image that is missing, so only the common images are scored)."""
    args, _ = make_layout(tmp_path, "imagefolder_jsonl")
    parse_captions([*args, "--clip_model_type", clip_dir, "--num_workers", "0"])
    features = tmp_path / f"photos_{Path(clip_dir).name}.pkl"
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=16, prefix_length=4, clip_model=clip_dir))
    save_checkpoint(model, tmp_path / "tiny.safetensors")
    EVALUATE(["--checkpoint", str(tmp_path / "tiny.safetensors"), "--features", str(features), "--annotations",
              args[0], "--metrics", "CIDEr", "--greedy", "--only_common_images", "--device", "cpu", "--out", str(tmp_path / "metrics.json"),
              "--save_captions", str(tmp_path / "captions.json")])
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == {"CIDEr"}
    assert sorted(r["image_id"] for r in json.loads((tmp_path / "captions.json").read_text())) == sorted(IMAGES)
    assert "scored 3 of the 4 reference images" in capsys.readouterr().out


def test_bad_sources_are_one_line(tmp_path):
    (tmp_path / "a.csv").write_text("picture,words\nx.jpg,a dog.\n")
    with pytest.raises(ClipCapError, match=r"a\.csv: needs an image column \(file_name.*found picture, words"):
        load_references(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"file_name": "x.jpg", "text": "a dog."}\n{oops\n')
    with pytest.raises(ClipCapError, match=r"b\.jsonl: line 2 is not valid JSON"):
        load_references(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"file_name": "x.jpg", "text": 3}\n')
    with pytest.raises(ClipCapError, match=r"c\.jsonl: line 1: 'text' must be a string or a list of strings"):
        load_references(tmp_path / "c.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ClipCapError, match=r"folder: folder has no metadata\.jsonl or metadata\.csv"):
        load_references(tmp_path / "folder")
    write_csv(tmp_path / "d.csv", ("image", "caption"))
    with pytest.raises(ClipCapError, match=r"d\.csv: --split applies to Karpathy's split files only"):
        load_references(tmp_path / "d.csv", "test")
    # Conceptual Captions' caption<TAB>url TSV keeps its own reader: ids are row numbers
    (tmp_path / "cc.tsv").write_text("a dog on a bench\thttps://example.com/1.jpg\n")
    assert load_references(tmp_path / "cc.tsv") == {0: ["a dog on a bench"]}
