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
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=prefix_size, prefix_length=4, **config)).eval()
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
    model = build_model(ClipCapConfig(lm=gpt2_dir, **config)).eval()
    state = model.state_dict()
    for i in range(model.gpt.config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state, model


def test_convert_released_mlp_weights(tmp_path, gpt2_dir, capsys):
    state, model = released_state(gpt2_dir, prefix_size=512, prefix_length=10)
    torch.save(state, tmp_path / "coco_weights.pt")
    out = convert([str(tmp_path / "coco_weights.pt"), str(tmp_path / "coco_mlp"), "--lm", gpt2_dir])
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
    convert([str(tmp_path / "coco_weights.pt"), str(out), "--lm", gpt2_dir, "--dataset", "COCO again"])
    assert "replaced the model in" in capsys.readouterr().out  # its own earlier output is replaced
    assert "| training data | COCO again |" in (out / "README.md").read_text()
    with pytest.raises(ClipCapError, match="model.safetensors: is the input checkpoint"):
        convert([str(out / "model.safetensors"), str(out)])


@pytest.mark.parametrize("foreign", ["README.md", "config.json", "model.safetensors"])
def test_writing_a_model_never_replaces_a_foreign_file(tmp_path, gpt2_dir, foreign):
    """clipcap-convert and save_pretrained into a folder holding someone's README.md (a project's root,
    say), config.json or weights: refused, the file untouched."""
    state, _ = released_state(gpt2_dir, prefix_size=16, prefix_length=4)
    torch.save(state, tmp_path / "coco_weights.pt")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / foreign).write_text("# My project\n" if foreign == "README.md" else '{"model_type": "bert"}')
    before = (folder / foreign).read_bytes()
    message = f"{folder / foreign}: exists and is not a ClipCap model's"
    with pytest.raises(ClipCapError, match=message):
        convert([str(tmp_path / "coco_weights.pt"), str(folder), "--lm", gpt2_dir])
    with pytest.raises(ClipCapError, match=message):
        tiny_captioner(gpt2_dir).save_pretrained(folder)
    assert (folder / foreign).read_bytes() == before and len(list(folder.iterdir())) == 1


def test_convert_names_an_unknown_clip_unknown(tmp_path, gpt2_dir):
    """A 128-d checkpoint comes from no CLIP we know: recorded as unknown, never as ViT-B/32, until named."""
    state, _ = released_state(gpt2_dir, prefix_size=128, prefix_length=4)
    torch.save(state, tmp_path / "mine.pt")
    out = convert([str(tmp_path / "mine.pt"), str(tmp_path / "mine"), "--lm", gpt2_dir])
    assert json.loads((out / "config.json").read_text())["clip_model"] == "unknown"
    card = (out / "README.md").read_text()
    assert "| CLIP image encoder | unknown (128-d embeddings; name it with `clipcap-convert --clip_model NAME`) |" \
        in card
    assert "ViT-B/32" not in card
    with pytest.raises(ClipCapError, match="does not name the CLIP of its 128-d embeddings: name it with --clip_model"):
        Captioner.from_pretrained(out).embed([])
    named = convert([str(tmp_path / "mine.pt"), str(tmp_path / "named"), "--lm", gpt2_dir, "--clip_model", "my-clip"])
    assert json.loads((named / "config.json").read_text())["clip_model"] == "my-clip"


def test_convert_records_backbones_that_load_anywhere(tmp_path, gpt2_dir, monkeypatch, capsys):
    """A relative --lm is recorded absolute, and the command says the folder is not for uploading."""
    state, _ = released_state(gpt2_dir, prefix_size=16, prefix_length=4)
    torch.save(state, tmp_path / "coco_weights.pt")
    shutil.copytree(gpt2_dir, tmp_path / "backbones" / "gpt2")
    monkeypatch.chdir(tmp_path)
    out = convert(["coco_weights.pt", "converted", "--lm", "backbones/gpt2"])
    recorded = str(tmp_path / "backbones" / "gpt2")
    assert json.loads((out / "config.json").read_text())["lm"] == recorded
    assert f"`{recorded}`" in (out / "README.md").read_text()
    note = f"note: {recorded} is a local path, which load on this machine only: do not upload this folder"
    assert note in capsys.readouterr().out
    monkeypatch.chdir(out)
    assert Captioner.from_pretrained(".").model.config.lm == recorded


