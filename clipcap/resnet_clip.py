"""OpenAI's CLIP towers read straight from OpenAI's published files: no ``clip`` package needed.

The ResNet CLIPs (RN50 ... RN50x64) exist only as OpenAI's own files: TorchScript archives
holding fp16 weights named ``visual.*``, the text tower's (``token_embedding``, ``transformer.*``...)
and three scalars, ``input_resolution``, ``context_length`` and ``vocab_size``. This module rebuilds
the image tower those names describe, OpenAI's "modified ResNet" (three-convolution stem,
anti-aliased average-pool strides, attention pooling), and also their ViT, so that any OpenAI CLIP
file loads strictly; and the text transformer beside it, for text-only training. The architecture
is inferred from the weights, as OpenAI's ``build_model`` does; the archives are read by
:mod:`clipcap.torchscript`, which runs none of their code.
Files are fetched from OpenAI's URLs into the ``clip`` package's cache (``~/.cache/clip``), so
earlier downloads are reused, and checked against their SHA256.
"""
from __future__ import annotations

import hashlib
import pickle
import urllib.error
import urllib.request
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import torchscript
from .files import ClipCapError, atomic_write

# OpenAI's files; the second-to-last part of each URL is the file's SHA256.
URLS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
}
CACHE = Path("~/.cache/clip").expanduser()  # where OpenAI's clip package keeps them too


# --------------------------------------------------------------------------- the modified ResNet


class Bottleneck(nn.Module):
    """A ResNet bottleneck whose stride is an average pool before the 1x1 expansion (and the shortcut)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:  # pooled first, then a 1x1 convolution
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        identity = x if self.downsample is None else self.downsample(self.pool(x))
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one attention query: the mean of the map, plus a position embedding."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        (n, length, c), h = x.shape, self.num_heads
        q = self.q_proj(x[:, :1]).view(n, 1, h, c // h).transpose(1, 2)  # only the mean token's output is kept
        k = self.k_proj(x).view(n, length, h, c // h).transpose(1, 2)
        v = self.v_proj(x).view(n, length, h, c // h).transpose(1, 2)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).reshape(n, c))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet image tower: pixels [B, 3, R, R] -> embeddings [B, output_dim]."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)  # the three-convolution stem
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# --------------------------------------------------------------------------- the ViT


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' and input's precision, as OpenAI's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(),
                                             c_proj=nn.Linear(width * 4, width)))
        self.ln_2 = LayerNorm(width)
        self.causal = causal  # the text tower's: each token sees those before it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        mask = None
        if self.causal:  # OpenAI's mask: -inf above the diagonal, in the activations' precision
            mask = torch.full((x.shape[1], x.shape[1]), float("-inf"), device=x.device).triu(1).to(x.dtype)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


def _resblocks(width: int, layers: int, heads: int, causal: bool = False) -> nn.ModuleDict:
    """OpenAI's ``Transformer``: its blocks under ``resblocks``, the names its weights have."""
    return nn.ModuleDict({"resblocks": nn.Sequential(*[ResidualAttentionBlock(width, heads, causal)
                                                       for _ in range(layers)])})


class VisionTransformer(nn.Module):
    """OpenAI's ViT image tower: pixels [B, 3, R, R] -> embeddings [B, output_dim]."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = _resblocks(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer["resblocks"](x)
        return self.ln_post(x[:, 0]) @ self.proj


# --------------------------------------------------------------------------- the text transformer


class TextTransformer(nn.Module):
    """OpenAI's text tower: BPE ids [B, context_length] (start, text, end, padding) -> embeddings [B, output_dim],
    read where each text ends: at its end-of-text token, the vocabulary's highest id."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.context_length, self.output_dim = context_length, output_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _resblocks(width, layers, heads, causal=True)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.text_projection.dtype  # the precision OpenAI's convert_weights gave the tower
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        x = self.ln_final(self.transformer["resblocks"](x)).to(dtype)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection


# --------------------------------------------------------------------------- building and loading


