"""OpenAI's CLIP towers from OpenAI's own files, against OpenAI's own code, and their download.

The oracle is ``clip/model.py`` from the openai-clip wheel (``pip install --no-deps
openai-clip==1.0.1``), loaded by file path: its package ``clip`` does not import beside current
setuptools. Tiny random CLIPs are built with it and saved as OpenAI ships theirs: fp16 weights in
a traced TorchScript archive, with ``input_resolution``, ``context_length`` and ``vocab_size``.
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import http.server
import importlib.metadata
import importlib.util
import json
import pickle
import sys
import threading
import types
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap import resnet_clip, torchscript
from clipcap.encoder import Preprocess, load_image_encoder
from clipcap.extraction import model_tag
from clipcap.files import ClipCapError
from clipcap.text_encoder import load_text_encoder
from testing.tiny import make_tiny_resnet_clip

# (vision_layers, vision_width, image_resolution, vision_patch_size): OpenAI's CLIP arguments
# OpenAI's code traced and saved the TorchScript way, whose warnings are not this test's concern.
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.(save|trace_method|script)` is deprecated"
                                         ":DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")]
RESNETS = [((1, 2, 1, 1), 8, 64, None), ((2, 1, 1, 1), 16, 96, None)]
VIT = (2, 64, 32, 16)


@pytest.fixture(scope="module")
def openai_model():
    """OpenAI's clip/model.py as a module, never imported as ``clip``."""
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the oracle needs OpenAI's model.py: pip install --no-deps openai-clip==1.0.1")
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openai_clip(model_py, path, vision_layers, vision_width, resolution, patch_size, traced=True, text=None):
    """Save a tiny random CLIP made by OpenAI's code at ``path``, as OpenAI ships it; returns OpenAI's
    model in float32 (the saved fp16 weights, widened): the reference. ``text`` replaces the text
    tower's arguments (OpenAI's files have 64-channel heads, the width // 64 its loader infers)."""
    torch.manual_seed(0)
    text = {"context_length": 8, "vocab_size": 50, "transformer_width": 16, "transformer_heads": 2,
            "transformer_layers": 1, **(text or {})}
    model = model_py.CLIP(embed_dim=24, image_resolution=resolution, vision_layers=vision_layers,
                          vision_width=vision_width, vision_patch_size=patch_size, **text)
    for module in model.modules():  # so that the embedding depends on the image, and every branch counts
        if isinstance(module, torch.nn.Conv2d) and patch_size is None:  # He, not PyTorch's shrinking default
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):  # OpenAI zero-initialises bn3
            for t in (module.weight, module.bias, module.running_mean):
                t.data.uniform_(-1, 1)
            module.running_var.data.uniform_(0.5, 2)
    for key, value in dict(input_resolution=resolution, context_length=text["context_length"],
                           vocab_size=text["vocab_size"]).items():
        model.__dict__.pop(key, None)  # CLIP keeps two of them as plain attributes
        model.register_buffer(key, torch.tensor(value))
    model_py.convert_weights(model)
    model.eval()
    if traced:
        example = torch.randn(1, 3, resolution, resolution).half()
        torch.jit.save(torch.jit.trace_module(model, {"encode_image": example}), str(path))
    else:
        torch.save(model.state_dict(), path)
    return model.float()


def random_images(resolution: int, n: int = 3) -> torch.Tensor:
    """Normalised pixels: noise around a colour of each image's own (pure noise pools to the same features)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, resolution, resolution, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


@pytest.mark.parametrize("arch", [*RESNETS, VIT], ids=["rn-64px", "rn-96px", "vit-32px"])
def test_openai_files_give_openai_embeddings(openai_model, tmp_path, arch):
    path = tmp_path / "clip.pt"
    reference = openai_clip(openai_model, path, *arch)
    assert torch.jit.load(path).state_dict()["visual.conv1.weight"].dtype == torch.float16
    ours = resnet_clip.load(str(path))  # strict: every visual.* weight has its place
    resolution = arch[2]
    assert ours.input_resolution == resolution and ours.output_dim == 24
    assert isinstance(ours, resnet_clip.ModifiedResNet if arch[3] is None else resnet_clip.VisionTransformer)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ours.parameters())
    images = random_images(resolution)
    with torch.no_grad():
        expected = reference.encode_image(images)
        got = ours(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # a real comparison, not of constants


@pytest.mark.parametrize("arch", [RESNETS[0], VIT], ids=["rn", "vit"])
def test_archives_are_read_as_torch_jit_load_reads_them(openai_model, tmp_path, arch):
    """Without running the archive: its tensors, names and dtypes from the zip alone, as torch's loader gives them."""
    path = tmp_path / "clip.pt"
    openai_clip(openai_model, path, *arch)
    expected = torch.jit.load(path).state_dict()
    state = torchscript.read_state_dict(path)
    assert list(state) == list(expected) and "input_resolution" in state
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert {t.dtype for t in state.values()} == {torch.float16, torch.float32, torch.int64}


