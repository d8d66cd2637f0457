"""The ClipCap model: a mapping network from one CLIP embedding to a prefix of a language model.

State-dict names and shapes are the original implementation's (``gpt.*`` for GPT-2,
``clip_project.*`` for the mapper), so its released weights load here and ours load there.
Every other LM sits under ``gpt`` too (the generative pre-trained transformer the prefix feeds):
one layout, so that one loader reads every checkpoint and a mapper-only file is told from a whole
one the same way for all of them. The LM itself is :mod:`clipcap.lm`'s.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import lm as lms
from .files import ClipCapError
from .lm import load_tokenizer

MAPPING_TYPES = ("mlp", "transformer")
# Config names of earlier versions, when GPT-2 was the only LM: still read.
RENAMED = {"gpt2": "lm", "gpt2_config": "lm_config"}


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
    only_prefix: bool = setting(False, "freeze the LM: train and save the mapper only")
    normalize_prefix: bool = setting(False, "L2-normalise CLIP embeddings, in training and inference alike")
    noise_variance: float = setting(0.0, "training only: Gaussian noise of this variance per coordinate on every CLIP "
                                         "embedding at every step; with --normalize_prefix added between two L2 "
                                         "normalisations, as CapDec's code adds it, so that its 0.016 (text-only "
                                         "training) means the same here")
    lm: str = setting("gpt2", "the language model and its tokenizer: any decoder-only causal LM of transformers "
                              "(GPT-2, OPT, Pythia, Llama, Qwen, Gemma, Phi ...), a Hugging Face name or a folder",
                      flags=("--lm", "--gpt2"))
    lm_revision: str = setting("", "the LM's Hub revision: a branch, tag or commit (default: main); recorded as "
                                   "the commit it resolved to")
    lm_dtype: str = setting("float32", "the LM's weights: bfloat16 or float16 halve a frozen LM's memory "
                                       "(--only_prefix or --lora_rank); the mapper stays float32",
                            choices=tuple(lms.DTYPES))
    lora_rank: int = setting(0, "train LoRA adapters of this rank on the frozen LM, and the mapper (0: none); "
                                "checkpoints then hold the mapper and the adapters, not the LM")
    lora_alpha: float = setting(16.0, "LoRA's scale numerator (the adapters' output is scaled by alpha / rank)")
    lora_targets: str = setting(lms.ALL_LINEAR, "the LM modules LoRA adapts: comma-separated module names "
                                                "(q_proj,v_proj), or all-linear: every attention and MLP projection")
    clip_model: str = setting("ViT-B/32", "the CLIP that made the features (what captioning images loads)")
    lm_bos: bool | None = None  # the LM's BOS goes before the prefix: decided on build, from its tokenizer
    lm_config: dict[str, Any] = field(default_factory=dict)  # the LM's architecture, filled on build
    gpt2: InitVar[str | None] = None  # the name of ``lm`` before any LM could be one, still taken

    def __post_init__(self, gpt2: str | None) -> None:
        if gpt2 is not None:
            self.lm = gpt2
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type must be one of {MAPPING_TYPES}, got {self.mapping_type!r}")
        self.lm, self.clip_model = portable_name(self.lm), portable_name(self.clip_model)

    def to_dict(self) -> dict[str, Any]:
        """The config as written into checkpoints and config.json: backbones named so that they load anywhere."""
        return {**dataclasses.asdict(self), "lm": portable_name(self.lm), "clip_model": portable_name(self.clip_model)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClipCapConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in renamed(values).items() if k in known})

    def check(self) -> None:
        """Settings that contradict each other, refused with their flags' names."""
        if self.lora_rank < 0:
            raise ClipCapError(f"--lora_rank must not be negative, got {self.lora_rank}")
        if self.lora_rank and self.only_prefix:
            raise ClipCapError("--lora_rank trains adapters on the LM, --only_prefix freezes it: choose one")
        if self.lm_dtype not in lms.DTYPES:
            raise ClipCapError(f"--lm_dtype must be one of {', '.join(lms.DTYPES)}, got {self.lm_dtype!r}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ClipCapError(f"--lora_alpha must be positive, got {self.lora_alpha}")

    @property
    def frozen_lm(self) -> bool:
        """Whether training leaves the LM's own weights as they are (prefix only, or adapters beside them)."""
        return self.only_prefix or self.lora_rank > 0


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """Config values with the names of earlier versions (:data:`RENAMED`) given their current ones."""
    return {RENAMED.get(k, k): v for k, v in values.items() if not (k in RENAMED and RENAMED[k] in values)}


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
    """The transformer mapper splits the LM's width ``width`` into ``num_heads`` heads: they must divide it."""
    if config.mapping_type == "transformer" and (config.num_heads < 1 or width % config.num_heads):
        raise ClipCapError(f"num_heads {config.num_heads} does not divide the mapper's width {width} (the LM's, "
                           f"{config.lm}): choose a divisor of {width}, such as {default_heads(width)}")


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
    """A language model (``gpt``) conditioned on a prefix made from a CLIP embedding by ``clip_project``.

    The LM reads its BOS first when its tokenizer starts every text with one (``config.lm_bos``),
    then the prefix, then the caption: :meth:`prompt_embeds` is what comes before the caption.
    """

    def __init__(self, config: ClipCapConfig, gpt: nn.Module):
        super().__init__()
        config.check()
        self.config = config
        self.gpt = gpt
        check_heads(config, self.embed_dim)
        if config.mapping_type == "mlp":
            self.clip_project: nn.Module = MLPMapper(config.prefix_size, self.embed_dim, config.prefix_length)
        else:
            self.clip_project = TransformerMapper(config.prefix_size, self.embed_dim, config.prefix_length,
                                                  config.prefix_length_clip, config.num_layers, config.num_heads)
        if config.lora_rank:
            lms.add_lora(self.gpt, config.lora_rank, config.lora_alpha, config.lora_targets)
        if config.only_prefix:
            self.gpt.requires_grad_(False)
            self.gpt.eval()

    def train(self, mode: bool = True) -> "ClipCap":
        super().train(mode)
        if self.config.only_prefix:
            self.gpt.eval()  # a frozen LM runs without dropout, as in the original
        return self

    @property
    def embed_dim(self) -> int:
        """The LM's input embedding width: the width of each prefix vector."""
        return self.gpt.get_input_embeddings().embedding_dim

    @property
    def prompt_length(self) -> int:
        """Positions before the caption: the prefix, and the LM's BOS before it when it takes one."""
        return self.config.prefix_length + int(bool(self.config.lm_bos))

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

    def prompt_embeds(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """What the LM reads before the caption [B, prompt_length, E], in the LM's dtype: its BOS embedding
        when it takes one, then the prefix."""
        prefix = self.prefix(clip_embeds).to(self.lm_dtype)
        if not self.config.lm_bos:
            return prefix
        bos = torch.full((len(prefix), 1), self.gpt.config.bos_token_id, device=prefix.device)
        return torch.cat((self.token_embeds(bos), prefix), dim=1)

    def token_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt.get_input_embeddings()(tokens)

    @property
    def clip_project_dtype(self) -> torch.dtype:
        return next(self.clip_project.parameters()).dtype

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.gpt.get_input_embeddings().weight.dtype

    def forward(self, clip_embeds: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits [B, P + T, V] over the prompt (P = :attr:`prompt_length`) and the caption; or, given
        ``positions`` (the flat indices of the real tokens of a right-padded batch:
        :attr:`clipcap.data.Batch.positions`), the next-token cross-entropy of those tokens.

        Right padding needs no attention mask under causal attention, and the vocabulary
        projection runs only where a real token is predicted. The positions come from the CPU, so
        nothing is read back from the device and a GPU step is queued without waiting.
        """
        embeds = torch.cat((self.prompt_embeds(clip_embeds), self.token_embeds(tokens)), dim=1)
        if positions is None:
            return self.gpt(inputs_embeds=embeds).logits
        k = self.prompt_length
        hidden = self.gpt.base_model(inputs_embeds=embeds).last_hidden_state
        before = hidden[:, k - 1:-1].reshape(-1, hidden.shape[-1])  # the state before each token predicts it
        logits = lms.output_logits(self.gpt, before.index_select(0, positions))
        return F.cross_entropy(logits.float(), tokens.flatten().index_select(0, positions), reduction=reduction)


def build_model(config: ClipCapConfig, pretrained_lm: bool = True) -> ClipCap:
    """Build a ClipCap model: the LM's weights from ``config.lm`` (at ``config.lm_revision``), or random
    from the architecture ``config.lm_config`` records (a whole checkpoint's weights go in next).

    The mapper's settings are checked against the LM's width before its weights are loaded. The
    config is completed with what the LM decides: its architecture, its Hub commit, and whether
    its BOS goes first (from its tokenizer, unless the config records it).
    """
    config.check()
    if pretrained_lm:
        lm_config = lms.config_of(config.lm, config.lm_revision)
        check_heads(config, lm_config.hidden_size)
        config.lm_revision = lms.hub_commit(config.lm, config.lm_revision)
        if config.lm_bos is None:
            config.lm_bos = lms.adds_bos(load_tokenizer(config.lm, config.lm_revision))
        gpt = lms.load_pretrained(config.lm, config.lm_revision, lm_config, config.lm_dtype)
    else:
        if not config.lm_config:
            raise ValueError("config.lm_config is empty: cannot build the LM without its weights")
        gpt = lms.from_architecture(config.lm_config, config.lm_dtype)
    config.lm_config = lms.architecture(gpt.config)
    config.lm_bos = bool(config.lm_bos)
    return ClipCap(config, gpt)


def merge_lora(model: ClipCap) -> ClipCap:
    """Fold the model's LoRA adapters into its LM, in place: the same outputs, at the speed of a plain LM.
    The result saves as a whole fine-tuned model (the merged LM is no longer the one the config names)."""
    if model.config.lora_rank:
        lms.merge_lora(model.gpt)
        model.config.lora_rank = 0
        model.gpt.requires_grad_(True)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
