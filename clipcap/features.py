"""CLIP image features: image decoding, OpenAI's preprocessing, and the frozen image encoder.

The original ran ``clip.load(...)`` and its torchvision transform. Here the same checkpoints
come through transformers (``ViT-B/32`` -> ``openai/clip-vit-base-patch32``), the ResNet CLIPs
(``RN50x4``...) from OpenAI's own files through :mod:`clipcap.resnet_clip`, and the transform
is OpenAI's, step for step: resize the shortest side (bicubic), centre crop, RGB, mean/std.

:func:`extract` encodes a dataset at scale: each image once (the original encoded a COCO image
once per caption), decoded in DataLoader workers, batched, fp16/bf16 on GPU; bad images are
skipped and reported, never encoded as zeros; output goes to a :mod:`clipcap.store` shard by
shard, so a killed run resumes (a rerun of another job is refused), and torchrun ranks split the shards.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import resnet_clip, store as feature_store
from .files import ClipCapError, atomic_write, open_regular, remove_stale_temp_files

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
# Preprocess resizes an image whole while its long side becomes at most this many crops wide.
MAX_RESIZE_RATIO = 8


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
        # Integer modes hold 16-bit samples (PNG/TIFF); float modes are taken as 0..1.
        values = np.asarray(image, dtype=np.float64)
        values = values * 255 if image.mode == "F" else values / 257
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


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


class ImageEncoder:
    """A frozen CLIP image tower: images in, unnormalised projected embeddings out (as ``encode_image``)."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], transform: Preprocess, dim: int,
                 name: str, device: torch.device, dtype: torch.dtype):
        self.embed = embed
        self.transform = transform
        self.dim = dim
        self.name = name
        self.device = device
        self.dtype = dtype

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised float32 pixels [B, 3, H, W] (CPU)."""
        return self.transform(images)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> float32 embeddings [B, D] on the encoder's device."""
        return self.embed(pixels.to(self.device, self.dtype)).float()

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode(self.preprocess(images))


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPU (as the original's CLIP ran), float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


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
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's weights are skipped on purpose, not worth a report
    try:
        config = AutoConfig.from_pretrained(source)
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


# --------------------------------------------------------------------------- extraction at scale


@dataclass
class ImageItem:
    """One image to encode once, and every caption that describes it."""

    image_id: Any
    captions: list[str]
    path: str  # the image file, or the tar archive that holds it
    span: tuple[int, int] | None = None  # (offset, size) of the image inside the archive
    name: str = ""  # for the skip report; defaults to ``path``

    def __post_init__(self) -> None:
        self.name = self.name or self.path

    def open(self) -> IO[bytes]:
        if self.span is None:
            return open_regular(self.path)
        with open_regular(self.path) as f:
            f.seek(self.span[0])
            return io.BytesIO(f.read(self.span[1]))


@dataclass
class Shard:
    """A unit of work and of output: its images are listed only when the shard is processed."""

    name: str
    list_items: Callable[[], tuple[list[ImageItem], list[tuple[str, str]]]]  # items, and (path, reason) skipped
    size: int | None = None  # images expected, for the progress bar
    fingerprint: str = ""  # what defines its images, known before they are listed (see extract's resume check)


class _Images(Dataset):
    """Decodes and crops images in DataLoader workers; a bad image becomes a reason, not an exception."""

    def __init__(self, items: Sequence[ImageItem], transform: Preprocess, max_pixels: int):
        self.items, self.transform, self.max_pixels = items, transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            with item.open() as f:
                image = load_image(f, name=item.name, max_pixels=self.max_pixels)
        except ClipCapError as e:
            return i, None, str(e).removeprefix(f"{item.name}: ")
        except Exception as e:  # a decoder bug on one odd file must not end a day-long job
            return i, None, f"decoder failed ({type(e).__name__}: {e})"
        return i, self.transform.crop(image), None


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, [(i, reason) for i, _, reason in batch if reason is not None]


def _encode_shard(shard: Shard, encoder: ImageEncoder, store: Path, batch_size: int, num_workers: int,
                  max_pixels: int, progress: tqdm, written_by: str) -> None:
    items, skipped = shard.list_items()
    progress.update(len(skipped))
    failed: list[tuple[int, str]] = [(i, "no caption") for i, item in enumerate(items) if not item.captions]
    todo = [i for i, item in enumerate(items) if item.captions]
    loader = DataLoader(_Images([items[i] for i in todo], encoder.transform, max_pixels), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=encoder.device.type == "cuda",
                        prefetch_factor=4 if num_workers else None)
    row_of: dict[int, int] = {}
    chunks = []
    for indices, pixels, failures in loader:
        failed += [(todo[i], reason) for i, reason in failures]
        if pixels is not None:
            embeddings = encoder.encode(encoder.transform.normalize(pixels.to(encoder.device, non_blocking=True)))
            finite = torch.isfinite(embeddings).all(dim=1).tolist()
            failed += [(todo[i], "non-finite embedding") for i, ok in zip(indices, finite) if not ok]
            for i in (i for i, ok in zip(indices, finite) if ok):
                row_of[todo[i]] = len(row_of)
            chunks.append(embeddings[torch.tensor(finite, device=embeddings.device)].half().cpu().numpy())
        progress.update(len(indices) + len(failures))
    captions, image_ids, rows = [], [], []
    for i, row in row_of.items():
        captions += items[i].captions
        image_ids += [items[i].image_id] * len(items[i].captions)
        rows += [row] * len(items[i].captions)
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float16)
    skipped = skipped + [(items[i].name, reason) for i, reason in sorted(failed)]
    feature_store.write_shard(store, shard.name, embeddings, captions, image_ids, rows, skipped, written_by)


