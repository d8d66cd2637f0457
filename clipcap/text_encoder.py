"""The frozen CLIP text tower: captions in, the text embeddings that text-only training (CapDec) learns from.

It is the text side of the checkpoint whose image side :mod:`clipcap.encoder` loads, so that the
two kinds of embedding share one space:

- a transformers image-text model (OpenAI's ``ViT-B/32``..., any CLIP, SigLIP...): its
  ``get_text_features`` (CLIP's projected text embedding, SigLIP's pooled one) with its own
  tokenizer, every text padded to the tower's context length (77 for CLIP, 64 for SigLIP, which was
  trained on such padding) and cut to it, its end token kept. SigLIP's ids go in without the
  attention mask transformers 5's tokenizers add: it was trained attending to its padding (big_vision
  has no mask there), and transformers' conversion of it was checked that way;
- an OpenAI CLIP file (the ResNet CLIPs): the text transformer the file holds
  (:func:`clipcap.resnet_clip.load_text`), with OpenAI's BPE through transformers' ``CLIPTokenizer``
  (the files of ``openai/clip-vit-base-patch32``, which are OpenAI's vocabulary and merges).

Embeddings are unnormalised, as image embeddings are; training normalises both alike (``normalize_prefix``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import resnet_clip
from .encoder import default_dtype, hub_source, is_openai_file, load_pretrained, loading, pooled
from .files import ClipCapError

# OpenAI's BPE (vocabulary and merges) as transformers' CLIPTokenizer reads it: the tokenizer of OpenAI's files.
OPENAI_TOKENIZER = "openai/clip-vit-base-patch32"
# Text towers trained attending to their padding: their ids go in without an attention mask.
UNMASKED = ("siglip", "siglip2")


@dataclass
class TextEncoder:
    """A frozen CLIP text tower and its tokenizer: captions in, unnormalised embeddings out."""

    embed: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # token tensors on ``device`` -> embeddings
    tokenizer: Any
    context_length: int  # every text is padded or cut to this many tokens
    dim: int
    name: str
    device: torch.device
    dtype: torch.dtype

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tokenizer's tensors (``input_ids`` and, if it makes one, ``attention_mask``) for ``captions``."""
        return dict(self.tokenizer(list(captions), padding="max_length", truncation=True,
                                   max_length=self.context_length, return_tensors="pt"))

    @torch.inference_mode()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> float32 embeddings [N, D] on the encoder's device."""
        tokens = {key: value.to(self.device) for key, value in self.tokenize(captions).items()}
        return self.embed(tokens).float()


def load_text_encoder(name: str = "ViT-B/32", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      tokenizer: str | None = None) -> TextEncoder:
    """The text tower of CLIP ``name`` (any name :func:`clipcap.encoder.load_image_encoder` takes) and its
    tokenizer; ``tokenizer`` (a Hub name or folder) replaces where the tokenizer comes from."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if is_openai_file(name):
        return _openai_text(name, device, dtype, tokenizer or OPENAI_TOKENIZER)
    from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection

    with loading(name):
        config = AutoConfig.from_pretrained(hub_source(name), trust_remote_code=False)
        text_config = getattr(config, "text_config", None)
        if text_config is None:
            raise ClipCapError(f"{name}: a {config.model_type} checkpoint without a text tower; text-only training "
                               "needs a CLIP (or SigLIP...) with both towers")
        if config.model_type == "clip":  # the text tower alone; its projection width lives at the top level
            text_config.projection_dim = config.projection_dim
            model = load_pretrained(name, CLIPTextModelWithProjection, config=text_config, dtype=dtype)
            embed: Callable[..., torch.Tensor] = lambda tokens: model(**tokens).text_embeds  # noqa: E731
        else:
            model = load_pretrained(name, AutoModel, config=config, dtype=dtype, trust_remote_code=False)
            if not hasattr(model, "get_text_features"):
                raise ClipCapError(f"{name}: a {config.model_type} model has no get_text_features: not an "
                                   "image-text model like CLIP or SigLIP")
            embed = lambda tokens: pooled(model.get_text_features(**tokens))  # noqa: E731
        tok = _tokenizer(tokenizer or hub_source(name), name, text_config.vocab_size)
    accepted = set(inspect.signature(model.forward if config.model_type == "clip" else model.get_text_features)
                   .parameters) - ({"attention_mask"} if config.model_type in UNMASKED else set())
    encoder = TextEncoder(lambda tokens: embed({k: v for k, v in tokens.items() if k in accepted}), tok,
                          text_config.max_position_embeddings, 0, name, device, dtype)
    model.to(device)
    encoder.dim = int(encoder(["a"]).shape[-1])  # whatever its config calls the width
    return encoder


def _openai_text(name: str, device: torch.device, dtype: torch.dtype, tokenizer: str) -> TextEncoder:
    from transformers import CLIPTokenizer

    model = resnet_clip.load_text(name, device, dtype)
    with loading(tokenizer):
        tok = _tokenizer(tokenizer, name, model.token_embedding.num_embeddings, CLIPTokenizer)
    return TextEncoder(lambda tokens: model(tokens["input_ids"]), tok, model.context_length, model.output_dim, name,
                       device, dtype)


def _tokenizer(source: str, name: str, vocab_size: int, cls: Any = None) -> Any:
    """The tokenizer of CLIP ``name`` from ``source``, checked: a folder without tokenizer files still loads
    one, of special tokens only, which reads every caption as unknown words."""
    from transformers import AutoTokenizer

    tokenizer = (cls or AutoTokenizer).from_pretrained(hub_source(source))
    words = tokenizer("a photo of a dog", add_special_tokens=False)["input_ids"]
    if not words or all(i == tokenizer.unk_token_id for i in words):
        raise ClipCapError(f"{name}: its tokenizer ({source}) knows no words ({len(tokenizer)} tokens): the "
                           "folder lacks the tokenizer's files (tokenizer.json, or vocab.json and merges.txt)")
    if len(tokenizer) > vocab_size:
        raise ClipCapError(f"{name}: the tokenizer ({source}) has {len(tokenizer)} tokens, the text tower "
                           f"{vocab_size}: not this CLIP's")
    if tokenizer.pad_token is None:
        raise ClipCapError(f"{name}: the tokenizer ({source}) has no padding token to pad captions with")
    return tokenizer
