"""CLIPScore (Hessel et al., 2021): how well a caption fits its image by CLIP, with or without references.

    CLIP-S(c, v)       = 2.5 * max(cos(E_v, E_c), 0)
    RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max_r cos(E_c, E_r), 0)

as in Hessel's reference code: CLIP ViT-B/32; every text, caption and reference alike, is read
as "A photo depicts " + text, cut to the text tower's context length (its end token kept);
embeddings are L2-normalised; images go through OpenAI's preprocessing (:mod:`clipcap.encoder`).
The scores are the mean over images of the per-image values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .encoder import OPENAI_CHECKPOINTS, ImageEncoder, default_dtype, load_image, load_image_encoder
from .files import ClipCapError

PREFIX = "A photo depicts "
WEIGHT = 2.5
KEYS = ("CLIP-S", "RefCLIP-S")


class CLIPScorer:
    """CLIP's text tower and tokenizer (the image tower is loaded on first use, only if images need it)."""

    def __init__(self, name: str = "ViT-B/32", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        source = OPENAI_CHECKPOINTS.get(name, name)
        try:
            config = AutoConfig.from_pretrained(source)
            if config.model_type != "clip":
                raise ValueError(f"a {config.model_type} model, not a full CLIP")
            config.text_config.projection_dim = config.projection_dim  # a full CLIP keeps it at the top level
            self.model = CLIPTextModelWithProjection.from_pretrained(source, config=config.text_config,
                                                                     dtype=self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, RuntimeError) as e:
            raise ClipCapError(f"{name} (--clipscore_model): not a CLIP checkpoint with a tokenizer ({e})") from None
        self.model.eval().requires_grad_(False).to(self.device)
        self.context_length = config.text_config.max_position_embeddings
        self._encoder: ImageEncoder | None = None

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = load_image_encoder(self.name, self.device, self.dtype)
        return self._encoder

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings [N, D] (float32) of ``PREFIX + text``."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer([PREFIX + t for t in texts[start:start + batch_size]], padding=True,
                                    truncation=True, max_length=self.context_length, return_tensors="pt")
            out = self.model(input_ids=tokens["input_ids"].to(self.device),
                             attention_mask=tokens["attention_mask"].to(self.device))
            chunks.append(out.text_embeds.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.projection_dim)

    def embed_images(self, paths: Sequence[str | Path], batch_size: int = 64) -> torch.Tensor:
        """Unnormalised image embeddings [N, D] (float32) of image files (a bad file raises ClipCapError)."""
        chunks = [self.encoder([load_image(p) for p in paths[start:start + batch_size]]).float().cpu()
                  for start in range(0, len(paths), batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.encoder.dim)

    def __call__(self, captions: dict[Any, str], references: dict[Any, list[str]],
                 image_embeds: torch.Tensor) -> dict[Any, dict[str, float]]:
        """CLIP-S and RefCLIP-S per image, for ``captions`` keyed like ``references``; ``image_embeds``
        [len(captions), D] in the captions' order."""
        ids = list(captions)
        if image_embeds.shape[0] != len(ids):
            raise ClipCapError(f"CLIPScore: {image_embeds.shape[0]} image embeddings for {len(ids)} captions")
        if image_embeds.shape[1] != self.model.config.projection_dim:
            raise ClipCapError(f"CLIPScore: {image_embeds.shape[1]}-d image embeddings, but {self.name} gives "
                               f"{self.model.config.projection_dim}-d ones")
        flat = [r for k in ids for r in references[k]]
        owner = torch.tensor([i for i, k in enumerate(ids) for _ in references[k]])
        images = _unit(image_embeds.float().cpu())
        texts = _unit(self.embed_texts([captions[k] for k in ids]))
        refs = _unit(self.embed_texts(flat))
        clip_s = WEIGHT * (images * texts).sum(1).clamp(min=0)
        text_sim = torch.full((len(ids),), -1.0).scatter_reduce(0, owner, (texts[owner] * refs).sum(1), "amax")
        text_sim = text_sim.clamp(min=0)
        total = clip_s + text_sim
        ref_clip_s = torch.where(total > 0, 2 * clip_s * text_sim / total.clamp(min=1e-12), torch.zeros(()))
        return {k: {"CLIP-S": float(c), "RefCLIP-S": float(r)} for k, c, r in zip(ids, clip_s, ref_clip_s)}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)
