"""CLIPScore (Hessel et al., 2021): how well a caption fits its image by CLIP, with or without references.

    CLIP-S(c, v)       = 2.5 * max(cos(E_v, E_c), 0)
    RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max_r cos(E_c, E_r), 0)

as in Hessel's reference code: CLIP ViT-B/32; every text, caption and reference alike, is read
as "A photo depicts " + text, cut to the text tower's context length (its end token kept);
embeddings are L2-normalised; images go through OpenAI's preprocessing (:mod:`clipcap.encoder`).
The scores are the mean over images of the per-image values; beside the COCO metrics of a run
(:func:`add_clip_scores`) they are in the same units as those, the paper's x100.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .encoder import OPENAI_CHECKPOINTS, ImageEncoder, default_dtype, load_image_encoder, same_clip
from .evaluation import ENTIRE, PERCENT, Evaluation
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
        self._check_tokenizer(config.text_config.vocab_size)
        self.model.eval().requires_grad_(False).to(self.device)
        self.context_length = config.text_config.max_position_embeddings
        self._encoder: ImageEncoder | None = None

    def _check_tokenizer(self, vocab_size: int) -> None:
        """A CLIP folder without tokenizer files still loads a tokenizer, of its two special tokens only,
        which reads every text as unknown words: scores of that would be numbers about nothing."""
        words = self.tokenizer(PREFIX.strip(), add_special_tokens=False)["input_ids"]
        if not words or all(i == self.tokenizer.unk_token_id for i in words):
            raise ClipCapError(f"{self.name} (--clipscore_model): its tokenizer knows no words ({len(self.tokenizer)} "
                               "tokens); the folder lacks CLIP's tokenizer files (vocab.json and merges.txt, or "
                               "tokenizer.json)")
        if len(self.tokenizer) > vocab_size:
            raise ClipCapError(f"{self.name} (--clipscore_model): its tokenizer has {len(self.tokenizer)} tokens, "
                               f"its text tower {vocab_size}: not one CLIP's")

    @property
    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            self._encoder = load_image_encoder(self.name, self.device, self.dtype)
        return self._encoder

    def needs_images(self, embeddings_clip: str | None, has_embeddings: bool, has_images: bool) -> bool:
        """Whether image files must be embedded: unless the run's image embeddings come from this CLIP
        (``embeddings_clip``). Asked before any work: then the image tower loads, or, with no image files
        to read, the error says so."""
        if has_embeddings and same_clip(embeddings_clip, self.name):
            return False
        if not has_images:
            problem = "the run has no image embeddings" if not has_embeddings else \
                f"the run's image embeddings are made by {embeddings_clip or 'an unrecorded CLIP'}, not {self.name}"
            raise ClipCapError(f"--clipscore: {problem}; pass --images FOLDER to embed the images")
        self.encoder  # noqa: B018 (loaded now, so a broken image tower fails before the run)
        return True

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

    def embed_images(self, files: Mapping[Any, str | Path],
                     batch_size: int = 64) -> tuple[dict[Any, torch.Tensor], list[str]]:
        """Unnormalised embeddings (float32) of image files by id, and a line per file that could not be
        read: it is left out, as the captioner leaves it out."""
        ids, embeds, skipped = self.encoder.embed_all(files, batch_size, skip_unreadable=True)
        return dict(zip(ids, embeds.cpu())), skipped

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


def add_clip_scores(evaluations: dict[str, Evaluation], captions: Mapping[Any, str],
                    references: Mapping[Any, list[str]], scorer: CLIPScorer,
                    image_embeds: Mapping[Any, torch.Tensor]) -> None:
    """CLIP-S and RefCLIP-S of every scored image into ``evaluations`` (a run's COCO metrics, as
    :meth:`clipcap.evaluation.Scorer.by_domain` gives them), in their units (x100): each per-image row,
    and each subset's mean. ``image_embeds`` are made by the scorer's CLIP (see :meth:`CLIPScorer.needs_images`)."""
    ids = [row["image_id"] for row in evaluations[ENTIRE].per_image]
    embeds = torch.stack([image_embeds[k] for k in ids])
    values = scorer({k: captions[k] for k in ids}, {k: references[k] for k in ids}, embeds)
    for evaluation in evaluations.values():
        for row in evaluation.per_image:
            row.update({key: PERCENT * value for key, value in values[row["image_id"]].items()})
        for key in KEYS:
            evaluation.scores[key] = float(np.mean([row[key] for row in evaluation.per_image]))
