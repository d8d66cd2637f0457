"""Encode COCO images with CLIP into the original's feature pickle (usage: python parse_coco.py -h)."""
from clipcap.cli import run_parse_coco

if __name__ == "__main__":
    run_parse_coco()
