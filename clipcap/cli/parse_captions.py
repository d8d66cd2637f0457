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

Text-only training (CapDec): --text_only encodes the captions themselves with the text tower of the
same CLIP, one embedding per caption, and reads no image. SOURCE is then any annotation file this
project reads (also COCO's dataset_coco.json, a COCO-format captions file, the original's
train_caption.json, Conceptual Captions' TSV) or a .txt of one caption a line:

    python parse_captions.py data/coco/dataset_coco.json --text_only --split train
        # -> data/coco/dataset_coco_ViT-B_32_text_train.pkl
    python train.py --data data/coco/dataset_coco_ViT-B_32_text_train.pkl --normalize_prefix --noise_variance 0.016

The file is marked as text embeddings (its "modality"), so that nothing captions them as images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..annotations import KARPATHY_SPLITS
from ..files import ClipCapError
from ..sources import caption_shards, text_shards
from .extraction import add_extraction_arguments, output, run_extraction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder with metadata.jsonl/csv, a CSV/TSV/JSONL file, or Karpathy's "
                                       "Flickr JSON; with --text_only also any annotation file or a .txt of captions")
    parser.add_argument("--images_root", default=None, help="where image paths start (default: the source's folder)")
    parser.add_argument("--split", default=None, choices=list(KARPATHY_SPLITS), help="Karpathy's files only")
    parser.add_argument("--text_only", action="store_true",
                        help="encode the captions with the CLIP's text tower (text-only training, CapDec), no images")
    add_extraction_arguments(parser, "beside the source, {name}_{clip model}[_text][_{split}].pkl")
    args = parser.parse_args(argv)

    source = Path(args.source)
    if args.text_only:
        if args.images_root is not None:
            raise ClipCapError(f"--images_root {args.images_root}: --text_only reads no image")
        shards = text_shards(source, args.split, args.shard_size)
    else:
        shards = caption_shards(source, args.images_root, args.split, args.shard_size)
    where = source.resolve()
    name = where.name if where.is_dir() else where.stem
    out = output(args, f"{where.parent / name}_", "_text" * args.text_only + (f"_{args.split}" if args.split else ""))
    run_extraction(args, shards, out, text=args.text_only, split=args.split, annotations=str(source))
