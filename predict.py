"""Caption images or cached CLIP features with a checkpoint (usage: python predict.py -h)."""
from clipcap.cli import run_predict

if __name__ == "__main__":
    run_predict()
