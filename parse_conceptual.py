"""Encode Conceptual Captions images with CLIP into the original's feature pickles (usage: python parse_conceptual.py -h)."""
from clipcap.cli import run
from clipcap.cli.parse_conceptual import main

if __name__ == "__main__":
    run(main)
