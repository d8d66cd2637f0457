"""Encode your own captioned images with CLIP into a feature pickle (usage: python parse_captions.py -h)."""
from clipcap.cli import run_parse_captions

if __name__ == "__main__":
    run_parse_captions()