class Probe(torch.nn.Module):
    """A TorchScript module whose loading writes into the file it names, as the probe's archive did."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.target, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        written = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8).fill_(65)  # "AAAAAAAA"
        self.weight = state[1] + written[:2].float() * 0
        self.training = state[2]


def with_data_pkl(source, target, data: bytes):
    """A copy of the archive ``source`` whose ``data.pkl`` is ``data``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info))
    return target


class Opens:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_an_archive_that_would_run_code_is_refused_unrun(openai_model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"0123456789")
    archive = tmp_path / "probe.pt"
    torch.jit.save(torch.jit.script(Probe(str(victim))), str(archive))
    torch.jit.load(archive)  # the proof that it is hostile: torch's loader runs its __setstate__
    assert victim.read_bytes() == b"AAAAAAAA89"
    victim.write_bytes(b"0123456789")
    with pytest.raises(ClipCapError) as error:
        load_image_encoder(str(archive))
    assert victim.read_bytes() == b"0123456789"
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{archive}: refused as a TorchScript archive: class __torch__.")
    assert str(error.value).endswith("Probe defines __setstate__, which torch.jit.load would run")

    # An OpenAI file whose pickle calls a function: pickle would run it, this reader names it.
    marker = tmp_path / "marker"
    hostile = pickle.dumps(Opens(marker), protocol=2)
    pickle.loads(hostile)
    assert marker.exists()
    marker.unlink()
    openai_clip(openai_model, tmp_path / "clip.pt", *RESNETS[0])
    path = with_data_pkl(tmp_path / "clip.pt", tmp_path / "hostile.pt", hostile)
    with pytest.raises(ClipCapError, match=f"^{path}: refused as a TorchScript archive: its pickle calls io.open$"):
        load_image_encoder(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("arch", [RESNETS[0], VIT], ids=["rn-64px", "vit-32px"])
def test_half_precision_casts_what_openai_casts(openai_model, tmp_path, arch):
    """fp16 as OpenAI runs it: its convert_weights' cast set (BatchNorm, LayerNorm, embeddings stay float32),
    and the fp16 tower's embeddings against OpenAI's fp16 model on this CPU."""
    path = tmp_path / "clip.pt"
    openai_half = copy.deepcopy(openai_clip(openai_model, path, *arch))
    openai_model.convert_weights(openai_half)
    ours = resnet_clip.load(str(path), dtype=torch.float16)
    expected = {k.removeprefix("visual."): v.dtype for k, v in openai_half.state_dict().items()
                if k.startswith("visual.")}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == expected
    assert {torch.float16, torch.float32} <= set(expected.values())
    images = random_images(arch[2])
    with torch.no_grad():
        try:
            reference = openai_half.encode_image(images)
        except RuntimeError as e:  # an fp16 kernel this CPU build lacks
            pytest.skip(f"OpenAI's fp16 tower does not run on this CPU ({e})")
        got = ours(images.half())
        full = resnet_clip.load(str(path))(images)
    assert got.dtype == reference.dtype == torch.float16
    torch.testing.assert_close(got.float(), reference.float(), rtol=0, atol=3e-3 * full.abs().max().item())


def test_half_precision_keeps_batchnorm_statistics_beyond_its_range(openai_model, tmp_path):
    """A running mean and variance over float16's 65504 stay float32: finite embeddings, those of float32."""
    path = tmp_path / "clip.pt"
    openai_clip(openai_model, path, *RESNETS[0], traced=False)
    state = torch.load(path, weights_only=True)
    state["visual.bn1.running_mean"][0], state["visual.bn1.running_var"][0] = 7e4, 1e10
    torch.save(state, path)
    images = random_images(RESNETS[0][2])
    with torch.no_grad():
        full = resnet_clip.load(str(path))(images)
        half = resnet_clip.load(str(path), dtype=torch.float16)(images.half()).float()
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=0, atol=3e-3 * full.abs().max().item())


