"""The frozen CLIP image encoder: image decoding, each tower's preprocessing, and the image tower.

The original ran ``clip.load(...)`` and its torchvision transform. Here the same checkpoints come
through transformers (``ViT-B/32`` -> ``openai/clip-vit-base-patch32``), the ResNet CLIPs
(``RN50x4``...) from OpenAI's own files through :mod:`clipcap.resnet_clip`, and the transform is
OpenAI's, step for step: resize the shortest side (bicubic), centre crop, RGB, mean/std.

Any other contrastive image-text model in transformers (a CLIP of another maker, MetaCLIP,
SigLIP, SigLIP 2...) gives its ``get_image_features``, preprocessed as its own image processor
does (SigLIP: the whole image resized to a square, mean = std = 0.5), reproduced here so that
decoding and resizing stay in DataLoader workers, as 8-bit pixels.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import hub_access, resnet_clip
from .files import ClipCapError, first_line, open_regular

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
    """An image tower's transform; by default OpenAI CLIP's: Resize(size, bicubic), CenterCrop(crop), ToTensor,
    Normalize.

    ``crop`` runs on the CPU (DataLoader workers) and yields uint8; ``normalize`` runs where the
    model is, so workers ship 4x fewer bytes. transformers' image processors take the same steps
    (:func:`processor_transform`) but for two: their centre crop starts at the floor of half the
    spare pixels (torchvision rounds half to even), and SigLIP's resizes the whole image to
    ``resize_to`` instead of resizing its shortest side and cropping.
    """

    size: int = 224  # shortest side after resizing
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_to: tuple[int, int] | None = None  # (height, width) of every image, aspect ratio not kept, no crop
    resample: int = Image.Resampling.BICUBIC
    torchvision_rounding: bool = True  # the crop's offsets as torchvision's (OpenAI); else as transformers'

    def crop(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 [3, H, W]: resized and centre-cropped, with the reference's size and offset rounding.

        An image so elongated that resizing it whole would take over ``MAX_RESIZE_RATIO`` times
        the crop (a 65000x1 PNG would need gigabytes) has only the span the centre crop keeps
        resized; every other image is resized whole, exactly as torchvision does.
        """
        if self.resize_to is not None:
            height, width = self.resize_to
            return _tensor(image.resize((width, height), self.resample))
        w, h = image.size
        if min(w, h) != self.size:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)
            if new_long <= MAX_RESIZE_RATIO * max(self.size, self.crop_size):
                image = image.resize((self.size, new_long) if w <= h else (new_long, self.size), self.resample)
            else:  # the crop's span of the resized image, from the same span of the original
                start, scale = self._offset(new_long - self.crop_size), long / new_long
                span = (start * scale, (start + self.crop_size) * scale)
                box = (0, span[0], w, span[1]) if w <= h else (span[0], 0, span[1], h)
                image = image.resize((self.size, self.crop_size) if w <= h else (self.crop_size, self.size),
                                     self.resample, box=box)
            w, h = image.size
        if w < self.crop_size or h < self.crop_size:  # only when crop_size > size: padded with black
            padded = Image.new("RGB", (max(w, self.crop_size), max(h, self.crop_size)))
            padded.paste(image, (self._pad_offset(padded.width - w), self._pad_offset(padded.height - h)))
            image, (w, h) = padded, padded.size
        top, left = self._offset(h - self.crop_size), self._offset(w - self.crop_size)
        return _tensor(image.crop((left, top, left + self.crop_size, top + self.crop_size)))

    def _offset(self, spare: int) -> int:
        """Where a centre crop starts, ``spare`` pixels being cut: torchvision rounds half of them (half to
        even), transformers' processors floor it."""
        return int(round(spare / 2.0)) if self.torchvision_rounding else spare // 2

    def _pad_offset(self, missing: int) -> int:
        """Where the image goes in a padded one ``missing`` pixels larger: torchvision floors, transformers ceils."""
        return missing // 2 if self.torchvision_rounding else -(-missing // 2)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 ``(x / 255 - mean) / std`` on the same device."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255 - mean) / std

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.normalize(torch.stack([self.crop(image) for image in images]))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def processor_transform(processor: Any, name: str, torchvision_rounding: bool = False) -> Preprocess:
    """The transform of a transformers image processor (its Pil class's steps, sizes, resampling, mean
    and std); a step it takes that :class:`Preprocess` does not is a one-line error naming it, never
    features of other pixels than the model's own processor would give."""
    kind = type(processor).__name__

    def refuse(what: str) -> ClipCapError:
        return ClipCapError(f"{name}: its image processor ({kind}) {what}; only processors that resize (the "
                            "shortest side then a centre crop, or to a fixed size) and normalise are supported")

    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    if getattr(processor, "max_num_patches", None):
        raise refuse("resizes each image to its own number of patches (SigLIP 2's NaFlex); the fixed-resolution "
                     "SigLIP 2 checkpoints (google/siglip2-base-patch16-224...) work")
    if not getattr(processor, "do_resize", False) or size is None:
        raise refuse("does not resize images to one size")
    if getattr(processor, "do_pad", False) or getattr(processor, "rescale_offset", False):
        raise refuse("pads or offsets pixels")
    if not getattr(processor, "do_rescale", False) or not math.isclose(processor.rescale_factor, 1 / 255):
        raise refuse(f"scales pixels by {getattr(processor, 'rescale_factor', None)}, not 1/255")
    cropping = bool(getattr(processor, "do_center_crop", False))
    options: dict[str, Any] = {"resample": int(getattr(processor, "resample", Image.Resampling.BICUBIC)),
                               "torchvision_rounding": torchvision_rounding}
    if getattr(processor, "do_normalize", False):
        options.update(mean=_triple(processor.image_mean), std=_triple(processor.image_std))
    else:
        options.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if size.shortest_edge and not size.longest_edge:
        if not cropping:
            raise refuse("keeps each image's aspect ratio without a crop (images of many sizes)")
        if crop.height != crop.width:
            raise refuse(f"crops to {crop.height}x{crop.width}, not a square")
        return Preprocess(size=size.shortest_edge, crop_size=crop.height, **options)
    if size.height and size.width:
        if cropping and (crop.height, crop.width) != (size.height, size.width):
            raise refuse(f"crops a {size.height}x{size.width} image to {crop.height}x{crop.width}")
        return Preprocess(size=min(size.height, size.width), crop_size=min(size.height, size.width),
                          resize_to=(size.height, size.width), **options)
    raise refuse(f"resizes by {dict((k, v) for k, v in vars(size).items() if v)}")


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    return values[0], values[1], values[2]


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

    def embed_all(self, images: Mapping[Any, str | Path | Image.Image], batch_size: int,
                  skip_unreadable: bool = False) -> tuple[list[Any], torch.Tensor, list[str]]:
        """Embeddings of image files or PIL images by id, read ``batch_size`` at a time: the ids read, their
        embeddings [N, D], and a line per file that could not be read, which raises ClipCapError unless
        ``skip_unreadable`` (then it is left out)."""
        items = list(images.items())
        ids, chunks, skipped = [], [], []
        for start in tqdm(range(0, len(items), batch_size), desc="reading images", unit="batch",
                          disable=len(items) <= batch_size):
            read, pictures = [], []
            for image_id, image in items[start:start + batch_size]:
                try:
                    pictures.append(picture(image))
                    read.append(image_id)
                except ClipCapError as e:
                    if not skip_unreadable:
                        raise
                    skipped.append(str(e))
            if pictures:
                chunks.append(self(pictures))
                ids += read
        return ids, torch.cat(chunks) if chunks else torch.zeros(0, self.dim), skipped


