"""Encode nocaps images (or those of any COCO-format captions file) with CLIP into the original's feature pickle.

    data/nocaps/nocaps_val_4500_captions.json   the captions file (images[].file_name, annotations[].caption)
    data/nocaps/val/0013ea2087020901.jpg ...    its images, named by file_name (see the README to download them)

    python parse_nocaps.py      # -> data/nocaps/nocaps_val_ViT-B_32.pkl (image ids: nocaps' integer ids)
    python evaluate.py --checkpoint coco_weights.pt --features data/nocaps/nocaps_val_ViT-B_32.pkl \\
        --annotations data/nocaps/nocaps_val_4500_captions.json

Images missing from the folder are skipped and listed beside the output. Killed, it resumes when
run again with the same arguments.
"""
import argparse

from clipcap.features import add_extraction_arguments, extract_to, model_tag
from clipcap.files import run_cli
from clipcap.sources import coco_format_images, coco_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default="./data/nocaps/nocaps_val_4500_captions.json",
                        help="a COCO-format captions file: images (id, file_name) and annotations (image_id, caption)")
    parser.add_argument("--images", default="./data/nocaps/val", help="the folder of the images, named by file_name")
    parser.add_argument("--out_path", default=None,
                        help="default: ./data/nocaps/nocaps_val_{clip model}.pkl (no .pkl with --feature_store)")
    add_extraction_arguments(parser)
    args = parser.parse_args()

    images = coco_format_images(args.annotations, args.images)
    out = args.out_path or f"./data/nocaps/nocaps_val_{model_tag(args.clip_model_type)}" + \
        ("" if args.feature_store else ".pkl")
    extract_to(coco_shards(images, args.shard_size), out, args, annotations=args.annotations, images=args.images)


if __name__ == "__main__":
    run_cli(main)
