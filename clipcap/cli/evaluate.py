"""Score captions with the COCO caption metrics (pycocoevalcap), or caption a feature file (or image folder) and score it.

    python evaluate.py --results captions.json --annotations data/coco/dataset_coco.json --split test
    python evaluate.py --checkpoint coco_train/coco_prefix-009.safetensors \\
        --features data/coco/oscar_split_ViT-B_32_test.pkl --annotations data/coco/dataset_coco.json --split test \\
        --out coco_train/metrics.json
    python evaluate.py --checkpoint coco_train/coco_prefix-009.safetensors --images data/nocaps/val \\
        --annotations data/nocaps/nocaps_val_4500_captions.json --clipscore

References: Karpathy's dataset_coco.json (with --split), COCO-format annotations, a JSON list of
{image_id, caption}, or the Conceptual Captions validation TSV (image id = 0-based row number).
When the images carry a nocaps ``domain``, the entire set and each domain are scored, each as a
run of its own. Every score, printed or written, is in the paper's units: pycocoevalcap's x100
(CIDEr 108.35), CLIP-S and RefCLIP-S alike. The table is always printed; --out also writes the
scores as JSON (pycocoevalcap's key names). Images that cannot be read are skipped, named, and left
out of the scores. Needs Java; SPICE also needs Stanford CoreNLP jars (--spice_jars).
--clipscore adds CLIP-S and RefCLIP-S (Hessel et al., 2021).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..annotations import image_files, image_key, load_annotations
from ..clipscore import CLIPScorer, add_clip_scores
from ..data import load_features
from ..evaluation import ENTIRE, SCORERS, Scorer, load_results, match_images, parse_metrics, scores_table, write_scores
from ..files import ClipCapError, check_outputs, write_json
from ..runtime import Processes, pick_device
from ..toolkit import SPICE_JARS_ENV
from .common import (
    CHECKPOINT_HELP,
    add_batch_size,
    add_decoding,
    add_model_options,
    add_out,
    decoding_options,
    model_options,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    captions = p.add_mutually_exclusive_group(required=True)
    captions.add_argument("--results", help="captions JSON [{image_id, caption}] (predict.py's output)")
    captions.add_argument("--checkpoint", help=f"caption --features or --images with this: {CHECKPOINT_HELP}")
    p.add_argument("--features", help="CLIP features of the images (feature pickle or store): captioned with "
                                      "--checkpoint; their embeddings serve --clipscore when made by its CLIP")
    p.add_argument("--images", help="folder of the references' images (COCO images[].file_name, Karpathy "
                                    "filepath/filename): captioned with --checkpoint; read by --clipscore")
    p.add_argument("--annotations", required=True, help="reference captions (formats above)")
    p.add_argument("--split", choices=["test", "val"], help="Karpathy split (dataset_coco.json only)")
    add_out(p, help="also write the scores to this JSON, in the paper's units (x100) under pycocoevalcap's key "
                    "names (default: only print the table)")
    p.add_argument("--per_image", help="also write per-image scores to this JSON (the same units)")
    p.add_argument("--only_common_images", action="store_true",
                   help="score only the images that have both a caption and references, ignoring the others "
                        "(without it, any mismatch is an error)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(SCORERS)} (default: all; SPICE is "
                                     "skipped with a message if its jars are missing, unless named here)")
    p.add_argument("--spice_jars", help="Stanford CoreNLP 3.6.0 for SPICE: a folder holding its two jars, or "
                                        f"stanford-corenlp-full-2015-12-09.zip (default: ${SPICE_JARS_ENV})")
    clip = p.add_argument_group("CLIPScore")
    clip.add_argument("--clipscore", action="store_true", help="add CLIP-S and RefCLIP-S (Hessel et al., 2021)")
    clip.add_argument("--clipscore_model", default="ViT-B/32", help="its CLIP: name or directory with a tokenizer")
    captioning = p.add_argument_group("captioning (with --checkpoint)")
    add_batch_size(captioning, 16, "images decoded together")
    captioning.add_argument("--save_captions", help="also write the generated captions JSON here")
    add_model_options(captioning)
    add_decoding(p)
    args = p.parse_args(argv)
    if args.checkpoint and (args.features is None) == (args.images is None):
        p.error("--checkpoint needs one of --features or --images")
    if args.results and (args.features or args.images) and not args.clipscore:
        p.error("--features or --images with --results serve --clipscore only")
    if args.num_captions != 1:
        p.error("--num_captions: the metrics score one caption per image")
    return args


def read_references(args: argparse.Namespace) -> tuple[dict, dict, dict[Any, Path]]:
    """The references of --annotations, their images' nocaps domains, and with --images their image files
    (with --only_common_images, only the images found there are scored)."""
    references, images = load_annotations(args.annotations, args.split)
    domains = {k: info["domain"] for k, info in images.items() if "domain" in info}
    paths = image_files(references, images, args.images, args.only_common_images, args.annotations) \
        if args.images else {}
    return references, domains, paths


def check_files(args: argparse.Namespace, paths: dict[Any, Path]) -> None:
    """Every output can be written and none is an input, checked before any work."""
    def files_of(path: str | None) -> list[str | Path]:  # a folder input (a feature store, a saved model): its files
        if path is None or not Path(path).is_dir():
            return [path] if path else []
        return [path, *(p for p in Path(path).rglob("*") if p.is_file())]

    check_outputs({"--out": args.out, "--per_image": args.per_image, "--save_captions": args.save_captions},
                  {"--results": args.results, "--annotations": args.annotations, "--images": list(paths.values()),
                   "--features": files_of(args.features), "--checkpoint": files_of(args.checkpoint),
                   "--spice_jars": files_of(args.spice_jars), "--clipscore_model": files_of(args.clipscore_model)})


def feature_embeddings(features) -> dict:
    """Image id -> the embedding of a feature set (its first row per image)."""
    image_ids, rows = features.first_rows()
    return dict(zip(image_ids, features.embeddings_at(rows)))


def report_skipped(skipped: list[str], images: str | None, total: int, read: dict) -> list[str]:
    """``skipped``, each line printed; an error when no image at all could be read."""
    for problem in skipped:
        print(f"skipped {problem}", file=sys.stderr)
    if not read:
        raise ClipCapError(f"{images} (--images): none of the {total} images could be read")
    return skipped


def main(argv: list[str] | None = None, scorer: Scorer | None = None) -> None:
    """``scorer``: the toolkit's scorers for these --metrics and --spice_jars, already started and closed by the
    caller (a reproduction scores every row with one METEOR); else started and closed here."""
    args = parse_args(argv)
    metrics, options = parse_metrics(args.metrics), decoding_options(args)
    references, domains, paths = read_references(args)
    total = len(references)
    check_files(args, paths)
    device = pick_device(args.device, Processes())  # as training's validation picks it, TF32 included: one score
    clip_scorer = CLIPScorer(args.clipscore_model, device) if args.clipscore else None
    features = load_features(args.features) if args.features else None
    if features is not None:  # text embeddings (CapDec's) are no image's: neither captioned nor CLIP-scored
        features.check_images(f"--features {args.features}")
    if args.images:  # with --only_common_images, the images not found are not scored
        references = {k: v for k, v in references.items() if k in paths}
    if args.checkpoint and features is not None:  # fail before hours of decoding, not after
        match_images(list(dict.fromkeys(features.image_ids)), references, args.only_common_images, args.features,
                     args.annotations)
    captioner = None
    if args.checkpoint:
        from ..captioner import Captioner  # imported here: it loads transformers, which scoring needs not

        captioner = Captioner.from_checkpoint(args.checkpoint, **{**model_options(args), "device": device})
    own_clip = features.clip_model if features is not None else captioner.clip_model if captioner else None
    read_images = clip_scorer is not None and clip_scorer.needs_images(
        own_clip, has_embeddings=features is not None or captioner is not None, has_images=bool(paths))

    skipped: list[str] = []
    with nullcontext(scorer) if scorer else Scorer(metrics, args.spice_jars) as scorer:  # METEOR loads meanwhile
        if captioner is None:
            results, source = load_results(args.results), args.results
            embeddings = feature_embeddings(features) if features is not None else {}
        else:
            run = captioner.caption_all(features if features is not None else paths, options, args.batch_size,
                                        skip_unreadable=True, source=args.features or "features")
            results, source, embeddings, skipped = run.results, f"captions of {args.features or args.images}", \
                run.embeddings, run.skipped
            report_skipped(skipped, args.images, len(paths), run.captions)
            if args.images:  # the unreadable images are not scored
                references = {k: v for k, v in references.items() if k in run.captions}
            if args.save_captions:
                write_json(args.save_captions, results)
        if read_images:  # CLIPScore's CLIP reads the images itself, before any scoring
            embeddings, unreadable = clip_scorer.embed_images({k: p for k, p in paths.items() if k in references})
            skipped += report_skipped(unreadable, args.images, len(paths), embeddings)
            results = [r for r in results if image_key(r["image_id"]) in embeddings]  # the unreadable: not scored
            references = {k: v for k, v in references.items() if k in embeddings}
        evaluations = scorer.by_domain(results, references, domains, args.only_common_images, source, args.annotations)
    if clip_scorer is not None:
        add_clip_scores(evaluations, {image_key(r["image_id"]): r["caption"] for r in results}, references,
                        clip_scorer, {image_key(k): v for k, v in embeddings.items()})
    print(scores_table(evaluations), flush=True)  # first: a failed write cannot take them
    if (scored := len(evaluations[ENTIRE].per_image)) < total:
        print(f"scored {scored} of the {total} reference images"
              + (f" ({len(skipped)} unreadable, skipped)" if skipped else ""))
    write_scores(evaluations, args.out, args.per_image)
    if args.out or args.per_image:
        print("wrote " + " and ".join(filter(None, (args.out, args.per_image))))
