"""The flags every parse command shares, and the extraction run they configure."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch

from ..encoder import MAX_PIXELS, OPENAI_CHECKPOINTS, OPENAI_RESNETS
from ..extraction import extract_to, model_tag
from ..sources import Shard
from .common import add_batch_size, add_clip_model, add_device, add_out, positive


def add_extraction_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    """``--out`` (alias ``--out_path``) and the extraction flags, added last as the original's scripts had them."""
    add_out(parser, "--out_path", default=None, help=f"default: {out_default} (no .pkl with --feature_store)")
    add_clip_model(parser, default="ViT-B/32", help=f"{', '.join([*OPENAI_CHECKPOINTS, *OPENAI_RESNETS])}, an OpenAI "
                                                    "CLIP file (.pt), or a Hugging Face name or directory of an "
                                                    "image-text model (any CLIP, SigLIP...)")
    parser.add_argument("--feature_store", action="store_true",
                        help="write a feature store directory (float16 shards + Parquet index) instead of the pickle")
    add_batch_size(parser, 256, "images (or captions) per CLIP batch")
    parser.add_argument("--num_workers", type=int, default=None, help="image decoding processes (default: CPUs - 1, at most 8)")
    parser.add_argument("--shard_size", type=positive, default=10_000, help="images per shard: the most a killed run loses")
    add_device(parser)
    parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                        help="CLIP's precision; auto = float16 on GPU (as the original), float32 on CPU")
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="larger images are skipped, not decoded")


def output(args: argparse.Namespace, before: str, after: str = "") -> str:
    """``--out``, else ``{before}{clip model}{after}`` (the original's names), ``.pkl`` unless a store is written."""
    return args.out or f"{before}{model_tag(args.clip_model)}{after}" + ("" if args.feature_store else ".pkl")


def run_extraction(args: argparse.Namespace, shards: Sequence[Shard], out: str | Path, text: bool = False,
                   **meta: Any) -> Path | None:
    """Encode ``shards`` (their captions, with ``text``) into ``out`` as the flags say; ``meta`` is recorded,
    and must match on a resumed run."""
    return extract_to(shards, out, args.clip_model, as_store=args.feature_store, meta=meta, text=text,
                      settings={"shard_size": args.shard_size, **meta}, device=args.device,
                      dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), batch_size=args.batch_size,
                      num_workers=args.num_workers, max_pixels=args.max_pixels)