def test_convert_released_transformer_weights(tmp_path, gpt2_dir):
    state, model = released_state(gpt2_dir, mapping_type="transformer", prefix_size=640, prefix_length=40,
                                  prefix_length_clip=40, num_layers=8, only_prefix=True, normalize_prefix=True)
    torch.save(state, tmp_path / "transformer_weights.pt")
    out = convert([str(tmp_path / "transformer_weights.pt"), str(tmp_path / "coco_transformer"), "--lm", gpt2_dir])
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
    captioner.model.config.lm = "gpt2"  # as a real model records it: a Hub name
    metrics = {"Bleu_4": 32.15, "METEOR": 27.1, "CIDEr": 108.35, "SPICE": 20.12}  # evaluate.py's units
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    card = model_card(captioner.model.config, dataset="Flickr30k", recipe="recipes/coco_mlp.sh",
                      metrics=json.loads((tmp_path / "metrics.json").read_text()), repo_id="me/clipcap")
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "clipcap"
    assert {"image-captioning", "clipcap"} <= set(meta["tags"]) and meta["base_model"] == "gpt2"
    for text in ("arXiv 2111.09734", "Mokady", "Hertz", "Bermano", "| training data | Flickr30k |",
                 "`ViT-B/32` (16-d embeddings)", "`gpt2` (gpt2, 2 layers, width 32), frozen",
                 "MLP (CLIP embedding -> 4 prefix",
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
    with pytest.raises(ClipCapError, match=rf"^me/clipcap: not pushed: its lm '{gpt2_dir}' would load for no one "
                                           r'else; name the Hugging Face Hub id it stands for: push_to_hub\(\.\.\., '
                                           r'lm="gpt2"\)$'):
        captioner.push_to_hub("me/clipcap", dataset="COCO")
    assert calls == []
    captioner.clip_model = str(tmp_path)
    with pytest.raises(ClipCapError, match="its clip_model .* would load for no one else"):
        captioner.push_to_hub("me/clipcap", lm="gpt2")
    assert captioner.push_to_hub("me/clipcap", dataset="COCO", lm="gpt2", clip_model="ViT-B/32") == \
        "https://huggingface.co/me/clipcap/commit/abc"
    assert calls == [("create_repo", "me/clipcap", True), ("upload_folder", "me/clipcap", None)]
    assert 'from_pretrained("me/clipcap")' in (tmp_path / "uploaded" / "README.md").read_text()
    assert json.loads((tmp_path / "uploaded" / "config.json").read_text())["lm"] == "gpt2"
    same_captions(captioner, Captioner.from_pretrained(tmp_path / "uploaded", lm=gpt2_dir))


@pytest.fixture(params=["refused", "silent"])
def unreachable_hub(request, tmp_path, monkeypatch):
    """HF_ENDPOINT at a local port that refuses connections, or at one whose backlog is full, so that a
    connection hangs as behind a firewall that drops packets; offline mode not set; an empty cache."""
    import socket

    from clipcap import hub_access

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    filler = None
    if request.param == "silent":
        server.listen(0)
        filler = socket.create_connection(server.getsockname())  # takes the one place in the backlog
    else:
        server.close()
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_access, "_unreachable", None)
    monkeypatch.setattr(hub_access, "PROBE_SECONDS", 1.0)
    yield cache
    if filler is not None:
        filler.close()
    server.close()


def test_unreachable_hub_fails_fast_and_the_cache_still_loads(tmp_path, gpt2_dir, unreachable_hub, capsys):
    """One short probe instead of minutes of retries: then offline, so a cached model loads and the rest fails
    at once, saying why."""
    from clipcap.model import build_model

    hint = r"the Hugging Face Hub \(http://127\.0\.0\.1:\d+\) (is unreachable \(.*\)|did not answer within 1 s)"
    with pytest.raises(ClipCapError, match=rf"^LM someone/gpt2-mini: no such folder, .*; {hint}, so only the local "
                                           r"cache was searched: load it once where the Hub is reachable"):
        load_tokenizer("someone/gpt2-mini")
    assert capsys.readouterr().err.startswith("note: the Hugging Face Hub")
    with pytest.raises(ClipCapError, match=rf"^LM someone/gpt2-mini: cannot load its config .*; {hint}"):
        build_model(ClipCapConfig(lm="someone/gpt2-mini"))
    with pytest.raises(ClipCapError, match=rf"^someone/clipcap-mini: no such local file or folder, .*; {hint}"):
        Captioner.from_pretrained("someone/clipcap-mini")
    original = tiny_captioner(gpt2_dir, only_prefix=True)
    fake_hub_cache(unreachable_hub, "someone/clipcap-tiny", original.save_pretrained(tmp_path / "model"))
    same_captions(original, Captioner.from_pretrained("someone/clipcap-tiny"))


def test_nothing_a_checkpoint_names_runs_code(tmp_path, gpt2_dir, monkeypatch):
    """A checkpoint whose config names GPT-2 and CLIP folders that carry code (``auto_map`` and a module, as
    Hub repos with custom code do): loading and captioning never run it, nor ask whether to (transformers
    asks on a terminal; here the question is answered yes, which would run it)."""
    marker = tmp_path / "code ran"
    module = (f"open({str(marker)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n\n\n"
              "class Custom(PretrainedConfig):\n    model_type = 'custom'\n")
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(gpt2_dir, gpt2)
    clip = tmp_path / "clip"
    clip.mkdir()
    for folder in (gpt2, clip):
        (folder / "custom.py").write_text(module)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "custom.Custom",
                                                                         "AutoModelForCausalLM": "custom.Custom"}}))
    (clip / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "custom.Custom"}}))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    for only_prefix in (True, False):
        captioner = tiny_captioner(str(gpt2), only_prefix=only_prefix, clip_model=str(clip))
        folder = captioner.save_pretrained(tmp_path / f"model-{only_prefix}")
        loaded = Captioner.from_pretrained(folder)
        assert loaded.caption_embeddings(torch.zeros(1, 16), max_length=4)
        with pytest.raises(ClipCapError, match=rf"^{clip}: not a CLIP checkpoint directory \("):
            loaded.embed([])
    assert not marker.exists()
