"""Every recipe in recipes/ runs end to end on tiny backbones and a small generated dataset.

The recipes are the paper's rows; their settings come from the environment, so here they run
with a tiny CLIP and GPT-2, one epoch and small batches, through the real scripts, Java metrics
included. A recipe that drifts from the scripts' flags, or a CLIP that is not carried from the
features into the checkpoint, fails here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from safetensors import safe_open

from clipcap.data import load_features
from clipcap.tiny import make_tiny_clip, make_tiny_resnet_clip

pytestmark = pytest.mark.java  # every recipe scores with the Java metrics

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 214)}
SHAPES = ("circle", "square")


def draw(path: Path, k: int) -> list[str]:
    """An image of one coloured shape, and two captions naming it."""
    colour, shape = list(COLOURS)[k % 3], SHAPES[k // 3 % 2]
    image = Image.new("RGB", (48, 40), (245, 245, 240))
    box = (10, 8, 38, 32)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return [f"a {colour} {shape}.", f"a {shape} that is {colour}."]


def make_coco(root: Path) -> None:
    """COCO images under train2014/ and val2014/ with Karpathy's split file."""
    images = []
    for k, split in enumerate(["train"] * 10 + ["restval"] * 2 + ["val"] * 4 + ["test"] * 4):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{k + 1:012d}.jpg"
        captions = draw(root / folder / name, k)
        images.append({"filepath": folder, "filename": name, "cocoid": k + 1, "split": split,
                       "sentences": [{"raw": c, "sentid": 2 * k + j} for j, c in enumerate(captions)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def make_conceptual(root: Path) -> None:
    """The original's layout: each split's TSV (caption TAB url) beside {split}/{row:08d}.jpg."""
    for split, tsv, n in (("train", "Train_GCC-training.tsv", 12), ("val", "Validation_GCC-1.1.0-Validation.tsv", 4)):
        lines = [f"{draw(root / split / f'{row:08d}.jpg', row + (0 if split == 'train' else 1))[0]}\thttp://x/{row}"
                 for row in range(n)]
        (root / tsv).write_text("\n".join(lines) + "\n")


def make_nocaps(root: Path) -> None:
    """nocaps_val_4500_captions.json's layout: COCO format, a domain per image, ten references each."""
    domains = ["in-domain", "near-domain", "out-domain"]
    images, annotations = [], []
    for k in range(6):
        name = f"{k:016x}.jpg"
        captions = draw(root / "val" / name, k)
        images.append({"id": k, "file_name": name, "open_images_id": f"{k:016x}", "domain": domains[k % 3],
                       "coco_url": f"https://example.invalid/{name}", "height": 40, "width": 48})
        annotations += [{"image_id": k, "caption": captions[j % 2], "id": 10 * k + j} for j in range(10)]
    (root / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, gpt2_dir, clip_dir):
    """Data, and the environment that points the recipes at it: a tiny Hugging Face CLIP for the rows of
    ViT-B/32, a tiny OpenAI-format ResNet CLIP file for the rows of RN50x4, a tiny GPT-2, 2 epochs."""
    root = tmp_path_factory.mktemp("recipes")
    make_coco(root / "coco")
    make_conceptual(root / "conceptual")
    make_nocaps(root / "nocaps")
    resnet = str(make_tiny_resnet_clip(root / "rn.pt", image_size=32))
    env = {**os.environ, "PY": sys.executable, "COCO": str(root / "coco"), "CC": str(root / "conceptual"),
           "NOCAPS": str(root / "nocaps"), "RUNS": str(root / "runs"), "GPT2": gpt2_dir, "EPOCHS": "2", "BS": "4",
           "VAL_CAPTIONS": "4", "K": "3", "MLP_CLIP": clip_dir, "MLP_TAG": "tiny",
           "TRANSFORMER_CLIP": resnet, "TRANSFORMER_TAG": "tinyrn"}
    return root, env


def row_env(env: dict, row: str) -> dict:
    """The CLIP of the row: RN50x4's stand-in for the COCO transformer rows, ViT-B/32's for the others."""
    resnet = row.startswith("coco_transformer")
    return {**env, "CLIP": env["TRANSFORMER_CLIP" if resnet else "MLP_CLIP"], "TAG": "tinyrn" if resnet else "tiny"}


def run_recipe(name: str, env: dict) -> None:
    run = subprocess.run(["bash", str(REPO / "recipes" / name)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def checkpoint_config(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["clipcap_config"])


@pytest.mark.parametrize("row, best, only_prefix", [
    ("coco_mlp", "coco_mlp/coco_mlp_best", False),
    ("coco_mlp_frozen", "coco_mlp_frozen/coco_mlp_frozen_best", True),
    ("coco_transformer", "coco_transformer_k3/coco_transformer_k3_best", True),
    ("coco_transformer_tuned", "coco_transformer_tuned_k3/coco_transformer_tuned_k3_best", False),
    ("conceptual_mlp", "conceptual_mlp/conceptual_mlp-001", False),
    ("conceptual_transformer", "conceptual_transformer_k3/conceptual_transformer_k3-001", True),
])
def test_paper_row_recipe_runs_end_to_end(workspace, row, best, only_prefix):
    root, env = workspace
    env = row_env(env, row)
    run_recipe(f"{row}.sh", env)
    run = (root / "runs" / best).parent
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
    assert len(json.loads(next(run.glob("captions_*.json")).read_text())) == 4
    config = checkpoint_config(root / "runs" / f"{best}.safetensors")
    assert config["clip_model"] == env["CLIP"]  # the features' CLIP, recorded without a flag
    assert config["only_prefix"] is only_prefix
    assert config["mapping_type"] == ("transformer" if "transformer" in row else "mlp")


def test_capdec_recipe_trains_on_captions_alone_and_scores_the_test_images(workspace, tmp_path):
    """CapDec's COCO row on a copy of the COCO layout without its train images: their captions are all it reads
    of them. A tiny CLIP with a tokenizer, for its text tower."""
    root, env = workspace
    coco = tmp_path / "coco"
    coco.mkdir()
    shutil.copy(root / "coco" / "dataset_coco.json", coco)
    shutil.copytree(root / "coco" / "val2014", coco / "val2014")
    words = [f"a {colour} {shape}. a {shape} that is {colour}." for colour in COLOURS for shape in SHAPES]
    clip = str(make_tiny_clip(tmp_path / "clip", corpus=words))
    run_recipe("capdec_coco.sh", {**env, "COCO": str(coco), "RUNS": str(tmp_path / "runs"), "CLIP": clip,
                                  "TAG": "tiny"})
    text = load_features(coco / "oscar_split_tiny_text_train.pkl")
    assert text.modality == "text" and len(text) == 24 and text.clip_model == clip  # train + restval, 2 captions each
    run = tmp_path / "runs" / "capdec_coco"
    config = checkpoint_config(run / "capdec_coco-001.safetensors")
    assert (config["noise_variance"], config["normalize_prefix"], config["clip_model"]) == (0.016, True, clip)
    assert (config["mapping_type"], config["prefix_length"], config["only_prefix"]) == ("transformer", 3, False)
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(json.loads((run / "metrics.json").read_text()))
    assert len(json.loads((run / "captions_test.json").read_text())) == 4


def test_nocaps_recipe_scores_both_coco_models_per_domain(workspace):
    root, env = workspace
    for row in ("coco_mlp", "coco_transformer"):
        if not (root / "runs" / ("coco_mlp" if row == "coco_mlp" else "coco_transformer_k3")).is_dir():
            run_recipe(f"{row}.sh", row_env(env, row))
    run_recipe("nocaps.sh", env)
    for run in ("coco_mlp", "coco_transformer_k3"):
        scores = json.loads((root / "runs" / run / "metrics_nocaps.json").read_text())
        assert set(scores) == {"entire", "in-domain", "near-domain", "out-domain"}
        assert all("CIDEr" in s for s in scores.values())


def stand_in_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in Python that records each command a recipe runs (and makes train.py's run folder), and its record."""
    calls = tmp_path / "calls.txt"
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!{sys.executable}\nimport os, sys\nwith open({str(calls)!r}, 'a') as f:\n"
                        "    f.write(' '.join(sys.argv[1:]) + '\\n')\n"
                        "if sys.argv[1] == 'train.py':\n    os.makedirs(sys.argv[sys.argv.index('--out_dir') + 1])\n")
    stand_in.chmod(0o755)
    return stand_in, calls


def test_nocaps_scores_the_transformer_run_that_coco_transformer_made(tmp_path):
    """nocaps.sh needs no K of its own: it scores the run coco_transformer.sh wrote, whatever K that had.
    The scripts run with a stand-in Python that records each command."""
    stand_in, calls = stand_in_python(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k != "K"}, "PY": str(stand_in), "RUNS": str(tmp_path / "runs"),
           "COCO": str(tmp_path / "coco"), "NOCAPS": str(tmp_path / "nocaps")}
    run_recipe("coco_mlp.sh", env)
    run_recipe("coco_transformer.sh", {**env, "K": "40"})
    calls.write_text("")
    run_recipe("nocaps.sh", env)
    scored = [line.split("--checkpoint ")[1].split()[0] for line in calls.read_text().splitlines()
              if line.startswith("evaluate.py")]
    assert scored == [str(tmp_path / "runs" / run / f"{run}_best.safetensors")
                      for run in ("coco_mlp", "coco_transformer_k40")]
    (tmp_path / "runs" / "coco_transformer_k40").rmdir()
    done = subprocess.run(["bash", str(REPO / "recipes" / "nocaps.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == (f"error: no run {tmp_path / 'runs'}/coco_transformer_k*: "
                                                    "run recipes/coco_transformer.sh first\n")


def test_the_modern_pair_recipe_runs_its_tower_language_model_and_adapters(tmp_path):
    """coco_siglip2_qwen.sh, through the stand-in Python: SigLIP 2 features of the three splits, Qwen2.5-0.5B with
    LoRA trained on them, its best epoch scored on test; and the environment's overrides reach the commands."""
    stand_in, calls = stand_in_python(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in ("CLIP", "TAG", "GPT2", "EPOCHS", "BS", "LR")},
           "PY": str(stand_in), "RUNS": str(tmp_path / "runs"), "COCO": str(tmp_path / "coco")}
    run_recipe("coco_siglip2_qwen.sh", env)
    commands = calls.read_text().splitlines()
    features = tmp_path / "coco" / "oscar_split_google_siglip2-so400m-patch14-224"
    assert [c.split()[0] for c in commands] == ["parse_coco.py"] * 3 + ["train.py", "evaluate.py"]
    assert all("--clip_model_type google/siglip2-so400m-patch14-224" in c for c in commands[:3])
    train = commands[3]
    for flags in (f"--data {features}_train.pkl", "--epochs 4", "--bs 40", "--gpt2 Qwen/Qwen2.5-0.5B",
                  "--lm_dtype bf16 --lora_rank 16 --lr 1e-4 --normalize_prefix"):
        assert flags in train
    run = tmp_path / "runs" / "coco_siglip2_qwen"
    assert f"--checkpoint {run}/coco_siglip2_qwen_best.safetensors --features {features}_test.pkl" in commands[4]
    calls.write_text("")
    shutil.rmtree(run)
    run_recipe("coco_siglip2_qwen.sh", {**env, "GPT2": "HuggingFaceTB/SmolLM2-360M", "LORA_RANK": "8", "EPOCHS": "2"})
    train = next(c for c in calls.read_text().splitlines() if c.startswith("train.py"))
    assert "--epochs 2" in train and "--gpt2 HuggingFaceTB/SmolLM2-360M" in train and "--lora_rank 8" in train
