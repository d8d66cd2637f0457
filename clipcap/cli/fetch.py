"""Download a data set of the paper, or the original's released weights, resumably.

    clipcap-fetch weights                    # the three released .pt files -> data/weights/
    clipcap-fetch weights --only coco_weights.pt
    clipcap-fetch coco                       # COCO 2014 images and Karpathy's split file -> data/coco/
    clipcap-fetch nocaps                     # nocaps validation captions and images -> data/nocaps/
    clipcap-fetch conceptual                 # Conceptual Captions lists, images through img2dataset -> data/conceptual/

A finished download is not fetched again; an interrupted one leaves nothing that looks finished. To
fetch what the reproduction's rows need, use make data (clipcap-reproduce --fetch_only).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..fetch import DATASETS, WEIGHTS, fetch_dataset, fetch_weights

FOLDERS = {"coco": "data/coco", "nocaps": "data/nocaps", "conceptual": "data/conceptual", "weights": "data/weights"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=[*DATASETS, "weights"])
    p.add_argument("--to", help="the folder (default: data/coco, data/nocaps, data/conceptual or data/weights)")
    p.add_argument("--only", action="append", choices=list(WEIGHTS), help="weights: this file only (repeatable)")
    args = p.parse_args(argv)
    folder = Path(args.to or FOLDERS[args.what])
    if args.what == "weights":
        for path in fetch_weights(folder, args.only):
            print(path)
    else:
        fetch_dataset(args.what, folder)
