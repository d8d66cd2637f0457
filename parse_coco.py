"""Encode COCO images with CLIP, each image once, into the original's feature pickle (or a feature store).

    python parse_coco.py        # data/coco/annotations/train_caption.json -> data/coco/oscar_split_ViT-B_32_train.pkl
    python parse_coco.py --annotations data/coco/dataset_coco.json --split test    # Karpathy test + its references
    torchrun --nproc_per_node 4 parse_coco.py --annotations data/coco/dataset_coco.json --feature_store

Killed, it resumes where it stopped when run again with the same arguments; a finished pickle is
kept (delete it to encode again).
"""
import argparse

from clipcap.features import add_extraction_arguments, extract_to, model_tag
from clipcap.files import run_cli
from clipcap.sources import KARPATHY_SPLITS, coco_images, coco_shards, write_coco_references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default="./data/coco/annotations/train_caption.json",
                        help="Karpathy's dataset_coco.json, or the original's train_caption.json")
    parser.add_argument("--images_root", default="./data/coco", help="the folder holding train2014/ and val2014/")
    parser.add_argument("--split", default="train", choices=list(KARPATHY_SPLITS),
                        help="Karpathy split (train = train + restval); names the output of train_caption.json")
    parser.add_argument("--no_restval", action="store_true", help="train = Karpathy's train images only")
    parser.add_argument("--out_path", default=None,
                        help="default: ./data/coco/oscar_split_{clip model}_{split}.pkl (no .pkl with --feature_store)")
    parser.add_argument("--references_path", default=None,
                        help="COCO-format references of a val/test split; default ./data/coco/karpathy_{split}_references.json")
    add_extraction_arguments(parser)
    args = parser.parse_args()

    images = coco_images(args.annotations, args.images_root, args.split, include_restval=not args.no_restval)
    out = args.out_path or f"./data/coco/oscar_split_{model_tag(args.clip_model_type)}_{args.split}" + \
        ("" if args.feature_store else ".pkl")
    written = extract_to(coco_shards(images, args.shard_size), out, args, split=args.split, annotations=args.annotations)
    if written is not None and args.split in ("val", "test"):
        references = args.references_path or f"./data/coco/karpathy_{args.split}_references.json"
        write_coco_references(images, references)
        print(f"wrote {references}")


if __name__ == "__main__":
    run_cli(main)
