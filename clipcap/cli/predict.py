r"""Caption images (or cached CLIP features) with a ClipCap checkpoint, ours or the original's.

    python predict.py --checkpoint coco_weights.pt --images photos/ --out captions.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --greedy
    python predict.py --checkpoint run/coco_prefix-009.safetensors --features test_feats.pkl --out results.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --top_p 0.9 --num_captions 5 --seed 0
    python predict.py --checkpoint OWNER/clipcap-coco --images cat.jpg     # a Hugging Face Hub id

The output is the COCO results format ``[{"image_id": ..., "caption": ...}]`` (image_id is the
file path with --images, the feature file's image id with --features); without --out the
captions are printed, one per line, after their image id and a tab. In those lines a backslash,
tab, newline or carriage return inside a name or caption is written \\, \t, \n or \r, so that
every line is one image id, one tab and one caption.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..captioner import Captioner, image_paths
from ..data import load_features
from ..decoding import check_options
from ..files import ClipCapError, check_outputs, write_json
from ..hub import checkpoint_files
from .common import (
    CHECKPOINT_HELP,
    add_batch_size,
    add_decoding,
    add_model_options,
    add_out,
    decoding_options,
    model_options,
)

# What a printed line escapes, so that it stays one line of two tab-separated fields.
ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def line(image_id: Any, caption: str) -> str:
    """``image_id<TAB>caption``, each with :data:`ESCAPES` applied."""
    return f"{str(image_id).translate(ESCAPES)}\t{caption.translate(ESCAPES)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files, folders or glob patterns (quote them)")
    source.add_argument("--features", help="CLIP features: the original's pickle or a feature store folder")
    add_out(parser, help="write the captions here as JSON (default: print them, one 'image TAB caption' per line, "
                         "with backslash, tab, newline and carriage return written as \\\\, \\t, \\n and \\r)")
    add_batch_size(parser, 16, "images decoded together")
    add_model_options(parser)
    add_decoding(parser)
    args = parser.parse_args(argv)

    options = decoding_options(args)
    paths = image_paths(args.images) if args.images else None
    check_outputs({"--out": args.out}, {"--checkpoint": checkpoint_files(args.checkpoint), "--images": paths,
                                        "--features": args.features})  # now, not after captioning everything
    features = load_features(args.features) if args.features else None
    if features is not None:
        features.check_images(f"--features {args.features}")  # before the model loads
    captioner = Captioner.from_checkpoint(args.checkpoint, **model_options(args))
    check_options(captioner.model, options)
    problems: list[str] = []
    if paths is not None:
        results, problems = captioner.caption_files(paths, options, args.batch_size)
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        if not results:
            raise ClipCapError(f"none of the {len(paths)} images could be read")
    else:
        results = captioner.caption_features(features, options, args.batch_size, source=args.features)
    if not args.out:
        for r in results:
            print(line(r["image_id"], r["caption"]))
        return
    write_json(args.out, results)
    images = len({r["image_id"] for r in results})
    print(f"wrote {args.out}: {len(results)} captions of {images} images"
          + (f"; {len(problems)} files skipped" if problems else ""), file=sys.stderr)
