"""Hugging Face Hub in and out: saved folders, repo ids from the cache, the released weights converted, model cards."""
from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants
from safetensors import safe_open

from clipcap import Captioner
from clipcap.checkpoint import LEGACY_BUFFER, load_checkpoint
from clipcap.cli.convert import main as convert
from clipcap.files import ClipCapError
from clipcap.hub import model_card, resolve_checkpoint
from clipcap.model import ClipCapConfig, build_model, load_tokenizer

DECODING = {"max_length": 8, "beam_size": 3}


def tiny_captioner(gpt2_dir, prefix_size=16, **config) -> Captioner:
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, prefix_size=prefix_size, prefix_length=4, **config)).eval()
    return Captioner(model, load_tokenizer(gpt2_dir), model.config.clip_model)


def same_captions(a: Captioner, b: Captioner, dim: int = 16) -> None:
    embeds = torch.randn(3, dim, generator=torch.Generator().manual_seed(1))
    for strategy in ("greedy", "beam"):
        assert a.caption_embeddings(embeds, strategy=strategy, **DECODING) == \
            b.caption_embeddings(embeds, strategy=strategy, **DECODING)


def stored_keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("only_prefix", [False, True])
def test_save_pretrained_then_from_pretrained(tmp_path, gpt2_dir, only_prefix):
    original = tiny_captioner(gpt2_dir, only_prefix=only_prefix, mapping_type="transformer", prefix_length_clip=3,
                              num_layers=1, clip_model="my-clip")
    folder = original.save_pretrained(tmp_path / "model", dataset="my photos")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == original.model.config.to_dict()
    assert all(k.startswith("clip_project.") for k in stored_keys(folder)) == only_prefix
    loaded = Captioner.from_pretrained(folder)
    assert loaded.model.config == original.model.config and loaded.clip_model == "my-clip"
    same_captions(original, loaded)
    assert Captioner.from_checkpoint(folder / "model.safetensors").model.config == original.model.config


