"""Checkpoint formats: ours (safetensors + config) and the original's (.pt state_dict, no config)."""
import json

import pytest
import torch
from safetensors import safe_open

from clipcap.checkpoint import (
    config_path_for,
    infer_config,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_config,
)
from clipcap.files import ClipCapError
from clipcap.model import ClipCapConfig, build_model


def tiny(gpt2_dir, **config):
    torch.manual_seed(0)
    return build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=4, **config)).eval()


def same_outputs(a, b):
    clip, tokens = torch.randn(2, 16), torch.randint(0, 200, (2, 5))
    torch.testing.assert_close(a(clip, tokens), b(clip, tokens))


def test_config_path_for():
    """Each .pt has its own config, never one shared by a run (which a later run could change)."""
    assert config_path_for("out/coco_prefix-009.pt").name == "coco_prefix-009.json"
    assert config_path_for("out/coco_prefix_best.pt").name == "coco_prefix_best.json"


def test_safetensors_round_trip_is_self_contained(tmp_path, gpt2_dir):
    model = tiny(gpt2_dir, mapping_type="transformer", prefix_length_clip=3, num_layers=2, normalize_prefix=True)
    path = save_checkpoint(model, tmp_path / "run-000.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    same_outputs(model, loaded)


def test_prefix_only_saves_only_the_mapper(tmp_path, gpt2_dir):
    model = tiny(gpt2_dir, only_prefix=True)
    path = save_checkpoint(model, tmp_path / "p-000.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("clip_project.") for k in f.keys())
    loaded = load_checkpoint(path)  # GPT-2 comes from config.lm
    same_outputs(model, loaded)
    assert path.stat().st_size < sum(p.numel() * 4 for p in model.parameters()) / 2


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_original_pt_without_config_loads_by_shape(tmp_path, gpt2_dir, mapping):
    model = tiny(gpt2_dir, mapping_type=mapping, prefix_length_clip=5, num_layers=3)
    state = model.state_dict()
    for i in range(model.gpt.config.n_layer):  # buffers that old transformers saved
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "coco_prefix-009.pt")
    config = infer_config(state)
    assert (config.mapping_type, config.prefix_length, config.prefix_size) == (mapping, 4, 16)
    if mapping == "transformer":
        assert (config.prefix_length_clip, config.num_layers, config.only_prefix) == (5, 3, True)
    assert config.lm_config["n_embd"] == 32 and config.lm_config["n_layer"] == 2
    loaded = load_checkpoint(tmp_path / "coco_prefix-009.pt", lm=gpt2_dir)
    same_outputs(model, loaded)


def test_pt_uses_its_own_config(tmp_path, gpt2_dir):
    """save_checkpoint pairs a .pt with its config; a run-wide config beside it is not read."""
    model = tiny(gpt2_dir, normalize_prefix=True)
    save_checkpoint(model, tmp_path / "run-003.pt")
    assert (tmp_path / "run-003.json").is_file()
    assert load_checkpoint(tmp_path / "run-003.pt").config.normalize_prefix
    save_config(tiny(gpt2_dir).config, tmp_path / "run_config.json")  # a later run's, with normalize_prefix off
    assert load_checkpoint(tmp_path / "run-003.pt").config.normalize_prefix


def test_mismatched_checkpoint_is_one_clear_line(tmp_path, gpt2_dir):
    save_checkpoint(tiny(gpt2_dir), tmp_path / "a.pt")
    other = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=3))
    with pytest.raises(ClipCapError, match=r"a\.pt: checkpoint has prefix_length 4, model built with 3"):
        load_weights(other, tmp_path / "a.pt")
    save_checkpoint(tiny(gpt2_dir, only_prefix=True), tmp_path / "b.safetensors")
    with pytest.raises(ClipCapError, match=r"b\.safetensors: checkpoint has prefix_length 4, model built with 3"):
        load_weights(other, tmp_path / "b.safetensors")


def test_not_a_clipcap_checkpoint(tmp_path, gpt2_dir):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ClipCapError, match=r"x\.pt: not a ClipCap checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    (tmp_path / "y.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ClipCapError, match=r"y\.safetensors: not a readable checkpoint"):
        load_checkpoint(tmp_path / "y.safetensors")
    with pytest.raises(ClipCapError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, gpt2_dir, monkeypatch):
    model = tiny(gpt2_dir)
    path = save_checkpoint(model, tmp_path / "m.pt")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt"]  # no temporary file left


def test_config_json_is_plain(tmp_path, gpt2_dir):
    model = tiny(gpt2_dir)
    save_config(model.config, tmp_path / "c.json")
    values = json.loads((tmp_path / "c.json").read_text())
    assert values["prefix_length"] == 4 and values["lm_config"]["n_embd"] == 32
    assert values["lm_config"]["model_type"] == "gpt2" and values["lm"] == gpt2_dir and values["lm_bos"] is False