def test_plain_state_dicts_load_too(openai_model, tmp_path):
    path = tmp_path / "clip_state.pt"
    reference = openai_clip(openai_model, path, *RESNETS[0], traced=False)
    ours = resnet_clip.load(str(path))
    images = random_images(ours.input_resolution)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference.encode_image(images), rtol=1e-5, atol=1e-5)


def test_load_image_encoder_reads_openai_files(openai_model, tmp_path):
    """A file path loads through load_image_encoder, with OpenAI's preprocessing at the file's resolution."""
    path = tmp_path / "rn.pt"
    reference = openai_clip(openai_model, path, *RESNETS[1])
    encoder = load_image_encoder(str(path))
    assert (encoder.name, encoder.dim) == (str(path), 24)
    assert encoder.transform == Preprocess(size=96, crop_size=96)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((120, 200), (300, 96))]
    with torch.no_grad():
        expected = reference.encode_image(Preprocess(96, 96)(images))
    torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def openai_bpe(tmp_path_factory):
    """OpenAI's BPE two ways: transformers' CLIPTokenizer files made from OpenAI's own vocabulary file (what
    the Hub's openai/clip-vit-* folders hold), and OpenAI's SimpleTokenizer over that file (the oracle;
    ftfy, which it imports, leaves ASCII text as it is)."""
    root = Path(importlib.metadata.distribution("openai-clip").locate_file("clip"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda text: text))
        spec = importlib.util.spec_from_file_location("openai_clip_tokenizer", root / "simple_tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    simple = module.SimpleTokenizer(str(root / "bpe_simple_vocab_16e6.txt.gz"))
    folder = tmp_path_factory.mktemp("openai_bpe")
    merges = gzip.open(root / "bpe_simple_vocab_16e6.txt.gz").read().decode().split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(simple.encoder))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder), simple


def openai_tokenize(simple, texts: list[str], context_length: int) -> torch.Tensor:
    """OpenAI's clip.tokenize(texts, truncate=True), with OpenAI's tokenizer (clip.py imports torchvision)."""
    start, end = simple.encoder["<|startoftext|>"], simple.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [start] + simple.encode(text) + [end]
        if len(tokens) > context_length:
            tokens = tokens[:context_length - 1] + [end]
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


def test_the_text_tower_beside_the_image_tower_gives_openai_encode_text(openai_model, openai_bpe, tmp_path):
    """The text transformer of an OpenAI file and OpenAI's BPE through CLIPTokenizer: OpenAI's encode_text of
    OpenAI's clip.tokenize, a caption longer than the context cut as truncate=True cuts it."""
    path = tmp_path / "clip.pt"
    reference = openai_clip(openai_model, path, *RESNETS[0], text={
        "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1,
        "transformer_layers": 2})
    captions = ["A man riding a wave on top of a surfboard.", "Two dogs, 3 cats & a bird!!", "don't STOP believing",
                " ".join(["a very long caption"] * 30)]
    tokens = openai_tokenize(openai_bpe[1], captions, 77)
    encoder = load_text_encoder(str(path), tokenizer=openai_bpe[0])
    assert (encoder.context_length, encoder.dim) == (77, 24)
    ours = encoder.tokenize(captions)["input_ids"]
    assert torch.equal(ours.where(tokens != 0, 0), tokens)  # OpenAI pads with 0, CLIPTokenizer with end-of-text
    with torch.no_grad():
        expected = reference.encode_text(tokens)
    got = encoder(captions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in resnet_clip.load_text(str(path)).parameters())


def test_tiny_resnet_clip_works_through_the_encoder(tmp_path):
    path = make_tiny_resnet_clip(tmp_path / "tiny.pt", image_size=32, output_dim=20)
    encoder = load_image_encoder(str(path))
    assert encoder.dim == 20 and encoder.transform == Preprocess(size=32, crop_size=32)
    images = [Image.new("RGB", (50, 40), colour) for colour in ("red", "blue", "white")]
    embeddings = encoder(images)
    assert embeddings.shape == (3, 20) and torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1], rtol=1e-3)
    assert model_tag(str(path)) == "tiny"  # in the names of the feature files it makes


