"""The frozen CLIP image encoder: image decoding, OpenAI's preprocessing, and the image tower.

The original ran ``clip.load(...)`` and its torchvision transform. Here the same checkpoints come
through transformers (``ViT-B/32`` -> ``openai/clip-vit-base-patch32``), the ResNet CLIPs
(``RN50x4``...) from OpenAI's own files through :mod:`clipcap.resnet_clip`, and the transform is
OpenAI's, step for step: resize the shortest side (bicubic), centre crop, RGB, mean/std.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import hub_access, resnet_clip
from .files import ClipCapError, open_regular

# The original's CLIP names and the official OpenAI checkpoints on the Hugging Face hub.
OPENAI_CHECKPOINTS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
# ResNet CLIPs exist only as OpenAI's own files, read by clipcap.resnet_clip.
OPENAI_RESNETS = tuple(resnet_clip.URLS)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's own decompression-bomb limit (~89 Mpx); larger images are skipped, not decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# The image files looked for in folders and archives (Pillow reads them all).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Preprocess resizes an image whole while its long side becomes at most this many crops wide.
MAX_RESIZE_RATIO = 8
# Pixels of a 16-bit or float image converted to 8 bits at a time.
_BAND_PIXELS = 1 << 16


def load_image(source: str | Path | IO[bytes], name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (path or binary file object) to RGB; a bad image raises ClipCapError.

    The first frame of an animation is used; 16-bit grayscale is scaled to 8 bits (Pillow would
    clip it to white); CMYK, palette, grayscale and alpha images are converted as OpenAI's
    ``convert("RGB")`` does (alpha dropped).
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "<image>"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            file = open_regular(source) if isinstance(source, (str, Path)) else contextlib.nullcontext(source)
            with file as f, Image.open(f) as image:
                if image.width * image.height > max_pixels:
                    raise ClipCapError(f"{name}: {image.width}x{image.height} image is over the "
                                       f"{max_pixels:,}-pixel limit")
                image.load()
                return _to_rgb(image)
    except ClipCapError:
        raise
    except Image.UnidentifiedImageError:  # its message names the file object, not the file
        raise ClipCapError(f"{name}: unreadable image (not an image format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ClipCapError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _to_8_bits(image).convert("RGB")
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit (integer modes, as PNG/TIFF hold them) or 0..1 float image as 8-bit grayscale, rounded to nearest.

    Converted a band of rows at a time, so that the scratch memory stays small whatever the image
    size: a 40-megapixel 16-bit PNG is a few kB on disk.
    """
    out = Image.new("L", image.size)
    rows = max(1, _BAND_PIXELS // max(1, image.width))
    for top in range(0, image.height, rows):
        band = np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))
        if image.mode == "F":
            band = np.clip(np.rint(band.astype(np.float64) * 255), 0, 255)
        else:  # round(v / 257) in integers: 257 is odd, so no integer lies halfway between two steps
            band = (np.clip(band.astype(np.int64), 0, 65535) + 128) // 257
        out.paste(Image.fromarray(band.astype(np.uint8)), (0, top))
    return out


