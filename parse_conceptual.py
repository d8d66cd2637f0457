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

from clipcap.features import add_extraction_arguments, extract_to, model_tag
from clipcap.files import ClipCapError, run_cli
from clipcap.sources import CONCEPTUAL_TSV, conceptual_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default="./data/conceptual")
    parser.add_argument("--split", default="both", choices=("val", "train", "both"), help="both: val, then train")
    parser.add_argument("--images", default=None, help="image folder; default {data_root}/{split}")
    parser.add_argument("--tsv", default=None, help="the split's TSV (original layout only); default the GCC file name")
    parser.add_argument("--out_path", default=None,
                        help="default {data_root}/conceptual_clip_{clip model}_{split}.pkl (no .pkl with --feature_store)")
    add_extraction_arguments(parser)
    parser.add_argument("--num_threads", type=int, dest="num_workers",
                        help="the original's flag (its download threads): taken as --num_workers")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    splits = ("val", "train") if args.split == "both" else (args.split,)
    if len(splits) > 1 and (args.images or args.tsv or args.out_path):
        raise ClipCapError("--images, --tsv and --out_path name one split's files: pass --split too")
    for split in splits:
        images = args.images or f"{args.data_root}/{split}"
        tsv = args.tsv or f"{args.data_root}/{CONCEPTUAL_TSV[split]}"
        out = args.out_path or f"{args.data_root}/conceptual_clip_{model_tag(args.clip_model_type)}_{split}" + \
            ("" if args.feature_store else ".pkl")
        extract_to(conceptual_shards(images, tsv, args.shard_size), out, args, split=split, images=images)


if __name__ == "__main__":
    run_cli(main)
