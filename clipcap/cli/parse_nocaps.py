"""Encode nocaps images (or those of any COCO-format captions file) with CLIP into the original's feature pickle.

    data/nocaps/nocaps_val_4500_captions.json   the captions file (images[].file_name, annotations[].caption)
    data/nocaps/val/0013ea2087020901.jpg ...    its images, named by file_name (see the README to download them)

    python parse_nocaps.py      # -> data/nocaps/nocaps_val_ViT-B_32.pkl (image ids: nocaps' integer ids)
    python evaluate.py --checkpoint coco_weights.pt --features data/nocaps/nocaps_val_ViT-B_32.pkl \\
        --annotations data/nocaps/nocaps_val_4500_captions.json

Images missing from the folder are skipped and listed beside the output. Killed, it resumes when
run again with the same arguments.
"""
from __future__ import annotations

import argparse

from ..sources import coco_format_shards
from .extraction import add_extraction_arguments, output, run_extraction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default="./data/nocaps/nocaps_val_4500_captions.json",
                        help="a COCO-format captions file: images (id, file_name) and annotations (image_id, caption)")
    parser.add_argument("--images", default="./data/nocaps/val", help="the folder of the images, named by file_name")
    add_extraction_arguments(parser, "./data/nocaps/nocaps_val_{clip model}.pkl")
    args = parser.parse_args(argv)

    run_extraction(args, coco_format_shards(args.annotations, args.images, args.shard_size),
                   output(args, "./data/nocaps/nocaps_val_"), annotations=args.annotations, images=args.images)