def build(visual: dict[str, torch.Tensor]) -> ModifiedResNet | VisionTransformer:
    """An image tower (on the meta device, no weights yet) of the shape that ``visual`` (keys without
    ``visual.``) describes, inferred as OpenAI's ``build_model`` does."""
    with torch.device("meta"):
        if "proj" in visual:
            width, _, patch, _ = visual["conv1.weight"].shape
            grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
            layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
            return VisionTransformer(patch * grid, patch, width, layers, width // 64, visual["proj"].shape[1])
        layers = tuple(len({k.split(".")[1] for k in visual if k.startswith(f"layer{b}.")}) for b in (1, 2, 3, 4))
        width = visual["layer1.0.conv1.weight"].shape[0]
        grid = round((visual["attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return ModifiedResNet(layers, visual["attnpool.c_proj.weight"].shape[0], width * 32 // 64, grid * 32, width)


def build_text(text: dict[str, torch.Tensor]) -> TextTransformer:
    """The text tower (on the meta device) of the shape that ``text`` (an OpenAI file's weights outside
    ``visual.``) describes, inferred as OpenAI's ``build_model`` does: heads of 64 channels."""
    with torch.device("meta"):
        vocab_size, width = text["token_embedding.weight"].shape
        layers = len({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")})
        return TextTransformer(vocab_size, text["positional_embedding"].shape[0], width, layers, max(1, width // 64),
                               text["text_projection"].shape[1])


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI CLIP file: a TorchScript archive (as OpenAI ships them; read, never run) or a
    plain state dict."""
    if torchscript.is_archive(path):
        return torchscript.read_state_dict(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        raise ClipCapError(f"{path}: not a TorchScript archive or state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ClipCapError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         ) -> ModifiedResNet | VisionTransformer:
    """OpenAI's image tower by name (``RN50x4``: fetched and cached) or from a file, frozen, its weights in
    ``dtype`` as OpenAI casts them (:func:`convert_weights`); it takes pixels in ``dtype``."""
    path, state = _read(name)
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    model = _fill(path, build, visual, "visual.", "image")
    if "input_resolution" in state and int(state["input_resolution"]) != model.input_resolution:
        raise ClipCapError(f"{path}: input_resolution is {int(state['input_resolution'])}, but the weights "
                           f"are for {model.input_resolution}-pixel images")
    return convert_weights(model.eval().requires_grad_(False).to(device, torch.float32), dtype)


def load_text(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextTransformer:
    """The text tower of OpenAI's CLIP ``name`` (or file), frozen, in ``dtype`` as OpenAI casts it; it takes
    OpenAI's BPE ids, as ``clip.tokenize`` gives them."""
    path, state = _read(name)
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and k not in _SCALARS}
    model = _fill(path, build_text, text, "", "text")
    if "context_length" in state and int(state["context_length"]) != model.context_length:
        raise ClipCapError(f"{path}: context_length is {int(state['context_length'])}, but the weights are for "
                           f"{model.context_length} tokens")
    return convert_weights(model.eval().requires_grad_(False).to(device, torch.float32), dtype)


# Saved beside OpenAI's weights; logit_scale is the contrastive loss's, no tower's.
_SCALARS = ("input_resolution", "context_length", "vocab_size", "logit_scale")


def _read(name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    path = fetch(URLS[name]) if name in URLS else Path(name)
    return path, read_state_dict(path)


def _fill(path: Path, builder: Any, weights: dict[str, torch.Tensor], prefix: str, tower: str) -> nn.Module:
    """The tower ``builder`` infers from ``weights``, holding them exactly (strictly loaded)."""
    try:
        model = builder(weights)
    except KeyError as e:
        raise ClipCapError(f"{path}: not an OpenAI CLIP file (no {prefix}{e.args[0]} weights)") from None
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise ClipCapError(f"{path}: weights do not fit OpenAI's CLIP {tower} tower "
                           f"({' '.join(str(e).split())[:300]})") from None
    return model


def convert_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast what OpenAI's ``convert_weights`` casts to half (convolution, linear and attention weights, the
    ViT's ``proj``, the text tower's ``text_projection``) to ``dtype``; BatchNorm, LayerNorm and the
    embeddings stay float32, as OpenAI runs them (a running variance over 65504 is inf in float16)."""
    for module in model.modules():
        names = ["proj", "text_projection"]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names += ["weight", "bias"]
        elif isinstance(module, nn.MultiheadAttention):
            names += ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                      "bias_k", "bias_v"]
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.to(dtype)
    return model


# --------------------------------------------------------------------------- fetching


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, root: Path | None = None) -> Path:
    """OpenAI's file at ``url``, from the cache if its SHA256 is right, else downloaded (with a progress bar)."""
    expected = url.split("/")[-2]
    target = (root or CACHE) / url.split("/")[-1]
    if target.is_file() and sha256(target) == expected:
        return target
    if target.exists():
        warnings.warn(f"{target}: SHA256 does not match; downloading it again")
    try:
        with urllib.request.urlopen(url, timeout=60) as source, atomic_write(target) as tmp:
            digest = hashlib.sha256()
            size = int(source.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=target.name) as progress:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
            if digest.hexdigest() != expected:
                raise ClipCapError(f"{url}: downloaded file's SHA256 is {digest.hexdigest()}, not {expected}; "
                                   "not kept")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ClipCapError(f"cannot download {url} ({reason}); download it yourself and put it at {target}") from None
    return target