def picture(image: str | Path | Image.Image) -> Image.Image:
    """A PIL image as RGB, or an image file read (a bad file raises ClipCapError)."""
    return image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)


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
    """A CLIP by the original's name (``ViT-B/32``, ``RN50x4``...), a transformers image-text model (CLIP,
    SigLIP, ...) by Hugging Face name or directory, or an OpenAI CLIP file (TorchScript archive or state dict)."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if is_openai_file(name):
        model = resnet_clip.load(name, device, dtype)
        size = model.input_resolution
        return ImageEncoder(model, Preprocess(size=size, crop_size=size), model.output_dim, name, device, dtype)
    return _load_hf_tower(name, device, dtype)


def is_openai_file(name: str) -> bool:
    """Whether ``name`` is a ResNet CLIP name or an OpenAI CLIP file (read by :mod:`clipcap.resnet_clip`)."""
    return name in OPENAI_RESNETS or Path(name).is_file()


def hub_source(name: str) -> str:
    """Where transformers finds a CLIP: the Hub id of OpenAI's names (``ViT-B/32``), else the name itself."""
    return OPENAI_CHECKPOINTS.get(name, name)


@contextlib.contextmanager
def loading(name: str) -> Iterator[None]:
    """Around transformers' loading of a model ``name``: its failures become one line, its reports of the
    other tower's weights (skipped on purpose) are silenced."""
    from transformers.utils import logging as hf_logging

    hub_access.prepare(hub_source(name))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        where = "not a CLIP checkpoint directory" if Path(name).is_dir() else \
            "not a CLIP checkpoint directory, and not loadable from the Hugging Face Hub (offline, or not a name there?)"
        raise ClipCapError(f"{name}: {where} ({first_line(e)}){hub_access.unreachable_hint()}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_pretrained(name: str, cls: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` of CLIP ``name`` in eval mode, frozen; a checkpoint lacking weights is refused
    (they would be random)."""
    model, info = cls.from_pretrained(hub_source(name), output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise ClipCapError(f"{name}: checkpoint lacks weights {sorted(info['missing_keys'])[:3]}")
    return model.eval().requires_grad_(False)


def pooled(output: Any) -> torch.Tensor:
    """What ``get_image_features`` / ``get_text_features`` return: a tensor, or (transformers 5) an output
    whose ``pooler_output`` is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_hf_tower(name: str, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
    """A transformers CLIP's image tower alone (its projection included), or any other image-text model
    with ``get_image_features``, and the transform of its own image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    with loading(name):
        config = AutoConfig.from_pretrained(hub_source(name), trust_remote_code=False)  # a folder's code never runs
        if config.model_type == "clip":  # a full CLIP: its projection width lives at the top level
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
        if config.model_type == "clip_vision_model":
            model = load_pretrained(name, CLIPVisionModelWithProjection, config=config, dtype=dtype)
            embed, dim = (lambda pixels: model(pixel_values=pixels).image_embeds), config.projection_dim
        else:
            model = load_pretrained(name, AutoModel, config=config, dtype=dtype, trust_remote_code=False)
            if not hasattr(model, "get_image_features"):
                raise ClipCapError(f"{name}: a {config.model_type} model has no get_image_features: not an "
                                   "image-text model like CLIP or SigLIP")
            embed, dim = (lambda pixels: pooled(model.get_image_features(pixel_values=pixels))), None
        processor = AutoImageProcessor.from_pretrained(hub_source(name), backend="pil", trust_remote_code=False)
    openai = hub_source(name) in OPENAI_CHECKPOINTS.values()  # OpenAI's CLIPs keep OpenAI's (torchvision's) rounding
    transform = processor_transform(processor, name, torchvision_rounding=openai)
    encoder = ImageEncoder(embed, transform, dim or 0, name, device, dtype)
    model.to(device)
    if not dim:  # the width of what get_image_features gives: asked of the model, whatever its config calls it
        height, width = transform.resize_to or (transform.crop_size, transform.crop_size)
        encoder.dim = int(encoder.encode(torch.zeros(1, 3, height, width)).shape[-1])
    return encoder