def test_written_files_get_the_usual_mode(tmp_path, gpt2_dir):
    import os

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny(gpt2_dir), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def released_layout(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Keys, shapes and dtypes of a state dict saved by the original with transformers 4.10."""
    layout = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    n = model.gpt.config.n_positions
    for i in range(model.gpt.config.n_layer):
        layout[f"gpt.transformer.h.{i}.attn.bias"] = ((1, 1, n, n), torch.uint8)
        layout[f"gpt.transformer.h.{i}.attn.masked_bias"] = ((), torch.float32)
    return layout


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_original_format_has_the_released_keys_and_buffers(tmp_path, gpt2_dir, mapping):
    model = tiny(gpt2_dir, mapping_type=mapping, prefix_length_clip=3, num_layers=2, only_prefix=mapping == "transformer")
    save_checkpoint(model, tmp_path / "run-000.pt")
    saved = torch.load(tmp_path / "run-000.pt", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in saved.items()} == released_layout(model)
    n = model.gpt.config.n_positions
    assert torch.equal(saved["gpt.transformer.h.1.attn.bias"][0, 0], torch.tril(torch.ones(n, n, dtype=torch.uint8)))
    assert float(saved["gpt.transformer.h.0.attn.masked_bias"]) == -1e4
    assert list(saved).index("gpt.transformer.h.0.attn.bias") == list(saved).index("gpt.transformer.h.0.ln_1.bias") + 1
    same_outputs(model, load_checkpoint(tmp_path / "run-000.pt", lm=gpt2_dir))  # and it loads back here


def with_config(path, **changes):
    """Rewrite a .safetensors checkpoint's config (as a hand-edited or crafted file would be); returns it."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["clipcap_config"])
    for key, value in changes.items():
        if key.startswith("lm_config."):
            config["lm_config"][key.removeprefix("lm_config.")] = value
        else:
            config[key] = value
    save_file(load_file(str(path)), str(path), metadata={"clipcap_config": json.dumps(config)})
    return path


@pytest.mark.parametrize("only_prefix, changes, message", [  # only_prefix "mlp": a prefix-only MLP
    (False, {"lm_config.n_head": 4}, "lm_config n_head 4 disagrees with .*gpt2.*, the LM these weights were "
                                     "fine-tuned from, which has 2 \\(a head count is in no weight's shape\\)"),
    (False, {"lm_config.n_head": 3, "lm": "/elsewhere/gpt2"}, "lm_config n_head 3 does not divide the LM's width 32"),
    (True, {"num_heads": 3}, "config num_heads 3 does not divide the mapper's width 32"),
    (True, {"num_heads": 10**9}, "config num_heads 1000000000 does not divide the mapper's width 32"),
    (True, {"prefix_length": 10**12}, "config prefix_length 1000000000000 does not fit the weights, whose shapes "
                                      "give 4"),
    (True, {"prefix_length_clip": 7}, "config prefix_length_clip 7 does not fit the weights, whose shapes give 3"),
    (True, {"num_layers": 10**9}, "config num_layers 1000000000 does not fit the weights, whose shapes give 2"),
    (True, {"prefix_size": 512}, "config prefix_size 512 does not fit the weights, whose shapes give 16"),
    (True, {"mapping_type": "mlp"}, "config mapping_type mlp does not fit the weights, whose shapes give transformer"),
    ("mlp", {"lm_config.n_embd": 64}, "the mapper was trained for an LM of width 64, but .* has width 32; pass "
                                      "--lm naming the LM it was trained with"),
    (False, {"lm_config.n_layer": 10**9}, "config lm_config n_layer 1000000000 does not fit the weights, whose "
                                          "shapes give 2"),
    (False, {"lm_config.n_positions": 10**12}, "config lm_config does not fit the weights: gpt.transformer.wpe.weight "
                                               "has shape \\(128, 32\\), the config gives \\(1000000000000, 32\\)"),
    (False, {"lm_config.n_inner": 48}, "config lm_config does not fit the weights: gpt.transformer.h.0.mlp.c_fc"),
    (False, {"lm_config.n_embd": 0}, "config lm_config n_embd must be a positive integer, got 0"),
    (False, {"lm_config.auto_map": {"AutoModel": "x.Y"}}, "config lm_config has an unknown field 'auto_map'"),
    (False, {"lm_config.model_type": "clip"}, "config lm_config model_type 'clip' is not a causal LM"),
])
def test_config_that_does_not_fit_its_weights_is_one_line(tmp_path, gpt2_dir, monkeypatch, only_prefix, changes,
                                                           message):
    """Head counts are in no tensor shape: checked against the widths they split and, for a fine-tuned GPT-2,
    against the GPT-2 the config names. Every size is checked against the shapes before anything is built."""
    import clipcap.checkpoint

    transformer = dict(mapping_type="transformer", prefix_length_clip=3, num_layers=2, num_heads=2)
    model = tiny(gpt2_dir, only_prefix=True) if only_prefix == "mlp" else tiny(gpt2_dir, **transformer,
                                                                                only_prefix=only_prefix)
    path = with_config(save_checkpoint(model, tmp_path / "m.safetensors"), **changes)
    monkeypatch.setattr(clipcap.checkpoint, "build_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ClipCapError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{path}: ")


def test_true_config_still_loads_after_the_checks(tmp_path, gpt2_dir):
    for only_prefix in (False, True):
        model = tiny(gpt2_dir, mapping_type="transformer", prefix_length_clip=3, num_layers=2, num_heads=4,
                     only_prefix=only_prefix)
        same_outputs(model, load_checkpoint(save_checkpoint(model, tmp_path / f"m{only_prefix}.safetensors")))


def test_relative_backbone_paths_are_recorded_absolute(tmp_path, gpt2_dir, clip_dir, monkeypatch):
    """A checkpoint written in one folder, naming its backbones relative to it, loads from any other."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(gpt2_dir, project / "backbones" / "gpt2")
    monkeypatch.chdir(project)
    model = tiny("backbones/gpt2", clip_model=clip_dir, only_prefix=True)
    assert model.config.lm == str(project / "backbones" / "gpt2")
    model.config.lm = "backbones/gpt2"  # set after the fact: still recorded absolute
    save_checkpoint(model, project / "m.safetensors")
    save_checkpoint(model, project / "m.pt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in ("m.safetensors", "m.pt"):
        loaded = load_checkpoint(project / name)
        assert loaded.config.lm == str(project / "backbones" / "gpt2") and loaded.config.clip_model == clip_dir
        same_outputs(model, loaded)
    assert json.loads((project / "m.json").read_text())["lm"] == str(project / "backbones" / "gpt2")
