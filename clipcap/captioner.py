"""Captioning with a trained ClipCap: checkpoint in; images or CLIP features in; captions out.

    captioner = Captioner.from_checkpoint("coco_weights.pt")   # or a saved folder, or a Hub repo id
    captioner.caption(["photo.jpg"])            # [["A dog sitting on a bench."]]
    captioner.save_pretrained("coco_mlp/")      # or captioner.push_to_hub("owner/clipcap-coco")

The CLIP image encoder is the one the checkpoint was trained on (its config, or for an
original checkpoint its embedding width), loaded on first use: captioning cached features
needs no CLIP at all.
"""
from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from .checkpoint import UNKNOWN_CLIP, load_checkpoint
from .decoding import DecodingOptions, caption_embeddings
from .encoder import IMAGE_EXTENSIONS, load_image_encoder, picture
from .featureset import FeatureSet
from .files import ClipCapError
from .hub import push_to_hub, resolve_checkpoint, save_pretrained
from .model import ClipCap, load_tokenizer
from .model import merge_lora as merge_lora_into


def image_paths(sources: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order, without repeats.

    A named file is kept whatever it is (reading it reports a bad one); a folder without images
    or a pattern that matches nothing is an error.
    """
    paths: list[Path] = []
    for source in map(str, sources):
        if Path(source).is_dir():
            found = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise ClipCapError(f"{source}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(source):
            found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not found:
                raise ClipCapError(f"{source}: no file matches")
        else:
            found = [Path(source)]
        paths.extend(found)
    return list(dict.fromkeys(paths))


class Captioner:
    """A ClipCap model, its tokenizer and (on first use) its CLIP image encoder."""

    def __init__(self, model: ClipCap, tokenizer: Any, clip_model: str, device: str | torch.device = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.clip_model = clip_model
        self.device = torch.device(device)
        self._encoder = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", lm: str | None = None,
                        clip_model: str | None = None, normalize_prefix: bool | None = None,
                        lm_dtype: str | None = None, merge_lora: bool = False) -> "Captioner":
        """Any ClipCap checkpoint, ours or the original's, a saved folder or a Hugging Face Hub repo id
        (see :func:`clipcap.hub.resolve_checkpoint`), with nothing to configure.

        ``lm`` (name or local directory) replaces where the LM and its tokenizer come from;
        ``clip_model``, ``normalize_prefix`` and ``lm_dtype`` (bfloat16 halves a large LM's memory)
        replace the checkpoint's (or inferred) settings. ``merge_lora`` folds a LoRA checkpoint's
        adapters into the LM: the same captions, a little faster.
        """
        overrides = {key: value for key, value in (("clip_model", clip_model), ("normalize_prefix", normalize_prefix),
                                                   ("lm_dtype", lm_dtype)) if value is not None}
        model = load_checkpoint(resolve_checkpoint(path), device, lm=lm, **overrides)
        tokenizer = load_tokenizer(model.config.lm, model.config.lm_revision)
        if merge_lora:
            merge_lora_into(model)
        return cls(model, tokenizer, model.config.clip_model, device)

    from_pretrained = from_checkpoint  # the Hugging Face name, for repo ids and saved folders

    def save_pretrained(self, folder: str | Path, **card: Any) -> Path:
        """Write a folder to load with :meth:`from_pretrained` or upload to the Hub; ``card``
        (dataset, recipe, metrics, source, repo_id) as in :func:`clipcap.hub.save_pretrained`."""
        self.model.config.clip_model = self.clip_model  # the CLIP this captioner encodes images with
        return save_pretrained(self.model, folder, **card)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None, **card: Any) -> str:
        """Upload to the Hugging Face Hub as :func:`clipcap.hub.push_to_hub` does; returns the commit URL."""
        self.model.config.clip_model = self.clip_model
        return push_to_hub(self.model, repo_id, private=private, token=token, **card)

    @property
    def encoder(self):
        """The CLIP image encoder, loaded once; it must produce the width the checkpoint takes."""
        if self._encoder is None:
            if self.clip_model == UNKNOWN_CLIP:
                raise ClipCapError(f"the checkpoint does not name the CLIP of its {self.model.config.prefix_size}-d "
                                   "embeddings: name it with --clip_model (clip_model= in Python)")
            encoder = load_image_encoder(self.clip_model, self.device)
            if encoder.dim != self.model.config.prefix_size:
                raise ClipCapError(f"{self.clip_model}: gives {encoder.dim}-d embeddings, but the checkpoint takes "
                                   f"{self.model.config.prefix_size}-d ones; pass the CLIP it was trained with")
            self._encoder = encoder
        return self._encoder

    def embed(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """CLIP embeddings [N, D] of image files or PIL images (a bad file raises ClipCapError)."""
        return self.encoder([picture(image) for image in images])

    def caption_embeddings(self, clip_embeds: torch.Tensor, options: DecodingOptions | None = None,
                           batch_size: int = 16, progress: bool = False, **fields: Any) -> list[list[str]]:
        """Captions per CLIP embedding, best first. Like every captioning method here it takes ``options``
        and/or :class:`DecodingOptions` fields by keyword (``strategy="greedy"``), which override them."""
        options = dataclasses.replace(options or DecodingOptions(), **fields)
        return caption_embeddings(self.model, self.tokenizer, clip_embeds, options, batch_size, progress)

    def caption_all(self, images: Mapping[Any, str | Path | Image.Image] | FeatureSet,
                    options: DecodingOptions | None = None, batch_size: int = 16, skip_unreadable: bool = False,
                    source: str | Path = "features", **fields: Any) -> Captions:
        """Captions of every image: ``images`` maps image ids to files or PIL images, which are read and
        CLIP-embedded ``batch_size`` at a time, or is a feature set, whose first embedding per image id
        is taken. The embeddings are then decoded together, so a ``seed`` draws one stream for the whole
        run. An unreadable file raises ClipCapError, or with ``skip_unreadable`` is left out and reported
        in the result's ``skipped``. Every other captioning method of this class comes here."""
        if isinstance(images, FeatureSet):
            images.check_images(source)
            if images.dim != self.model.config.prefix_size:
                raise ClipCapError(f"{source}: features are {images.dim}-d, but the checkpoint takes "
                                   f"{self.model.config.prefix_size}-d CLIP embeddings ({self.model.config.clip_model})")
            ids, rows = images.first_rows()
            embeds, clip_model, skipped = images.embeddings_at(rows), images.clip_model, []
        else:
            ids, embeds, skipped = self.encoder.embed_all(images, batch_size, skip_unreadable)
            clip_model = self.clip_model
        captions = self.caption_embeddings(embeds, options, batch_size, progress=len(ids) > batch_size,
                                           **fields) if ids else []
        return Captions(dict(zip(ids, captions)), dict(zip(ids, embeds)), clip_model, skipped)

    def caption(self, images: Sequence[str | Path | Image.Image], options: DecodingOptions | None = None,
                batch_size: int = 16, **fields: Any) -> list[list[str]]:
        """Captions per image (file path or PIL image), best first: ``num_captions`` each (default 1)."""
        return list(self.caption_all(dict(enumerate(images)), options, batch_size, **fields).captions.values())

    def caption_files(self, paths: Sequence[str | Path], options: DecodingOptions | None = None,
                      batch_size: int = 16, **fields: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """COCO results ``[{"image_id": path, "caption"}]`` (``num_captions`` per image, best first),
        and one line per file that could not be read; the other files are captioned regardless."""
        run = self.caption_all({str(path): path for path in paths}, options, batch_size, skip_unreadable=True,
                               **fields)
        return run.results, run.skipped

    def caption_features(self, features: FeatureSet, options: DecodingOptions | None = None, batch_size: int = 16,
                         source: str | Path = "features", **fields: Any) -> list[dict[str, Any]]:
        """COCO results for cached CLIP features: one entry per distinct image id (``num_captions`` with more)."""
        return self.caption_all(features, options, batch_size, source=source, **fields).results


@dataclasses.dataclass
class Captions:
    """What :meth:`Captioner.caption_all` made: captions by image id, the CLIP embeddings they were made
    from, and the images it could not read."""

    captions: dict[Any, list[str]]  # image id -> its captions, best first, in the input's order
    embeddings: dict[Any, torch.Tensor]  # image id -> its CLIP embedding
    clip_model: str | None  # the CLIP that made the embeddings, when known
    skipped: list[str] = dataclasses.field(default_factory=list)  # one line per unreadable image

    @property
    def results(self) -> list[dict[str, Any]]:
        """The captions in the COCO results format ``[{"image_id", "caption"}]``."""
        return [{"image_id": image_id, "caption": c} for image_id, cs in self.captions.items() for c in cs]
