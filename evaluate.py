"""Score captions with the COCO metrics, or caption and score (usage: python evaluate.py -h)."""
from clipcap.cli import run_evaluate

if __name__ == "__main__":
    run_evaluate()
