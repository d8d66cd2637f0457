"""Encode COCO images with CLIP into the original's feature pickle (usage: python parse_coco.py -h)."""
from clipcap.cli import run
from clipcap.cli.parse_coco import main

if __name__ == "__main__":
    run(main)
