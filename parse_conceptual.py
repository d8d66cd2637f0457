"""Encode Conceptual Captions images with CLIP into the original's feature pickles (usage: python parse_conceptual.py -h)."""
from clipcap.cli import run_parse_conceptual

if __name__ == "__main__":
    run_parse_conceptual()
