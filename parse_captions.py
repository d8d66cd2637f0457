"""Encode your own captioned images with CLIP into a feature pickle (usage: python parse_captions.py -h)."""
from clipcap.cli import run
from clipcap.cli.parse_captions import main

if __name__ == "__main__":
    run(main)
