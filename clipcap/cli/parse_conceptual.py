"""Encode Conceptual Captions images with CLIP into the original's feature pickles (or feature stores).

Images come from img2dataset (see the README for the command) or the original's layout:

    data/conceptual/train/00000.tar ...                         img2dataset, webdataset format
    data/conceptual/train/00000/000000000.jpg + .txt ...        img2dataset, files format
    data/conceptual/Train_GCC-training.tsv + train/00000000.jpg the original's layout

    python parse_conceptual.py      # val then train -> data/conceptual/conceptual_clip_ViT-B_32_{val,train}.pkl
    torchrun --nproc_per_node 8 parse_conceptual.py --split train --feature_store

Captions get the original's trailing period. Killed, it resumes when run again with the same arguments.
"""
from __future__ import annotations

import argparse

from ..files import ClipCapError
from ..sources import CONCEPTUAL_TSV, conceptual_shards
from .extraction import add_extraction_arguments, output, run_extraction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default="./data/conceptual")
    parser.add_argument("--split", default="both", choices=("val", "train", "both"), help="both: val, then train")
    parser.add_argument("--images", default=None, help="image folder; default {data_root}/{split}")
    parser.add_argument("--tsv", default=None, help="the split's TSV (original layout only); default the GCC file name")
    add_extraction_arguments(parser, "{data_root}/conceptual_clip_{clip model}_{split}.pkl")
    parser.add_argument("--num_threads", type=int, dest="num_workers",
                        help="the original's flag (its download threads): taken as --num_workers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = ("val", "train") if args.split == "both" else (args.split,)
    if len(splits) > 1 and (args.images or args.tsv or args.out):
        raise ClipCapError("--images, --tsv and --out name one split's files: pass --split too")
    for split in splits:
        images = args.images or f"{args.data_root}/{split}"
        tsv = args.tsv or f"{args.data_root}/{CONCEPTUAL_TSV[split]}"
        run_extraction(args, conceptual_shards(images, tsv, args.shard_size),
                       output(args, f"{args.data_root}/conceptual_clip_", f"_{split}"), split=split, images=images)
