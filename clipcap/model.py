"""The ClipCap model: a mapping network from one CLIP embedding to a GPT-2 prefix.

State-dict names and shapes are the original implementation's (``gpt.*`` for GPT-2,
``clip_project.*`` for the mapper), so its released weights load here and ours load there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from . import hub_access
from .files import ClipCapError, first_line

MAPPING_TYPES = ("mlp", "transformer")
# The GPT-2 config fields a checkpoint records (``gpt2_config``): those that fix its shapes, and its heads.
GPT2_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id", "eos_token_id")


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A config field and its command-line help; ``flags=("--a", "--b")`` spells its flag otherwise."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class ClipCapConfig:
    """Everything needed to rebuild a ClipCap model; stored in each checkpoint."""

    prefix_length: int = setting(10, "K: prefix vectors fed to GPT-2")
    prefix_length_clip: int = setting(10, "transformer mapper: tokens the CLIP embedding is split into")
    prefix_size: int = setting(512, "D: CLIP embedding width (ViT-B/32 512, RN50x4 640, ViT-L/14 768)")
    mapping_type: str = setting("mlp", "mapping network", choices=MAPPING_TYPES)
    num_layers: int = setting(8, "transformer mapper: layers")
    num_heads: int = setting(8, "transformer mapper: attention heads")
    only_prefix: bool = setting(False, "freeze GPT-2: train and save the mapper only")
    normalize_prefix: bool = setting(False, "L2-normalise CLIP embeddings, in training and inference alike")
    noise_variance: float = setting(0.0, "training only: Gaussian noise of this variance per coordinate on every CLIP "
                                         "embedding at every step; with --normalize_prefix added between two L2 "
                                         "normalisations, as CapDec's code adds it, so that its 0.016 (text-only "
                                         "training) means the same here")
    gpt2: str = setting("gpt2", "GPT-2 and its tokenizer: a Hugging Face name or a local folder")
    clip_model: str = setting("ViT-B/32", "the CLIP that made the features (what captioning images loads)")
    gpt2_config: dict[str, Any] = field(default_factory=dict)  # GPT-2's architecture, filled on build

    def __post_init__(self) -> None:
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type must be one of {MAPPING_TYPES}, got {self.mapping_type!r}")
        self.gpt2, self.clip_model = portable_name(self.gpt2), portable_name(self.clip_model)

    def to_dict(self) -> dict[str, Any]:
        """The config as written into checkpoints and config.json: backbones named so that they load anywhere."""
        return {**dataclasses.asdict(self), "gpt2": portable_name(self.gpt2),
                "clip_model": portable_name(self.clip_model)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClipCapConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def portable_name(name: str | None) -> str | None:
    """A backbone's name as it loads from any folder: a local path made absolute, a Hub id as it is.

    A relative path (``demo_out/backbones/gpt2``) in a checkpoint would load only from the folder
    it was written in.
    """
    if not name:  # unset (training fills it from the features)
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_heads(config: ClipCapConfig, width: int) -> None:
    """The transformer mapper splits GPT-2's width ``width`` into ``num_heads`` heads: they must divide it."""
    if config.mapping_type == "transformer" and (config.num_heads < 1 or width % config.num_heads):
        raise ClipCapError(f"num_heads {config.num_heads} does not divide the mapper's width {width} (GPT-2's "
                           f"{config.gpt2}): choose a divisor of {width}, such as {default_heads(width)}")


def default_heads(width: int) -> int:
    """The head count nearest 8 (the paper's) that divides ``width``."""
    return min((h for h in range(1, width + 1) if width % h == 0), key=lambda h: (abs(h - 8), h))


class MLPMapper(nn.Module):
    """Linear(D, EK/2) - Tanh - Linear(EK/2, EK), reshaped to K vectors of width E."""

    def __init__(self, prefix_size: int, embed_dim: int, prefix_length: int):
        super().__init__()
        hidden = embed_dim * prefix_length // 2
        self.model = nn.Sequential(
            nn.Linear(prefix_size, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim * prefix_length)
        )
        self.prefix_length = prefix_length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).view(x.shape[0], self.prefix_length, -1)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)  # keys first, then values
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        queries = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)
        keys_values = self.to_keys_values(x).view(b, n, 2, h, c // h)
        keys = keys_values[:, :, 0].transpose(1, 2)
        values = keys_values[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values)  # scale head_dim**-0.5, no mask
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x)); MLP ratio 2."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """CLIP vector -> clip_length tokens, joined by K learned constants; the constants' outputs are the prefix."""

    def __init__(self, prefix_size: int, embed_dim: int, prefix_length: int, clip_length: int,
                 num_layers: int, num_heads: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(prefix_size, clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, embed_dim))
        self.transformer = Transformer(embed_dim, num_heads, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, const), dim=1))[:, self.clip_length:]