def _distributed() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))


def clip_fingerprint(name: str) -> str | None:
    """A local CLIP directory's files by name, size and time (its weights and preprocessing); None for a hub name."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        info = path.stat()
        h.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _difference(key: str, before: Any, now: Any) -> str:
    if key == "shards":
        before, now = before or {}, now or {}
        if list(before) != list(now):
            return f"{len(before)} shards, not {len(now)}" if len(before) != len(now) else "other shard names"
        changed = [name for name in now if before[name] != now[name]]
        return f"other images in shard {changed[0]}" + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
    if key == "clip_model":
        return f"CLIP {before}, not {now}"
    if key == "clip_files":
        return "other files in its CLIP directory (weights or preprocessing changed)"
    return f"{key} {before!r}, not {now!r}"


def _check_job(store: Path, job: dict[str, Any]) -> None:
    """A rerun resumes only the job that the finished shards were made by: same images, shards, CLIP, dtype.

    ``job`` records what defines each shard's contents; any difference is refused, naming it,
    since the finished shards would otherwise be kept for images they do not hold.
    """
    path, job = store / "job.json", json.loads(json.dumps(job))  # as it reads back
    if path.is_file():
        before = json.loads(path.read_text())
        keys = [key for key in dict.fromkeys([*job, *before]) if before.get(key) != job.get(key)]
        if "clip_model" in keys and "clip_files" in keys:  # another CLIP has other files: say so once
            keys.remove("clip_files")
        differences = [_difference(key, before.get(key), job.get(key)) for key in keys]
        if differences:
            raise ClipCapError(f"{store}: was started with {'; '.join(differences)}; rerun with the same "
                               f"arguments, or delete {store} to start over")
        return
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(job) + "\n")


def extract(shards: Sequence[Shard], store: str | Path, clip_model: str = "ViT-B/32", *,
            device: str | torch.device | None = None, dtype: torch.dtype | None = None, batch_size: int = 256,
            num_workers: int | None = None, max_pixels: int = MAX_PIXELS, meta: dict[str, Any] | None = None,
            settings: dict[str, Any] | None = None) -> int | None:
    """Encode every shard's images once into the feature store ``store``; returns the number skipped.

    Resumable: finished shards are kept and skipped on a rerun of the same job (the shards'
    fingerprints, CLIP, dtype, pixel limit and ``settings``, e.g. the flags that made the shards);
    another job is refused. Under torchrun each rank takes
    every WORLD_SIZE-th shard and writes its own; after a barrier rank 0 merges the index (other
    ranks return None). The store is the same whatever the number of processes or interruptions.
    """
    store = Path(store)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ClipCapError(f"{store}: shard names repeat")
    rank, world, local_rank, local_world = _distributed()
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(days=7))  # ranks may finish hours apart
    try:
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if num_workers is None:
            num_workers = max(1, min(8, (os.cpu_count() or 1) // local_world - 1))
        dtype = dtype or default_dtype(torch.device(device))
        _check_job(store, {"clip_model": clip_model, "clip_files": clip_fingerprint(clip_model),
                           "dtype": str(dtype).removeprefix("torch."), "max_pixels": max_pixels, **(settings or {}),
                           "shards": {s.name: s.fingerprint for s in shards}})
        for folder in (store, store / feature_store.SHARD_DIR):  # what killed runs left
            remove_stale_temp_files(folder)
        mine = [s for k, s in enumerate(shards) if k % world == rank and not feature_store.shard_done(store, s.name)]
        if mine:
            encoder = load_image_encoder(clip_model, device, dtype)
            sizes = [s.size for s in mine]
            with tqdm(total=sum(sizes) if None not in sizes else None, unit="img", disable=local_rank != 0,
                      desc=f"CLIP {clip_model}" + (f" rank {rank}/{world}" if world > 1 else "")) as progress:
                for shard in mine:
                    _encode_shard(shard, encoder, store, batch_size, num_workers, max_pixels, progress,
                                  f"rank {rank}/{world}")
        if world > 1:
            dist.barrier()
        if rank != 0:
            return None
        return feature_store.merge(store, names, {"clip_model": clip_model, **(meta or {})})
    finally:
        if world > 1:
            dist.destroy_process_group()


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags parse_coco.py and parse_conceptual.py share (underscore style, as the original's)."""
    parser.add_argument("--clip_model_type", default="ViT-B/32",
                        help=f"{', '.join([*OPENAI_CHECKPOINTS, *OPENAI_RESNETS])}, a Hugging Face CLIP or "
                             "directory, or an OpenAI CLIP file (.pt)")
    parser.add_argument("--feature_store", action="store_true",
                        help="write a feature store directory (float16 shards + Parquet index) instead of the pickle")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=None, help="image decoding processes (default: CPUs - 1, at most 8)")
    parser.add_argument("--shard_size", type=int, default=10_000, help="images per shard: the most a killed run loses")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")
    parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                        help="CLIP's precision; auto = float16 on GPU (as the original), float32 on CPU")
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="larger images are skipped, not decoded")