def fake_hub_cache(cache, repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A repo as snapshot_download leaves it in the cache: blobs by hash, snapshot links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode (huggingface_hub reads the variables on import)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_resolves_from_the_cache_offline(tmp_path, gpt2_dir, offline_hub):
    original = tiny_captioner(gpt2_dir, only_prefix=True)
    snapshot = fake_hub_cache(offline_hub, "someone/clipcap-tiny", original.save_pretrained(tmp_path / "model"))
    assert resolve_checkpoint("someone/clipcap-tiny") == snapshot / "model.safetensors"
    assert resolve_checkpoint("someone/clipcap-tiny@main") == snapshot / "model.safetensors"
    loaded = Captioner.from_pretrained("someone/clipcap-tiny")
    assert loaded.model.config == original.model.config
    same_captions(original, loaded)
    with pytest.raises(ClipCapError, match=r"^someone/not-cached: no such local file or folder, and not "
                                           r"downloadable from the Hugging Face Hub \(LocalEntryNotFoundError"):
        Captioner.from_pretrained("someone/not-cached")


def test_commands_take_a_repo_id_or_a_saved_folder(tmp_path, gpt2_dir, clip_dir, offline_hub):
    """predict's and the web page's --checkpoint: a Hub id (from the cache, offline) or a save_pretrained folder."""
    import io

    from conftest import write_feature_pickle
    from fastapi.testclient import TestClient
    from PIL import Image

    from clipcap.app import create_app
    from clipcap.cli.predict import main as predict
    from clipcap.data import load_features

    original = tiny_captioner(gpt2_dir, clip_model=clip_dir)
    folder = original.save_pretrained(tmp_path / "model")
    fake_hub_cache(offline_hub, "someone/clipcap-tiny", folder)
    features = str(write_feature_pickle(tmp_path / "f.pkl", [["a cat."], ["a dog."]]))
    expected = original.caption_features(load_features(features), max_length=8)
    for checkpoint in ("someone/clipcap-tiny", str(folder)):
        predict(["--checkpoint", checkpoint, "--features", features, "--max_length", "8",
                 "--out", str(tmp_path / "out.json")])
        assert json.loads((tmp_path / "out.json").read_text()) == expected

    client = TestClient(create_app(["someone/clipcap-tiny", str(folder)]))
    assert client.get("/api/options").json()["checkpoints"] == ["someone/clipcap-tiny", str(folder)]
    coffee = Image.open(io.BytesIO(client.get("/samples/coffee.png").content))
    for checkpoint in ("someone/clipcap-tiny", str(folder)):
        answer = client.post("/api/caption", data={"checkpoint": checkpoint, "sample": "coffee", "max_length": "8"})
        assert answer.json()["captions"] == original.caption([coffee], max_length=8)[0]
    with pytest.raises(ClipCapError, match=r"^someone/not-cached: no such local file or folder"):
        create_app(["someone/not-cached"])


def test_local_names_are_never_taken_for_repo_ids(tmp_path, offline_hub):
    with pytest.raises(ClipCapError, match=r"runs/coco\.pt: checkpoint not found"):
        load_checkpoint(resolve_checkpoint("runs/coco.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipCapError, match=r"empty: folder has no model\.safetensors"):
        resolve_checkpoint(tmp_path / "empty")


def released_state(gpt2_dir, **config) -> tuple[dict, torch.nn.Module]:
    """A whole-model state dict as the original saved it (GPT-2 included, old transformers' buffers)."""
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(gpt2=gpt2_dir, **config)).eval()
    state = model.state_dict()
    for i in range(model.gpt.config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state, model


def test_convert_released_mlp_weights(tmp_path, gpt2_dir, capsys):
    state, model = released_state(gpt2_dir, prefix_size=512, prefix_length=10)
    torch.save(state, tmp_path / "coco_weights.pt")
    out = convert([str(tmp_path / "coco_weights.pt"), str(tmp_path / "coco_mlp"), "--gpt2", gpt2_dir])
    config = json.loads((out / "config.json").read_text())
    assert (config["mapping_type"], config["prefix_length"], config["prefix_size"]) == ("mlp", 10, 512)
    assert (config["clip_model"], config["normalize_prefix"], config["only_prefix"]) == ("ViT-B/32", False, False)
    assert any(k.startswith("gpt.transformer.h.") for k in stored_keys(out))  # fine-tuned GPT-2 is stored
    assert not any(LEGACY_BUFFER.match(k) for k in stored_keys(out))
    card = (out / "README.md").read_text()
    assert "COCO" in card and "`coco_weights.pt`" in card and "fine-tuned (stored here)" in card
    captioner = Captioner(model, load_tokenizer(gpt2_dir), "ViT-B/32")
    same_captions(captioner, Captioner.from_pretrained(out), dim=512)
    assert "CLIP ViT-B/32" in capsys.readouterr().out
    with pytest.raises(ClipCapError, match="already holds a model.safetensors"):
        convert([str(tmp_path / "coco_weights.pt"), str(out)])


def test_convert_released_transformer_weights(tmp_path, gpt2_dir):
    state, model = released_state(gpt2_dir, mapping_type="transformer", prefix_size=640, prefix_length=40,
                                  prefix_length_clip=40, num_layers=8, only_prefix=True, normalize_prefix=True)
    torch.save(state, tmp_path / "transformer_weights.pt")
    out = convert([str(tmp_path / "transformer_weights.pt"), str(tmp_path / "coco_transformer"), "--gpt2", gpt2_dir])
    config = json.loads((out / "config.json").read_text())
    assert (config["mapping_type"], config["prefix_length"], config["prefix_length_clip"], config["num_layers"]) == \
        ("transformer", 40, 40, 8)
    assert (config["clip_model"], config["normalize_prefix"], config["only_prefix"]) == ("RN50x4", True, True)
    assert all(k.startswith("clip_project.") for k in stored_keys(out))  # GPT-2 loads by name
    card = (out / "README.md").read_text()
    assert "COCO" in card and "`RN50x4` (640-d embeddings, L2-normalised)" in card and "8 layers" in card
    assert "clipcap[clip]" not in card  # ResNet CLIPs need no extra package
    captioner = Captioner(model, load_tokenizer(gpt2_dir), "RN50x4")
    same_captions(captioner, Captioner.from_pretrained(out), dim=640)


def test_model_card_fields(tmp_path, gpt2_dir):
    captioner = tiny_captioner(gpt2_dir, only_prefix=True)
    captioner.model.config.gpt2 = "gpt2"  # as a real model records it: a Hub name
    metrics = {"Bleu_4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12}  # evaluate.py's units
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    card = model_card(captioner.model.config, dataset="Flickr30k", recipe="recipes/coco_mlp.sh",
                      metrics=json.loads((tmp_path / "metrics.json").read_text()), repo_id="me/clipcap")
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "clipcap"
    assert {"image-captioning", "clipcap"} <= set(meta["tags"]) and meta["base_model"] == "gpt2"
    for text in ("arXiv 2111.09734", "Mokady", "Hertz", "Bermano", "| training data | Flickr30k |",
                 "`ViT-B/32` (16-d embeddings)", "`gpt2` (2 layers, width 32), frozen", "MLP (CLIP embedding -> 4 prefix",
                 "`recipes/coco_mlp.sh`", "| Bleu_4 | METEOR | CIDEr | SPICE |", "| 32.15 | 27.10 | 108.35 | 20.12 |",
                 'Captioner.from_pretrained("me/clipcap")', "MIT"):
        assert text in card, text
    folder = captioner.save_pretrained(tmp_path / "m", metrics=tmp_path / "metrics.json")
    assert "| 32.15 | 27.10 | 108.35 | 20.12 |" in (folder / "README.md").read_text()
    (tmp_path / "bad.json").write_text('{"CIDEr": "high"}')
    with pytest.raises(ClipCapError, match=r"bad\.json: expected evaluate\.py's metrics JSON"):
        captioner.save_pretrained(tmp_path / "m2", metrics=tmp_path / "bad.json")


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, gpt2_dir, monkeypatch):
    """huggingface_hub's own calls do the upload; what they are given must be a complete, loadable folder."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs.get("exist_ok")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, None))
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return SimpleNamespace(commit_url="https://huggingface.co/me/clipcap/commit/abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    captioner = tiny_captioner(gpt2_dir, only_prefix=True)
    assert captioner.push_to_hub("me/clipcap", dataset="COCO") == "https://huggingface.co/me/clipcap/commit/abc"
    assert calls == [("create_repo", "me/clipcap", True), ("upload_folder", "me/clipcap", None)]
    assert 'from_pretrained("me/clipcap")' in (tmp_path / "uploaded" / "README.md").read_text()
    same_captions(captioner, Captioner.from_pretrained(tmp_path / "uploaded"))
