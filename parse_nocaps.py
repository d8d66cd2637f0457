"""Encode nocaps images with CLIP into a feature pickle (usage: python parse_nocaps.py -h)."""
from clipcap.cli import run_parse_nocaps

if __name__ == "__main__":
    run_parse_nocaps()
