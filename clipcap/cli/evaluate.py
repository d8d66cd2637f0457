"""Score captions with the COCO caption metrics (pycocoevalcap), or caption a feature file (or image folder) and score it.

    python evaluate.py --results captions.json --annotations data/coco/dataset_coco.json --split test
    python evaluate.py --checkpoint coco_train/coco_prefix-009.safetensors \\
        --features data/coco/oscar_split_ViT-B_32_test.pkl --annotations data/coco/dataset_coco.json --split test
    python evaluate.py --checkpoint coco_train/coco_prefix-009.safetensors --images data/nocaps/val \\
        --annotations data/nocaps/nocaps_val_4500_captions.json --clipscore

References: Karpathy's dataset_coco.json (with --split), COCO-format annotations, a JSON list of
{image_id, caption}, or the Conceptual Captions validation TSV (image id = 0-based row number).
When the images carry a nocaps ``domain``, the entire set and each domain are scored, each as a
run of its own. Prints the scores in the paper's units (x100) and writes them, in pycocoevalcap's
units and key names, to --out. Needs Java; SPICE also needs Stanford CoreNLP jars (--spice_jars).
--clipscore adds CLIP-S and RefCLIP-S (Hessel et al., 2021).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch

from ..annotations import image_files, image_key, load_annotations
from ..data import load_features
from ..evaluation import ENTIRE, SCORERS, Evaluation, Scorer, domain_table, load_results, match_images, write_scores
from ..files import ClipCapError, check_output_path, write_json
from ..toolkit import SPICE_JARS_ENV
from ..runtime import resolve_device
from . import CHECKPOINT_HELP, add_batch_size, add_decoding, add_model_options, add_out, decoding_options, model_options


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
    add_out(p, default="metrics.json", help="metrics JSON (pycocoevalcap's key names and units)")
    p.add_argument("--per_image", help="also write per-image scores to this JSON")
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


def check_outputs(args: argparse.Namespace) -> None:
    """Every file this run will write can be written, checked before any captioning or scoring."""
    outputs = {"--out": args.out, "--per_image": args.per_image, "--save_captions": args.save_captions}
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(path, flag)
    named = [path for path in outputs.values() if path is not None]
    if len(set(named)) < len(named):
        raise ClipCapError(f"{', '.join(outputs)} must name different files")


@dataclass
class Run:
    """The captions to score and, when the run has them, CLIP image embeddings of their images."""

    results: list[dict]
    source: str  # for messages: where the captions come from
    clip_model: str | None = None  # the CLIP that made ``embeddings``, when known
    embeddings: dict = field(default_factory=dict)  # image id -> embedding


def feature_embeddings(features) -> dict:
    """Image id -> the embedding of a feature set (its first row per image)."""
    image_ids, rows = features.first_rows()
    return dict(zip(map(image_key, image_ids), features.embeddings_at(rows)))


def captioner_for(args: argparse.Namespace):
    from ..captioner import Captioner

    return Captioner.from_checkpoint(args.checkpoint, **model_options(args))


def caption_features(args: argparse.Namespace, references: dict) -> Run:
    """Caption every image of --features with --checkpoint, after checking the images match the references."""
    features = load_features(args.features)
    match_images(list(dict.fromkeys(features.image_ids)), references, args.only_common_images,
                 args.features, args.annotations)  # fail before hours of decoding, not after
    results = captioner_for(args).caption_features(features, decoding_options(args), args.batch_size,
                                                   source=args.features)
    return Run(results, f"captions of {args.features}", features.clip_model, feature_embeddings(features))


def caption_images(args: argparse.Namespace, references: dict, images: dict) -> Run:
    """Caption the references' images found in --images with --checkpoint; results keyed by the references' ids."""
    from tqdm import tqdm

    paths = image_files(references, images, args.images, args.only_common_images, args.annotations)
    captioner, options = captioner_for(args), decoding_options(args)
    ids, results, embeddings = list(paths), [], {}
    for start in tqdm(range(0, len(ids), args.batch_size), desc="captioning", unit="batch",
                      disable=len(ids) <= args.batch_size):
        batch = ids[start:start + args.batch_size]
        embeds = captioner.embed([paths[k] for k in batch])
        captions = captioner.caption_embeddings(embeds, options, args.batch_size)
        results += [{"image_id": k, "caption": c[0]} for k, c in zip(batch, captions)]
        embeddings.update(zip(batch, embeds.float().cpu()))
    return Run(results, f"captions of {args.images}", captioner.clip_model, embeddings)


def add_clipscore(args: argparse.Namespace, run: Run, evaluations: dict[str, Evaluation], references: dict,
                  images: dict) -> None:
    """CLIP-S and RefCLIP-S of every scored image into ``evaluations`` (means) and their per-image rows.

    Image embeddings come from the run when its CLIP is the CLIPScore model, else from --images."""
    from ..clipscore import KEYS, CLIPScorer
    from ..encoder import same_clip

    ids = [row["image_id"] for row in evaluations[ENTIRE].per_image]
    scorer = CLIPScorer(args.clipscore_model, resolve_device(args.device))
    if same_clip(run.clip_model, args.clipscore_model) and all(k in run.embeddings for k in ids):
        image_embeds = torch.stack([run.embeddings[k] for k in ids])
    elif args.images:
        paths = image_files({k: references[k] for k in ids}, images, args.images, False, args.annotations)
        image_embeds = scorer.embed_images([paths[k] for k in ids])
    else:
        problem = "the run has no image embeddings" if not run.embeddings else \
            f"the run's image embeddings are made by {run.clip_model or 'an unrecorded CLIP'}, not {args.clipscore_model}"
        raise ClipCapError(f"--clipscore: {problem}; pass --images FOLDER to embed the images")
    captions = {r["image_id"]: r["caption"] for r in run.results}
    values = scorer({k: captions[k] for k in ids}, {k: references[k] for k in ids}, image_embeds)
    for evaluation in evaluations.values():
        for row in evaluation.per_image:
            row.update(values[row["image_id"]])
        for key in KEYS:
            evaluation.scores[key] = float(np.mean([values[row["image_id"]][key] for row in evaluation.per_image]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args)
    references, images = load_annotations(args.annotations, args.split)
    domains = {k: info["domain"] for k, info in images.items() if "domain" in info}
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    with Scorer(metrics, args.spice_jars) as scorer:  # METEOR's Java loads while the captions are made
        if args.results:
            run = Run(load_results(args.results), args.results)
            if args.features:
                features = load_features(args.features)
                run.clip_model, run.embeddings = features.clip_model, feature_embeddings(features)
        elif args.features:
            run = caption_features(args, references)
        else:
            run = caption_images(args, references, images)
        if args.save_captions and not args.results:
            write_json(args.save_captions, run.results)
        if domains:
            evaluations = scorer.by_domain(run.results, references, domains, args.only_common_images, run.source,
                                           args.annotations)
        else:
            evaluations = {ENTIRE: scorer(run.results, references, args.only_common_images, run.source,
                                          args.annotations)}
    if args.clipscore:
        add_clipscore(args, run, evaluations, references, images)
    entire = evaluations[ENTIRE]
    if len(entire.per_image) < len(references):
        print(f"scored {len(entire.per_image)} of the {len(references)} reference images (--only_common_images)")
    print(domain_table(evaluations) if domains else entire.table(), flush=True)  # first: a failed write cannot take them
    write_scores(evaluations, args.out, args.per_image)
    print(f"wrote {args.out}" + (f" and {args.per_image}" if args.per_image else ""))
