"""Encode COCO images with CLIP, each image once, into the original's feature pickle (or a feature store).

    python parse_coco.py        # data/coco/annotations/train_caption.json -> data/coco/oscar_split_ViT-B_32_train.pkl
    python parse_coco.py --annotations data/coco/dataset_coco.json --split test    # Karpathy test + its references
    torchrun --nproc_per_node 4 parse_coco.py --annotations data/coco/dataset_coco.json --feature_store

Killed, it resumes where it stopped when run again with the same arguments; a finished pickle is
kept (delete it to encode again).
"""
from __future__ import annotations

import argparse
import os

from ..annotations import KARPATHY_SPLITS
from ..files import check_outputs
from ..sources import coco_images, coco_shards, write_coco_references
from .extraction import add_extraction_arguments, output, run_extraction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default="./data/coco/annotations/train_caption.json",
                        help="Karpathy's dataset_coco.json, or the original's train_caption.json")
    parser.add_argument("--images_root", default="./data/coco", help="the folder holding train2014/ and val2014/")
    parser.add_argument("--split", default="train", choices=list(KARPATHY_SPLITS),
                        help="Karpathy split (train = train + restval); names the output of train_caption.json")
    parser.add_argument("--no_restval", action="store_true", help="train = Karpathy's train images only")
    parser.add_argument("--references_path", default=None,
                        help="COCO-format references of a val/test split; default ./data/coco/karpathy_{split}_references.json")
    add_extraction_arguments(parser, "./data/coco/oscar_split_{clip model}_{split}.pkl")
    args = parser.parse_args(argv)

    out = output(args, "./data/coco/oscar_split_", f"_{args.split}")
    references = None
    if args.split in ("val", "test"):
        references = args.references_path or f"./data/coco/karpathy_{args.split}_references.json"
        check_outputs({"--references_path": references}, {"--annotations": args.annotations, "--out": out})
    images = coco_images(args.annotations, args.split, include_restval=not args.no_restval)
    if references is not None and int(os.environ.get("RANK", "0")) == 0:
        write_coco_references(images, references)  # first: they need no features, and a failed run keeps them
        print(f"wrote {references}")
    run_extraction(args, coco_shards(images, args.images_root, args.shard_size), out, split=args.split,
                   annotations=args.annotations)
