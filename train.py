"""Train ClipCap on cached CLIP features, with the original's flags: python train.py --help."""
from clipcap.cli import run_train

if __name__ == "__main__":
    run_train()
