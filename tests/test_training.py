"""The training loop end to end: learning, resume, processes, accumulation, precision, the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import caption_corpus, write_feature_pickle
from safetensors.torch import load_file

from clipcap.checkpoint import load_checkpoint
from clipcap.cli.predict import main as predict
from clipcap.data import load_features
from clipcap.decoding import DecodingOptions, caption_embeddings
from clipcap.model import ClipCapConfig, build_model, load_tokenizer
from clipcap.tiny import make_tiny_gpt2
from clipcap.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_dropout_gpt2(tmp_path_factory):
    """Without dropout, runs that split the same batch differently must agree exactly."""
    return str(make_tiny_gpt2(tmp_path_factory.mktemp("gpt2_nodrop"), caption_corpus(), dropout=0.0))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    corpus = caption_corpus()
    path = tmp_path_factory.mktemp("data") / "train.pkl"
    return str(write_feature_pickle(path, [[corpus[i * 9], corpus[i * 9 + 4]] for i in range(12)]))


def run(tmp_path, data, gpt2, name="run", **overrides):
    """train() with small settings; ``overrides`` name fields of the run or of the model."""
    cfg = dict(data=data, out_dir=str(tmp_path / name), gpt2=gpt2, batch_size=4, epochs=2, warmup=2, lr=1e-3,
               prefix_length=3, num_workers=0, log_every=1)
    cfg.update(overrides)
    model = {k: cfg.pop(k) for k in list(cfg) if k in ClipCapConfig.__dataclass_fields__ and k != "clip_model"}
    return train(TrainConfig(model=ClipCapConfig(**model), **cfg))


def weights(path):
    return load_file(path)


def assert_same_weights(a, b, **tol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k, **tol)


def test_learns_and_reproduces_training_captions(tmp_path):
    """Loss falls at least tenfold, then greedy decoding gives back every training caption."""
    corpus = caption_corpus()
    captions = [corpus[i * 13] for i in range(8)] + ["a dog on a bench! a cat in a field."]  # "!" is learned
    gpt2 = str(make_tiny_gpt2(tmp_path / "gpt2", corpus, n_embd=64))
    data = str(write_feature_pickle(tmp_path / "train.pkl", [[c] * 8 for c in captions]))
    result = run(tmp_path, data, gpt2, batch_size=8, epochs=12, lr=3e-3, warmup=10, prefix_length=4, save_every=100,
                 log_every=5)
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0] / 10, losses
    model = load_checkpoint(result["checkpoint"])
    features = load_features(data)
    embeds = features.embeddings_at(np.arange(len(captions)))
    generated = [c[0] for c in caption_embeddings(model, load_tokenizer(gpt2), embeds, DecodingOptions("greedy"))]
    assert generated == captions
    assert Path(result["loss_plot"]).stat().st_size > 1000
    log = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()]
    assert {"loss", "lr", "samples_per_s", "tokens_per_s"} <= log[0].keys()


def test_resume_ends_with_the_same_weights(tmp_path, small_data, gpt2_dir):
    """Stopped mid-epoch and resumed, a run (with dropout) ends exactly where an uninterrupted one does."""
    whole = run(tmp_path, small_data, gpt2_dir, "whole", epochs=3)
    first = run(tmp_path, small_data, gpt2_dir, "parts", epochs=3, max_steps=4)
    assert not first["finished"] and Path(first["resume"]).is_file()
    second = run(tmp_path, small_data, gpt2_dir, "parts", epochs=3, resume=str(tmp_path / "parts"))
    assert second["finished"]
    assert_same_weights(whole["checkpoint"], second["checkpoint"], rtol=0, atol=0)
    assert [r["loss"] for r in second["history"]] == pytest.approx([r["loss"] for r in whole["history"]])


def test_resume_with_other_settings_is_one_clear_line(tmp_path, small_data, gpt2_dir):
    from clipcap.files import ClipCapError

    run(tmp_path, small_data, gpt2_dir, "a", epochs=1, max_steps=1)
    with pytest.raises(ClipCapError, match="checkpoint has prefix_length 3, model built with 5"):
        run(tmp_path, small_data, gpt2_dir, "a", epochs=1, prefix_length=5, resume=str(tmp_path / "a"))


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, small_data, no_dropout_gpt2):
    big = run(tmp_path, small_data, no_dropout_gpt2, "big", batch_size=4)
    accumulated = run(tmp_path, small_data, no_dropout_gpt2, "acc", batch_size=2, grad_accum=2, num_workers=2)  # same batches
    assert_same_weights(big["checkpoint"], accumulated["checkpoint"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path, small_data, no_dropout_gpt2):
    """torchrun with 2 CPU processes (gloo) and bs 2 gives the weights of 1 process with bs 4."""
    one = run(tmp_path, small_data, no_dropout_gpt2, "one", batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "train.py"), "--data", small_data, "--out_dir", str(tmp_path / "two"), "--gpt2",
           no_dropout_gpt2, "--bs", "2", "--epochs", "2", "--warmup", "2", "--lr", "1e-3", "--prefix_length", "3",
           "--num_workers", "0", "--log_every", "1", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x batch 2" in done.stderr + done.stdout
    assert_same_weights(one["checkpoint"], tmp_path / "two" / "coco_prefix-001.safetensors",
                        rtol=1e-5, atol=1e-6)
    two_log = [json.loads(line) for line in (tmp_path / "two" / "coco_prefix_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one["history"]], rel=1e-5)


def test_prefix_only_trains_the_mapper_alone(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, only_prefix=True, mapping_type="transformer", num_layers=1,
                 prefix_length_clip=2, epochs=1, save_original_format=True)
    saved = weights(result["checkpoint"])
    assert saved and all(k.startswith("clip_project.") for k in saved)
    original = torch.load(result["checkpoint"].replace(".safetensors", ".pt"), weights_only=True)
    from transformers import GPT2LMHeadModel

    pretrained = GPT2LMHeadModel.from_pretrained(gpt2_dir).state_dict()
    for k, v in pretrained.items():  # GPT-2 untouched, and present in the original's layout
        torch.testing.assert_close(original["gpt." + k], v, rtol=0, atol=0)


def test_bf16_autocast_trains_on_cpu(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, precision="bf16", epochs=3, lr=3e-3)
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0]


def test_compiled_training_loss_is_one_graph_equal_to_eager(gpt2_dir):
    """--compile captures the whole loss (fullgraph raises on any graph break) over changing batch shapes."""
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=16, prefix_length=3)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's capture, without C++ builds
    for lengths in ([5, 2, 3], [1, 7, 2], [4, 4, 4, 1]):
        tokens = torch.randint(1, 200, (len(lengths), max(lengths)))
        positions = (torch.arange(tokens.shape[1])[None] < torch.tensor(lengths)[:, None]).flatten().nonzero()[:, 0]
        batch = torch.randn(len(lengths), 16), tokens, positions
        torch.testing.assert_close(compiled(*batch, reduction="sum"), model(*batch, reduction="sum"))


def test_validation_keeps_the_best_checkpoint(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, val_data=small_data, epochs=2)
    val = [r for r in result["history"] if "val_loss" in r]
    assert len(val) == 2 and result["best"]["epoch"] == min(val, key=lambda r: r["val_loss"])["epoch"]
    assert (tmp_path / "run" / "coco_prefix_best.safetensors").is_file()


def test_cli_reports_a_missing_data_file_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(tmp_path / "none.pkl"),
                           "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.pkl'}: feature file not found"]


@pytest.mark.java
def test_validation_cider_is_logged(tmp_path, small_data, gpt2_dir):
    result = run(tmp_path, small_data, gpt2_dir, val_data=small_data, val_captions=5, epochs=1)
    record = [r for r in result["history"] if "val_CIDEr" in r][0]
    assert result["best"]["val_CIDEr"] == record["val_CIDEr"]
    # the same number by hand: greedy captions of the first 5 images against all their captions
    from clipcap.evaluation import score

    features = load_features(small_data)
    first = list(dict.fromkeys(features.image_ids))[:5]
    references = {i: [c for c, j in zip(features.captions, features.image_ids) if j == i] for i in first}
    rows = [int(features.image_index[features.image_ids.index(i)]) for i in first]
    model = load_checkpoint(result["checkpoint"])
    captions = caption_embeddings(model, load_tokenizer(gpt2_dir), features.embeddings_at(np.asarray(rows)),
                                  DecodingOptions("greedy"))
    expected = score([{"image_id": i, "caption": c[0]} for i, c in zip(first, captions)], references, ("CIDEr",))
    assert record["val_CIDEr"] == pytest.approx(expected["CIDEr"])


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from PIL import Image
    from skimage import data as photos

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(photos, name)()).resize((64, 48)).save(folder / f"{name}.jpg")
    return folder


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory, clip_dir, photo_dir):
    """Features of the photos made by the real extraction with the tiny CLIP, which the store records."""
    from clipcap.extraction import ImageItem, extract
    from clipcap.sources import chunked

    corpus = caption_corpus()
    items = [ImageItem(i, [corpus[i * 5 + j] for j in range(3)], str(path))
             for i, path in enumerate(sorted(photo_dir.iterdir()))]
    store = tmp_path_factory.mktemp("features") / "train"
    assert extract(chunked(items, 2), store, clip_dir, num_workers=0) == 0
    return str(store)


def test_checkpoint_names_the_clip_of_its_features_and_captions_images_without_flags(
        tmp_path, clip_store, clip_dir, gpt2_dir, photo_dir):
    result = run(tmp_path, clip_store, gpt2_dir, epochs=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == clip_dir
    assert load_checkpoint(result["checkpoint"]).config.clip_model == clip_dir
    out = tmp_path / "captions.json"
    predict(
        ["--checkpoint", result["checkpoint"], "--images", str(photo_dir), "--out", str(out), "--greedy",
         "--max_length", "5", "--device", "cpu"])
    captions = json.loads(out.read_text())
    assert sorted(c["image_id"] for c in captions) == sorted(str(p) for p in photo_dir.iterdir())


def test_clip_contradictions_stop_before_training(tmp_path, clip_store, clip_dir, gpt2_dir):
    from clipcap.featureset import save_original_pickle
    from clipcap.files import ClipCapError

    with pytest.raises(ClipCapError) as error:
        run(tmp_path, clip_store, gpt2_dir, "flag", clip_model="ViT-B/32")
    assert str(error.value) == f"--clip_model ViT-B/32: {clip_store} was made with CLIP {clip_dir}"
    assert not (tmp_path / "flag").exists()  # nothing written, nothing trained

    val = load_features(clip_store)
    val.clip_model = "ViT-L/14"
    save_original_pickle(val, tmp_path / "val.pkl")
    with pytest.raises(ClipCapError) as error:
        run(tmp_path, clip_store, gpt2_dir, "val", val_data=str(tmp_path / "val.pkl"))
    assert str(error.value) == (f"--val_data {tmp_path / 'val.pkl'}: made with CLIP ViT-L/14, "
                                f"the training features with {clip_dir}")
    assert not (tmp_path / "val").exists()
    wide = write_feature_pickle(tmp_path / "wide.pkl", [["a dog on a bench."]], dim=24)
    with pytest.raises(ClipCapError, match=f"--val_data {wide}: 24-d embeddings, but the training features are 16-d"):
        run(tmp_path, clip_store, gpt2_dir, "wide", val_data=str(wide))

    # One CLIP under two names is no contradiction, and the flag is what the checkpoint records.
    same = load_features(clip_store)
    same.clip_model = "openai/clip-vit-base-patch32"
    save_original_pickle(same, tmp_path / "same.pkl")
    result = run(tmp_path, str(tmp_path / "same.pkl"), gpt2_dir, "same", clip_model="ViT-B/32", max_steps=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "ViT-B/32"


def test_features_without_a_clip_fall_back_to_the_clip_of_their_width(tmp_path, gpt2_dir, capsys):
    corpus = caption_corpus()
    data = str(write_feature_pickle(tmp_path / "rn.pkl", [[corpus[i], corpus[i + 20]] for i in range(4)], dim=640))
    result = run(tmp_path, data, gpt2_dir, "rn", max_steps=1)
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "RN50x4"
    assert f"{data} does not name its CLIP: recording RN50x4, the CLIP of 640-d embeddings" in capsys.readouterr().out

    tiny = str(write_feature_pickle(tmp_path / "tiny.pkl", [[corpus[i], corpus[i + 20]] for i in range(4)]))
    run(tmp_path, tiny, gpt2_dir, "tiny", max_steps=1)
    assert "no known CLIP gives 16-d embeddings" in capsys.readouterr().out
    result = run(tmp_path, tiny, gpt2_dir, "named", max_steps=1, clip_model="RN50")
    assert json.loads(Path(result["config"]).read_text())["clip_model"] == "RN50"
    assert "does not name its CLIP" not in capsys.readouterr().out