def test_bad_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    with pytest.raises(ClipCapError, match="notes.pt: not a TorchScript archive or state dict"):
        load_image_encoder(str(text))
    no_tower = tmp_path / "no_tower.pt"
    torch.save({"text_projection": torch.zeros(4, 4)}, no_tower)
    with pytest.raises(ClipCapError, match=r"no_tower.pt: not an OpenAI CLIP file \(no visual\.layer1"):
        load_image_encoder(str(no_tower))
    state = torch.load(make_tiny_resnet_clip(tmp_path / "tiny.pt"), weights_only=True)
    del state["visual.attnpool.q_proj.bias"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ClipCapError, match=r"short.pt: weights do not fit .*attnpool.q_proj.bias"):
        load_image_encoder(str(tmp_path / "short.pt"))
    state = torch.load(make_tiny_resnet_clip(tmp_path / "tiny.pt"), weights_only=True)
    state["input_resolution"] = torch.tensor(224)
    torch.save(state, tmp_path / "mislabelled.pt")
    with pytest.raises(ClipCapError, match="input_resolution is 224, but the weights are for 64-pixel images"):
        load_image_encoder(str(tmp_path / "mislabelled.pt"))


# --------------------------------------------------------------------------- fetching


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for ``tmp_path / "www"``, counting the requests; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        timeout = 10

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def publish(root, source, sha: str | None = None) -> str:
    """Put ``source`` on the server under OpenAI's URL layout, ``<sha256>/<name>``; returns the path."""
    data = source.read_bytes()
    sha = sha or hashlib.sha256(data).hexdigest()
    (root / sha).mkdir()
    (root / sha / source.name).write_bytes(data)
    return f"/{sha}/{source.name}"


def test_fetch_verifies_checks_and_reuses_the_cache(server, tmp_path):
    root, base, requests = server
    source = make_tiny_resnet_clip(tmp_path / "RN50.pt")
    url = base + publish(root, source)
    cache = tmp_path / "cache"
    path = resnet_clip.fetch(url, cache)
    assert path == cache / "RN50.pt" and path.read_bytes() == source.read_bytes()
    assert resnet_clip.fetch(url, cache) == path and len(requests) == 1  # the cached file, checked, not fetched
    path.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="RN50.pt: SHA256 does not match; downloading it again"):
        assert resnet_clip.fetch(url, cache).read_bytes() == source.read_bytes() and len(requests) == 2
    assert [p.name for p in cache.iterdir()] == ["RN50.pt"]


def test_a_download_with_the_wrong_checksum_is_refused_and_not_kept(server, tmp_path):
    root, base, requests = server
    url = base + publish(root, make_tiny_resnet_clip(tmp_path / "RN50.pt"), sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ClipCapError, match=f"{url}: downloaded file's SHA256 is [0-9a-f]{{64}}, not 0{{64}}; not kept"):
        resnet_clip.fetch(url, cache)
    assert requests and list(cache.iterdir()) == []


def test_offline_is_a_one_line_error(offline_openai_clip):
    with pytest.raises(ClipCapError) as error:
        load_image_encoder("RN50x16")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {resnet_clip.URLS['RN50x16']} (")
    assert message.endswith(f"download it yourself and put it at {offline_openai_clip / 'RN50x16.pt'}")


def test_resnet_names_are_fetched_into_the_cache_and_loaded(server, tmp_path, monkeypatch):
    """``RN50`` end to end: OpenAI's URL (served here), the checksum, the cache, the encoder."""
    root, base, requests = server
    url = base + publish(root, make_tiny_resnet_clip(tmp_path / "RN50.pt", image_size=32))
    monkeypatch.setitem(resnet_clip.URLS, "RN50", url)
    monkeypatch.setattr(resnet_clip, "CACHE", tmp_path / "cache")
    for _ in range(2):
        encoder = load_image_encoder("RN50")
        assert (encoder.name, encoder.dim, encoder.transform.crop_size) == ("RN50", 24, 32)
        assert encoder([Image.new("RGB", (40, 32), "red")]).shape == (1, 24)
    assert len(requests) == 1 and (tmp_path / "cache" / "RN50.pt").is_file()
