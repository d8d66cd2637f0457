"""Caption images (or cached CLIP features) with a ClipCap checkpoint, ours or the original's.

    python predict.py --checkpoint coco_weights.pt --images photos/ --out captions.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --greedy
    python predict.py --checkpoint run/coco_prefix-009.safetensors --features test_feats.pkl --out results.json
    python predict.py --checkpoint coco_weights.pt --images cat.jpg --top_p 0.9 --num_captions 5 --seed 0

The output is the COCO results format ``[{"image_id": ..., "caption": ...}]`` (image_id is the
file path with --images, the feature file's image id with --features); without --out the
captions are printed, one per line, after their image id and a tab.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from clipcap.captioner import Captioner, image_paths
from clipcap.data import load_features
from clipcap.decoding import STOPS
from clipcap.files import ClipCapError, atomic_write, check_output_path, run_cli

MIN_TEMPERATURE = 0.01  # below this the scaled logits overflow float32 and sampling gives NaN
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator takes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ours (.safetensors / .pt + config) or the original's .pt")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files, folders or glob patterns (quote them)")
    source.add_argument("--features", help="CLIP features: the original's pickle or a feature store folder")
    parser.add_argument("--out", help="write the captions here as JSON (default: print them)")
    decoding = parser.add_argument_group("decoding (default: beam search, beam 5)")
    strategy = decoding.add_mutually_exclusive_group()
    strategy.add_argument("--greedy", action="store_true", help="greedy decoding (the original's generate2)")
    strategy.add_argument("--sample", action="store_true", help="nucleus sampling (implied by --top_p or --seed)")
    decoding.add_argument("--beam_size", type=positive, default=5)
    decoding.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (default 0.9)")
    decoding.add_argument("--temperature", type=float, default=1.0, help=f"at least {MIN_TEMPERATURE}")
    decoding.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    decoding.add_argument("--num_captions", type=positive, default=1, help="captions per image (beam or sampling)")
    decoding.add_argument("--max_length", type=positive, default=67, help="most tokens per caption")
    decoding.add_argument("--stop", choices=STOPS, default="period",
                          help='end a caption at "." (the original\'s rule) or at end-of-text')
    parser.add_argument("--batch_size", type=positive, default=16, help="images decoded together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpt2", help="GPT-2 and tokenizer name or folder (default: the checkpoint's)")
    parser.add_argument("--clip_model", help="CLIP for --images (default: the checkpoint's, or by its width: "
                                             "512 ViT-B/32, 640 RN50x4, 768 ViT-L/14, 1024 RN50)")
    parser.add_argument("--normalize_prefix", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise CLIP embeddings (default: the checkpoint's; on for the original's "
                             "released transformer)")
    return parser.parse_args(argv)


def decoding_options(args: argparse.Namespace) -> dict:
    sample = args.sample or args.top_p is not None or args.seed is not None
    if args.greedy and sample:
        raise ClipCapError("--greedy does not go with --top_p or --seed")
    if not MIN_TEMPERATURE <= args.temperature < float("inf"):
        raise ClipCapError(f"--temperature must be at least {MIN_TEMPERATURE}, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ClipCapError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ClipCapError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    return {"strategy": "greedy" if args.greedy else "sample" if sample else "beam",
            "beam_size": args.beam_size, "top_p": 0.9 if args.top_p is None else args.top_p,
            "temperature": args.temperature, "seed": args.seed, "num_captions": args.num_captions,
            "max_length": args.max_length, "stop": args.stop, "batch_size": args.batch_size}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    decoding = decoding_options(args)
    if args.out:
        check_output_path(args.out, "--out")  # now, not after captioning everything
    paths = image_paths(args.images) if args.images else None
    features = load_features(args.features) if args.features else None
    captioner = Captioner.from_checkpoint(args.checkpoint, device=args.device, gpt2=args.gpt2,
                                          clip_model=args.clip_model, normalize_prefix=args.normalize_prefix)
    if paths is not None:
        results, problems = captioner.caption_files(paths, **decoding)
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        if not results:
            raise ClipCapError(f"none of the {len(paths)} images could be read")
    else:
        results = captioner.caption_features(features, source=args.features, **decoding)
    if args.out:
        with atomic_write(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        images = len({r["image_id"] for r in results})
        print(f"wrote {args.out}: {len(results)} captions of {images} images"
              + (f"; {len(problems)} files skipped" if paths is not None and problems else ""), file=sys.stderr)
    else:
        for r in results:
            print(f"{r['image_id']}\t{r['caption']}")


if __name__ == "__main__":
    run_cli(main)
