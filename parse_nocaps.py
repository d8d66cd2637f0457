"""Encode nocaps images with CLIP into a feature pickle (usage: python parse_nocaps.py -h)."""
from clipcap.cli import run
from clipcap.cli.parse_nocaps import main

if __name__ == "__main__":
    run(main)
