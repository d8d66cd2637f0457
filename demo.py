"""The whole ClipCap job on a small dataset drawn on the spot: features, training, captions, scores.

    python demo.py                 # offline, a few minutes on a CPU: tiny random backbones
    python demo.py --real          # OpenAI CLIP ViT-B/32 and GPT-2 (used anyway when both are cached)

Writes everything under --out; the report folder holds metrics.json, loss.png and gallery.html.
"""
import argparse

from clipcap.demo import DemoConfig, run
from clipcap.files import run_cli


def main() -> None:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help="work and report folder")
    p.add_argument("--real", action="store_true", default=None,
                   help="CLIP ViT-B/32 and GPT-2 from the Hugging Face hub or its cache, instead of tiny random models")
    p.add_argument("--n_train", type=int, default=d.n_train, help="training images (2 captions each)")
    p.add_argument("--n_test", type=int, default=d.n_test, help="held-out images")
    p.add_argument("--epochs", type=int, default=None, help="default: 6 with tiny backbones, 2 with real ones")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto: cuda if available, else cpu")
    p.add_argument("--no_baseline", dest="baseline", action="store_false",
                   help="skip the caption-only baseline (the same training with the images blanked out)")
    args = p.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars of tiny models are noise
    hf_logging.set_verbosity_error()
    run(DemoConfig(**vars(args)))


if __name__ == "__main__":
    run_cli(main)
