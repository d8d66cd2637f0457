"""Convert between the original's feature pickle and a feature store, either way.

    clipcap-store data/coco/oscar_split_ViT-B_32_train.pkl data/coco/train_store    # pickle -> store
    clipcap-store data/coco/train_store features.pkl                                # store -> pickle
"""
from __future__ import annotations

import argparse

from ..files import ClipCapError, check_outputs
from ..store import from_pickle, to_pickle
from .common import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clipcap-store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a .pkl file or a store directory")
    parser.add_argument("dst", help="a store directory (from a .pkl) or a .pkl file (from a store)")
    args = parser.parse_args(argv)
    if args.src.endswith(".pkl"):
        from_pickle(args.src, args.dst)
    elif args.dst.endswith(".pkl"):
        check_outputs({"dst": args.dst}, {"src": args.src})
        to_pickle(args.src, args.dst)
    else:
        raise ClipCapError(f"{args.src} -> {args.dst}: one side must be a .pkl file")
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    run(main)
