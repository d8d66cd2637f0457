"""Encode your own captioned images with CLIP, each image once, into a feature pickle (or a feature store).

    python parse_captions.py data/photos                   # imagefolder: data/photos/metadata.jsonl -> data/photos_ViT-B_32.pkl
    python parse_captions.py data/captions.csv --images_root data/images
    python parse_captions.py data/flickr30k/dataset_flickr30k.json --split train --images_root data/flickr30k/images

Sources:
- a folder in Hugging Face's imagefolder layout: metadata.jsonl or metadata.csv with file_name and
  text (or caption: one caption, a JSONL list of several, or several rows per image);
- a CSV, JSONL or TSV file with an image column (file_name, image, path) and a caption column
  (text, caption); a TSV may be headerless path<TAB>caption and has no quoting; paths relative to the file
  or --images_root;
- Karpathy's dataset_flickr30k.json / dataset_flickr8k.json, by --split (train = train + restval).

Image ids are Karpathy's imgid, else the image path as the file writes it; the same source is the
references of evaluate.py (--annotations SOURCE, with --split for Karpathy's files). Missing or
unreadable images are skipped and listed. Killed, it resumes when run again with the same arguments.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..annotations import KARPATHY_SPLITS
from ..sources import caption_shards
from .extraction import add_extraction_arguments, output, run_extraction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder with metadata.jsonl/csv, a CSV/TSV/JSONL file, or Karpathy's Flickr JSON")
    parser.add_argument("--images_root", default=None, help="where image paths start (default: the source's folder)")
    parser.add_argument("--split", default=None, choices=list(KARPATHY_SPLITS), help="Karpathy's files only")
    add_extraction_arguments(parser, "beside the source, {name}_{clip model}[_{split}].pkl")
    args = parser.parse_args(argv)

    source = Path(args.source)
    shards = caption_shards(source, args.images_root, args.split, args.shard_size)
    where = source.resolve()
    name = where.name if where.is_dir() else where.stem
    out = output(args, f"{where.parent / name}_", f"_{args.split}" if args.split else "")
    run_extraction(args, shards, out, split=args.split, annotations=str(source))
