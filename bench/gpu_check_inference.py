"""Inference checks of bench/gpu_check.py: CLIP extraction in float16 against float32, and batched decoding.

Extraction runs clipcap.extraction.extract on COCO-sized photos with a ViT CLIP (Hugging Face) and an
OpenAI ResNet CLIP, once in each dtype; float16 must stay close to float32 (the ResNet's BatchNorm
variances lie beyond float16's range, as trained ones do). Decoding runs clipcap.decoding's greedy and
beam search on a batch and one image at a time: the captions must be the same, token for token (in
float32 matmuls: TF32's coarser rounding could flip a near-tie between the two, which is not a bug).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from bench_decoding import end_captions
from bench_features import coco_like_images
from gpu_check_common import FAIL, Check, Context, failure, logged, verdict

from clipcap.data import load_features
from clipcap.decoding import beam_tokens, greedy_tokens, stop_tokens
from clipcap.extraction import ImageItem, extract
from clipcap.featureset import FeatureSet
from clipcap.model import ClipCap, ClipCapConfig, build_model, load_tokenizer
from clipcap.sources import chunked

IMAGES, SHARD_SIZE = 12, 4  # three shards, so that two ranks share them
DTYPES = {"float32": torch.float32, "float16": torch.float16}
MAX_RELATIVE_ERROR = 0.02  # float16 against float32, per embedding: |a - b| / |a|
STOP_SLOPE = 0.01  # a tiny random GPT-2 then ends its captions after 9-20 tokens (bench_decoding.end_captions)
DECODING = "batched = one image at a time"


def clips(ctx: Context) -> dict[str, str]:
    return {"ViT CLIP": ctx.backbones.vit_clip, "ResNet CLIP": ctx.backbones.resnet_clip}


def image_items(ctx: Context) -> list[ImageItem]:
    """COCO-sized photos (640x480 JPEGs), made once per run."""
    folder = ctx.work / "images"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        coco_like_images(folder, IMAGES)
    return [ImageItem(i, [f"photo {i}."], str(path)) for i, path in enumerate(sorted(folder.glob("*.jpg")))]


def encode(ctx: Context, clip: str, dtype: str, store: Path) -> float:
    """Extract the photos into ``store`` in one process; returns the seconds (a finished store is kept)."""
    start = time.perf_counter()
    extract(chunked(image_items(ctx), SHARD_SIZE), store, clip, device=ctx.device, dtype=DTYPES[dtype],
            batch_size=SHARD_SIZE, num_workers=0)
    return time.perf_counter() - start


def store_path(ctx: Context, clip_name: str, dtype: str) -> Path:
    return ctx.work / "stores" / f"{clip_name.replace(' ', '_')}_{dtype}"


def compare(reference: FeatureSet, other: FeatureSet, tolerance: float) -> tuple[list[str], float]:
    """Problems (other images, far embeddings) and the largest relative error per embedding."""
    ids, rows = reference.first_rows()
    other_ids, other_rows = other.first_rows()
    if ids != other_ids:
        return [f"other images: {other_ids[:5]} ... instead of {ids[:5]} ..."], float("nan")
    a, b = reference.embeddings_at(rows), other.embeddings_at(other_rows)
    if not torch.isfinite(b).all():
        return [f"{int((~torch.isfinite(b).all(1)).sum())} non-finite embeddings"], float("nan")
    error = float(((a - b).norm(dim=1) / a.norm(dim=1)).max())
    return ([] if error <= tolerance else [f"relative error up to {error:.3g} (> {tolerance})"]), error


def extraction_checks(ctx: Context) -> list[Check]:
    """Each CLIP in float16 against float32, both on this device."""
    checks = []
    for name, clip in clips(ctx).items():
        try:
            with logged(ctx.logs / "extraction.log"):
                seconds = {dtype: encode(ctx, clip, dtype, store_path(ctx, name, dtype)) for dtype in DTYPES}
            features = {dtype: load_features(store_path(ctx, name, dtype)) for dtype in DTYPES}
        except Exception as e:
            checks.append(Check("extraction", f"{name} float16 vs float32", FAIL, failure(e)))
            continue
        problems, error = compare(features["float32"], features["float16"], MAX_RELATIVE_ERROR)
        count = len(features["float16"].first_rows()[0])
        if count != IMAGES:
            problems.append(f"{count} of {IMAGES} images encoded")
        figures = {"max relative error": round(error, 5), "images/s float16": round(IMAGES / seconds["float16"], 1)}
        checks.append(verdict("extraction", f"{name} float16 vs float32", problems,
                              f"{count} photos, {features['float16'].dim}-d embeddings close", figures))
    return checks


def decoding_model(ctx: Context) -> tuple[ClipCap, int]:
    """A ClipCap (random mapper) on the device, and its stop token ("."), whose captions end at different steps."""
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm=ctx.backbones.gpt2, prefix_size=ctx.backbones.dim, prefix_length=10))
    model = model.to(ctx.device).eval()
    stop = stop_tokens(load_tokenizer(ctx.backbones.gpt2), "period")[0]
    if not ctx.backbones.real:  # a real GPT-2 says "." by itself
        end_captions(model, STOP_SLOPE, stop)
    return model, stop


def batched_and_alone(decoder: str, decode: Callable[[torch.Tensor], list], embeds: torch.Tensor) -> Check:
    """One decoder on the whole batch and on one image at a time: the same tokens; captions/s of each."""
    decode(embeds[:2])  # warm-up
    start = time.perf_counter()
    batched = decode(embeds)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    alone = [decode(embeds[i:i + 1])[0] for i in range(len(embeds))]
    seconds_alone = time.perf_counter() - start
    differ = [i for i, (a, b) in enumerate(zip(batched, alone)) if a != b]
    lengths = [len(c if decoder == "greedy" else c[0]) for c in batched]
    figures = {"captions/s batched": round(len(embeds) / seconds, 1),
               "captions/s one at a time": round(len(embeds) / seconds_alone, 1),
               "tokens per caption": f"{min(lengths)}-{max(lengths)}"}
    problems = [f"images {differ[:5]} decode differently in a batch"] if differ else []
    return verdict("decoding", f"{decoder}: {DECODING}", problems, f"{len(embeds)} images, the same tokens", figures)


def decoding_checks(ctx: Context) -> list[Check]:
    """Batched greedy and beam search (beam 5) against one image at a time, and captions/s."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model, stop = decoding_model(ctx)
        embeds = torch.randn(16, ctx.backbones.dim, generator=torch.Generator().manual_seed(1)).to(ctx.device)
        decoders = {"greedy": lambda e: greedy_tokens(model, e, max_length=40, stop_token=stop),
                    "beam 5": lambda e: [[t for t, _ in beams] for beams in
                                         beam_tokens(model, e, beam_size=5, max_length=40, stop_token=stop)]}
        return [batched_and_alone(decoder, decode, embeds) for decoder, decode in decoders.items()]
    except Exception as e:
        return [Check("decoding", DECODING, FAIL, failure(e))]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
