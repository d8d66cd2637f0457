"""Caption images (or cached CLIP features) with a ClipCap checkpoint, ours or the original's.

    python predict.py --checkpoint coco_weights.pt --images photos/ --out captions.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --greedy
    python predict.py --checkpoint run/coco_prefix-009.safetensors --features test_feats.pkl --out results.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --top_p 0.9 --num_captions 5 --seed 0
    python predict.py --checkpoint OWNER/clipcap-coco --images cat.jpg     # a Hugging Face Hub id

The output is the COCO results format ``[{"image_id": ..., "caption": ...}]`` (image_id is the
file path with --images, the feature file's image id with --features); without --out the
captions are printed, one per line, after their image id and a tab.
"""
from __future__ import annotations

import argparse
import sys

from ..captioner import Captioner, image_paths
from ..data import load_features
from ..files import ClipCapError, check_output_path, write_json
from . import CHECKPOINT_HELP, add_batch_size, add_decoding, add_model_options, add_out, decoding_options, model_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files, folders or glob patterns (quote them)")
    source.add_argument("--features", help="CLIP features: the original's pickle or a feature store folder")
    add_out(parser, help="write the captions here as JSON (default: print them)")
    add_batch_size(parser, 16, "images decoded together")
    add_model_options(parser)
    add_decoding(parser)
    args = parser.parse_args(argv)

    options = decoding_options(args)
    if args.out:
        check_output_path(args.out, "--out")  # now, not after captioning everything
    paths = image_paths(args.images) if args.images else None
    features = load_features(args.features) if args.features else None
    captioner = Captioner.from_checkpoint(args.checkpoint, **model_options(args))
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
            print(f"{r['image_id']}\t{r['caption']}")
        return
    write_json(args.out, results)
    images = len({r["image_id"] for r in results})
    print(f"wrote {args.out}: {len(results)} captions of {images} images"
          + (f"; {len(problems)} files skipped" if problems else ""), file=sys.stderr)