class ClipCap(nn.Module):
    """GPT-2 (``gpt``) conditioned on a prefix made from a CLIP embedding by ``clip_project``."""

    def __init__(self, config: ClipCapConfig, gpt: GPT2LMHeadModel):
        super().__init__()
        self.config = config
        self.gpt = gpt
        embed_dim = gpt.config.n_embd
        check_heads(config, embed_dim)
        if config.mapping_type == "mlp":
            self.clip_project: nn.Module = MLPMapper(config.prefix_size, embed_dim, config.prefix_length)
        else:
            self.clip_project = TransformerMapper(config.prefix_size, embed_dim, config.prefix_length,
                                                  config.prefix_length_clip, config.num_layers, config.num_heads)
        if config.only_prefix:
            self.gpt.requires_grad_(False)
            self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCap":
        super().train(mode)
        if self.config.only_prefix:
            self.gpt.eval()  # frozen GPT-2 runs without dropout, as in the original
        return self

    @property
    def embed_dim(self) -> int:
        return self.gpt.config.n_embd

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings [B, D] -> prefix embeddings [B, K, E] (normalised first if configured).

        In training, ``noise_variance`` adds N(0, variance) to each coordinate, between two normalisations
        when ``normalize_prefix`` is on, as CapDec's noise injection does: its 0.016 is a variance on
        unit-length embeddings, and the mapper sees unit-length ones in training as at inference.
        """
        clip_embeds = clip_embeds.to(self.clip_project_dtype)
        if self.config.normalize_prefix:
            clip_embeds = clip_embeds / clip_embeds.norm(dim=-1, keepdim=True)
        if self.training and self.config.noise_variance > 0:
            clip_embeds = clip_embeds + torch.randn_like(clip_embeds) * self.config.noise_variance ** 0.5
            if self.config.normalize_prefix:
                clip_embeds = clip_embeds / clip_embeds.norm(dim=-1, keepdim=True)
        return self.clip_project(clip_embeds)

    @property
    def clip_project_dtype(self) -> torch.dtype:
        return next(self.clip_project.parameters()).dtype

    def forward(self, clip_embeds: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits [B, K + T, V] over the prefix and the caption; or, given ``positions`` (the flat
        indices of the real tokens of a right-padded batch: :attr:`clipcap.data.Batch.positions`),
        the next-token cross-entropy of those tokens.

        Right padding needs no attention mask under causal attention, and the vocabulary
        projection runs only where a real token is predicted. The positions come from the CPU, so
        nothing is read back from the device and a GPU step is queued without waiting.
        """
        embeds = torch.cat((self.prefix(clip_embeds), self.gpt.transformer.wte(tokens)), dim=1)
        if positions is None:
            return self.gpt(inputs_embeds=embeds).logits
        k = self.config.prefix_length
        hidden = self.gpt.transformer(inputs_embeds=embeds).last_hidden_state
        before = hidden[:, k - 1:-1].reshape(-1, hidden.shape[-1])  # the state before each token predicts it
        logits = self.gpt.lm_head(before.index_select(0, positions))
        return F.cross_entropy(logits.float(), tokens.flatten().index_select(0, positions), reduction=reduction)


def gpt2_architecture(gpt: GPT2LMHeadModel) -> dict[str, Any]:
    """The GPT-2 config fields that fix its shapes, so a full checkpoint rebuilds offline."""
    return {name: getattr(gpt.config, name) for name in GPT2_FIELDS}


def gpt2_config_of(name: str) -> GPT2Config:
    """GPT-2's config (no weights) from a Hub name or folder, or a one-line error."""
    if hub_access.is_local(name) and not Path(name).expanduser().is_dir():
        raise ClipCapError(f"GPT-2 {name}: no such folder")
    hub_access.prepare(name)
    try:
        return GPT2Config.from_pretrained(name)
    except OSError as e:  # a missing folder, or a hub name offline
        raise ClipCapError(f"GPT-2 {name}: cannot load its config ({first_line(e)}){hub_access.unreachable_hint()}") \
            from None


def build_model(config: ClipCapConfig, pretrained_gpt2: bool = True) -> ClipCap:
    """Build a ClipCap model: GPT-2 weights from ``config.gpt2`` or random from ``config.gpt2_config``.

    The mapper's settings are checked against GPT-2's width before GPT-2's weights are loaded.
    """
    if pretrained_gpt2:
        gpt2_config = gpt2_config_of(config.gpt2)
        check_heads(config, gpt2_config.n_embd)
        try:
            gpt = GPT2LMHeadModel.from_pretrained(config.gpt2, config=gpt2_config)
        except OSError as e:
            raise ClipCapError(f"GPT-2 {config.gpt2}: cannot load its weights ({first_line(e)})") from None
    else:
        if not config.gpt2_config:
            raise ValueError("config.gpt2_config is empty: cannot build GPT-2 without its weights")
        gpt = GPT2LMHeadModel(GPT2Config(**config.gpt2_config))
    config.gpt2_config = gpt2_architecture(gpt)
    return ClipCap(config, gpt)


def load_tokenizer(name_or_dir: str) -> GPT2TokenizerFast:
    """GPT-2's byte-level BPE tokenizer from the hub or a local directory, or a one-line error.

    Offline, transformers 5 answers a hub name it has not cached (or a folder without tokenizer
    files) with an empty tokenizer instead of an error; byte-level BPE has at least the 256 byte
    tokens, so fewer means nothing was found.
    """
    hub_access.prepare(name_or_dir)
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(name_or_dir)
    except (OSError, ValueError, TypeError) as e:
        tokenizer, reason = None, first_line(e)
    if tokenizer is None or len(tokenizer) < 256:
        where = "folder has no GPT-2 tokenizer" if Path(name_or_dir).is_dir() else \
            "no such folder, and not loadable from the Hugging Face Hub (offline, or not a GPT-2 name?)"
        raise ClipCapError(f"GPT-2 {name_or_dir}: {where}" + (f" ({reason})" if tokenizer is None else "")
                           + hub_access.unreachable_hint())
    return tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
