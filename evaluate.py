"""Score captions with the COCO caption metrics (pycocoevalcap), or caption a feature file and score it.

    python evaluate.py --results captions.json --annotations data/coco/dataset_coco.json --split test
    python evaluate.py --checkpoint coco_train/coco_prefix-009.safetensors \\
        --features data/coco/oscar_split_ViT-B_32_test.pkl --annotations data/coco/dataset_coco.json --split test

References: Karpathy's dataset_coco.json (with --split), COCO-format annotations, a JSON list of
{image_id, caption}, or the Conceptual Captions validation TSV (image id = 0-based row number).
Prints the scores in the paper's units (x100) and writes them, in pycocoevalcap's units and key
names, to --out. Needs Java; SPICE also needs Stanford CoreNLP jars (see the README).
"""
import argparse
import json

from clipcap.evaluation import SCORERS, Scorer, load_references, load_results, match_images
from clipcap.files import ClipCapError, atomic_write, check_output_path, resolve_device, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    captions = p.add_mutually_exclusive_group(required=True)
    captions.add_argument("--results", help="captions JSON [{image_id, caption}] (predict.py's output)")
    captions.add_argument("--checkpoint", help="caption --features with this checkpoint, then score")
    p.add_argument("--features", help="CLIP features of the images to caption (feature pickle or store)")
    p.add_argument("--annotations", required=True, help="reference captions (formats above)")
    p.add_argument("--split", choices=["test", "val"], help="Karpathy split (dataset_coco.json only)")
    p.add_argument("--out", default="metrics.json", help="metrics JSON (pycocoevalcap's key names and units)")
    p.add_argument("--per_image", help="also write per-image scores to this JSON")
    p.add_argument("--only_common_images", action="store_true",
                   help="score only the images that have both a caption and references, ignoring the others "
                        "(without it, any mismatch is an error)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(SCORERS)} (default: all; SPICE is "
                                     "skipped with a message if its jars are missing, unless named here)")
    decoding = p.add_argument_group("captioning (with --checkpoint)")
    decoding.add_argument("--beam_size", type=int, default=5)
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    decoding.add_argument("--batch_size", type=int, default=16, help="images decoded together")
    decoding.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    decoding.add_argument("--gpt2", default=None, help="GPT-2 name or directory (default: the checkpoint's)")
    decoding.add_argument("--normalize_prefix", action="store_true",
                          help="L2-normalise CLIP embeddings (the original's released transformer weights need it)")
    decoding.add_argument("--save_captions", help="also write the generated captions JSON here")
    args = p.parse_args(argv)
    if (args.checkpoint is None) != (args.features is None):
        p.error("--checkpoint and --features go together")
    if args.beam_size < 1 or args.batch_size < 1:
        p.error("--beam_size and --batch_size must be at least 1")
    return args


def check_outputs(args: argparse.Namespace) -> None:
    """Every file this run will write can be written, checked before any captioning or scoring."""
    outputs = {"--out": args.out, "--per_image": args.per_image, "--save_captions": args.save_captions}
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(path, flag)
    named = [path for path in outputs.values() if path is not None]
    if len(set(named)) < len(named):
        raise ClipCapError(f"{', '.join(outputs)} must name different files")


def generate(args: argparse.Namespace, references: dict) -> list[dict]:
    """Caption every image of --features with --checkpoint, after checking the images match the references."""
    from clipcap.captioner import Captioner
    from clipcap.data import load_features

    features = load_features(args.features)
    match_images(list(dict.fromkeys(features.image_ids)), references, args.only_common_images,
                 args.features, args.annotations)  # fail before hours of decoding, not after
    device = resolve_device(args.device)
    captioner = Captioner.from_checkpoint(args.checkpoint, device=device, gpt2=args.gpt2,
                                          normalize_prefix=True if args.normalize_prefix else None)
    results = captioner.caption_features(features, args.features, strategy="greedy" if args.greedy else "beam",
                                         beam_size=args.beam_size, batch_size=args.batch_size)
    if args.save_captions:
        with atomic_write(args.save_captions) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args)
    references = load_references(args.annotations, args.split)
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    with Scorer(metrics) as scorer:  # METEOR's Java loads while the captions are made
        if args.results:
            results, source = load_results(args.results), args.results
        else:
            results, source = generate(args, references), f"captions of {args.features}"
        evaluation = scorer(results, references, args.only_common_images, source, args.annotations)
    if len(evaluation.per_image) < len(references):
        print(f"scored {len(evaluation.per_image)} of the {len(references)} reference images (--only_common_images)")
    print(evaluation.table(), flush=True)  # first: a failure to write cannot take the scores
    evaluation.write(args.out, args.per_image)
    print(f"wrote {args.out}" + (f" and {args.per_image}" if args.per_image else ""))


if __name__ == "__main__":
    run_cli(main)