@dataclass(frozen=True)
class Preprocess:
    """OpenAI CLIP's transform: Resize(size, bicubic), CenterCrop(crop), ToTensor, Normalize.

    ``crop`` runs on the CPU (DataLoader workers) and yields uint8; ``normalize`` runs where the
    model is, so workers ship 4x fewer bytes.
    """

    size: int = 224  # shortest side after resizing
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def crop(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 [3, crop, crop], with torchvision's size and offset rounding.

        An image so elongated that resizing it whole would take over ``MAX_RESIZE_RATIO`` times
        the crop (a 65000x1 PNG would need gigabytes) has only the span the centre crop keeps
        resized; every other image is resized whole, exactly as torchvision does.
        """
        w, h = image.size
        if min(w, h) != self.size:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)
            if new_long <= MAX_RESIZE_RATIO * max(self.size, self.crop_size):
                image = image.resize((self.size, new_long) if w <= h else (new_long, self.size),
                                     Image.Resampling.BICUBIC)
            else:  # the crop's span of the resized image, from the same span of the original
                start, scale = int(round((new_long - self.crop_size) / 2.0)), long / new_long
                span = (start * scale, (start + self.crop_size) * scale)
                box = (0, span[0], w, span[1]) if w <= h else (span[0], 0, span[1], h)
                image = image.resize((self.size, self.crop_size) if w <= h else (self.crop_size, self.size),
                                     Image.Resampling.BICUBIC, box=box)
            w, h = image.size
        if w < self.crop_size or h < self.crop_size:  # only when crop_size > size, as torchvision pads
            padded = Image.new("RGB", (max(w, self.crop_size), max(h, self.crop_size)))
            padded.paste(image, ((padded.width - w) // 2, (padded.height - h) // 2))
            image, (w, h) = padded, padded.size
        top, left = int(round((h - self.crop_size) / 2.0)), int(round((w - self.crop_size) / 2.0))
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 ``(x / 255 - mean) / std`` on the same device."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255 - mean) / std

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.normalize(torch.stack([self.crop(image) for image in images]))


@dataclass
class ImageEncoder:
    """A frozen CLIP image tower: images in, unnormalised projected embeddings out (as ``encode_image``)."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # normalised pixels -> embeddings, in ``dtype`` on ``device``
    transform: Preprocess
    dim: int
    name: str
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> float32 embeddings [B, D] on the encoder's device."""
        return self.embed(pixels.to(self.device, self.dtype)).float()

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode(self.transform(images))


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPU (as the original's CLIP ran), float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def same_clip(a: str | None, b: str | None) -> bool:
    """Whether two CLIP names mean one model (``ViT-B/32`` is ``openai/clip-vit-base-patch32``;
    a local folder is itself however its path is spelled); an unknown one (None) matches nothing."""
    def identity(name: str) -> str:
        name = OPENAI_CHECKPOINTS.get(name, name)
        return str(Path(name).resolve()) if Path(name).is_dir() else name
    return a is not None and b is not None and identity(a) == identity(b)


def load_image_encoder(name: str = "ViT-B/32", device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> ImageEncoder:
    """A CLIP by the original's name (``ViT-B/32``, ``RN50x4``...), a Hugging Face name or directory, or
    an OpenAI CLIP file (TorchScript archive or state dict)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if name in OPENAI_RESNETS or Path(name).is_file():
        model = resnet_clip.load(name, device, dtype)
        size = model.input_resolution
        return ImageEncoder(model, Preprocess(size=size, crop_size=size), model.output_dim, name, device, dtype)
    return _load_hf_clip(name, device, dtype)


def _load_hf_clip(name: str, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
    from transformers import AutoConfig, CLIPImageProcessorPil, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    source = OPENAI_CHECKPOINTS.get(name, name)
    hub_access.prepare(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are skipped on purpose, not worth a report
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)  # a folder's code never runs
        if config.model_type == "clip":  # a full CLIP: its projection width lives at the top level
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        model, info = CLIPVisionModelWithProjection.from_pretrained(source, config=config, dtype=dtype,
                                                                    output_loading_info=True)
        processor = CLIPImageProcessorPil.from_pretrained(source)
    except (OSError, ValueError, RuntimeError) as e:
        raise ClipCapError(f"{name}: not a CLIP checkpoint name or directory ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ClipCapError(f"{name}: checkpoint lacks image-tower weights {sorted(info['missing_keys'])[:3]}")
    model.eval().requires_grad_(False).to(device)
    transform = Preprocess(size=processor.size.shortest_edge, crop_size=processor.crop_size.height,
                           mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    return ImageEncoder(lambda pixels: model(pixel_values=pixels).image_embeds, transform,
                        config.projection_dim, name, device, dtype)
