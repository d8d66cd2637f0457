"""CLIP feature extraction speed: this project's pipeline against the original's parse_coco.py loop.

Same CLIP architecture (ViT-B/32 size, random weights: no download), same COCO-style images
(640x480 JPEGs, 5 captions each), same machine, one run, ratio printed.

- original: for every caption, read the image (skimage.io.imread, as the original), preprocess,
  encode a batch of one; each image is therefore encoded 5 times.
- ours: clipcap.extraction.extract: each image once, decoded in DataLoader workers, batched, written
  to a feature store; timed from loading CLIP to the finished store.

The images are split into rounds that alternate which method runs first, so that a change of load
on a shared machine falls on both.

    python bench/bench_features.py                 # 40 images x 5 captions, 1 torch thread (CPU: a few minutes)
    python bench/bench_features.py --images 400 --device cuda
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as photos
from skimage import io as skio
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from clipcap.encoder import load_image_encoder
from clipcap.extraction import ImageItem, extract
from clipcap.sources import chunked

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]


def random_vit_b32(out_dir: Path) -> Path:
    """CLIP ViT-B/32's image tower and projection (88M parameters), random weights, saved like the hub's."""
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512)).save_pretrained(out_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out_dir)
    return out_dir


def coco_like_images(folder: Path, n: int) -> list[Path]:
    """n distinct 640x480 JPEGs (COCO's typical size): crops of skimage's photos, some mirrored."""
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(getattr(photos, name)()).convert("RGB").resize((960, 720)) for name in PHOTOS]
    paths = []
    for i in range(n):
        x, y = rng.integers(0, 320), rng.integers(0, 240)
        image = sources[i % len(sources)].crop((x, y, x + 640, y + 480))
        if (i // len(sources)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        paths.append(folder / f"COCO_train2014_{i:012d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def original_loop(encoder, captions: list[tuple[Path, str]]) -> float:
    """parse_coco.py's loop: per caption, imread + preprocess + encode_image on a batch of one."""
    start = time.perf_counter()
    for path, _ in captions:
        image = encoder.transform([Image.fromarray(skio.imread(path))])
        encoder.encode(image).cpu()
    return time.perf_counter() - start


def pipeline(clip_dir: Path, captions: list[tuple[Path, str]], out: Path, args) -> float:
    """clipcap.extraction.extract on the same captions, from loading CLIP to the written store."""
    paths = list(dict.fromkeys(p for p, _ in captions))
    items = [ImageItem(i, [c for p, c in captions if p == path], str(path)) for i, path in enumerate(paths)]
    start = time.perf_counter()
    extract(chunked(items, 10_000), out, str(clip_dir), device=args.device, batch_size=args.batch_size,
            num_workers=args.num_workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=None, help="default: the pipeline's own default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the two methods")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both methods (on a busy shared CPU, OpenMP's spin-waiting makes "
                             "2 threads far slower than 1 for batch-1 runs, which would flatter the ratio)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_dir = random_vit_b32(tmp / "clip")
        (tmp / "images").mkdir()
        paths = coco_like_images(tmp / "images", args.images)
        captions = [(p, f"caption {j}") for p in paths for j in range(args.captions_per_image)]
        encoder = load_image_encoder(str(clip_dir), args.device)
        encoder.encode(encoder.transform([Image.open(paths[0]).convert("RGB")]))  # warm-up

        # Rounds alternate which method goes first (A B, B A, ...): a change of load on a shared
        # machine then falls on both alike.
        original = ours = 0.0
        for r, images in enumerate(np.array_split(np.array(paths, dtype=object), args.rounds)):
            part = [(p, c) for p, c in captions if p in set(images)]
            if r % 2 == 0:
                original += original_loop(encoder, part)
                ours += pipeline(clip_dir, part, tmp / f"store{r}", args)
            else:
                ours += pipeline(clip_dir, part, tmp / f"store{r}", args)
                original += original_loop(encoder, part)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {args.device}")
    print(f"CLIP ViT-B/32 (random weights), {args.images} images x {args.captions_per_image} captions")
    print(f"original loop (per caption, batch 1): {original:7.1f} s  {args.images / original:7.2f} images/s")
    print(f"clipcap extract (once per image):     {ours:7.1f} s  {args.images / ours:7.2f} images/s")
    print(f"speed-up: {original / ours:.1f}x")


if __name__ == "__main__":
    main()