def model_tag(clip_model: str) -> str:
    """``ViT-B/32`` -> ``ViT-B_32`` (the original's file names); a local directory -> its name, a file -> its stem."""
    path = Path(clip_model)
    return path.name if path.is_dir() else path.stem if path.is_file() else clip_model.replace("/", "_")


def extract_to(shards: Sequence[Shard], out: str | Path, args: argparse.Namespace, **meta: Any) -> Path | None:
    """Run :func:`extract` with the shared flags, into a store (``--feature_store``) or the original's pickle.

    The pickle is made from a store kept beside it (``NAME.pkl.parts``) until the pickle is written,
    so that a pickle run resumes too. Returns the output on the rank that wrote it, else None.
    """
    out = Path(out)
    work = out if args.feature_store else out.with_name(out.name + ".parts")
    if not args.feature_store and out.exists() and not work.exists():
        raise ClipCapError(f"{out}: already exists from a finished run; delete it to encode the images again")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    remove_stale_temp_files(out.parent)  # a killed run's half-written pickle
    skipped = extract(shards, work, args.clip_model_type, device=args.device, dtype=dtype, batch_size=args.batch_size,
                      num_workers=args.num_workers, max_pixels=args.max_pixels, meta=meta,
                      settings={"shard_size": args.shard_size, **meta})
    if skipped is None:
        return None
    meta = feature_store.read_meta(work)
    report = work / feature_store.SKIPPED_FILE
    if not args.feature_store:
        feature_store.to_pickle(work, out)
        report = shutil.copyfile(report, out.with_name(out.stem + "_skipped.tsv")) if skipped else None
        shutil.rmtree(work)
    print(f"wrote {out}: {meta['num_images']} images, {meta['num_captions']} captions; {skipped} images skipped"
          + (f", listed in {report}" if skipped else ""))
    return out
