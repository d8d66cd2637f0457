"""Turn a ClipCap checkpoint, such as one of the original's released ``.pt`` files, into a Hub-ready folder.

    clipcap-convert coco_weights.pt clipcap-coco-mlp/          # or: python -m clipcap.cli.convert ...
    clipcap-convert transformer_weights.pt clipcap-coco-transformer/
    hf upload OWNER/clipcap-coco-mlp clipcap-coco-mlp/     # huggingface_hub's CLI (after hf auth login)

The config is inferred from the tensor shapes as for loading (:func:`clipcap.checkpoint.load_checkpoint`):
the CLIP by embedding width (ViT-B/32 for the MLP files, RN50x4 for ``transformer_weights.pt``,
whose embeddings are L2-normalised as at inference; "unknown" for a width no known CLIP gives,
until --clip_model names it). A prefix-only model keeps only its mapper (a LoRA model its mapper
and adapters); its LM, frozen in training, is loaded by name. The training data is inferred from
the file name (``coco``, ``conceptual``, the released ``transformer_weights.pt``) unless
``--dataset`` names it.
An existing folder is written into only if what it holds is an earlier model of this command
(or of save_pretrained), which is then replaced.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import hub_access
from ..checkpoint import UNKNOWN_CLIP, load_checkpoint
from ..files import check_outputs
from ..hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_folder, checkpoint_files, infer_dataset, save_pretrained
from .common import add_clip_model, run


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="clipcap-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the original's .pt (coco_weights.pt, conceptual_weights.pt, "
                                      "transformer_weights.pt) or any checkpoint of ours")
    p.add_argument("out", help="the folder to write (model.safetensors, config.json, README.md)")
    p.add_argument("--dataset", help="training data for the model card (default: from the file name)")
    p.add_argument("--recipe", help="how it was trained, for the model card (e.g. recipes/coco_mlp.sh)")
    p.add_argument("--metrics", help="evaluate.py's metrics.json, for the model card")
    p.add_argument("--repo_id", help="the Hub repo it will live in, for the model card's example")
    p.add_argument("--lm", "--gpt2", dest="lm",
                   help="the LM's name or directory to record (default: the checkpoint's, or GPT-2 by the shapes)")
    add_clip_model(p, help="CLIP to record (default: inferred from the embedding width)")
    p.add_argument("--normalize_prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise CLIP embeddings (default: on for the released transformer weights only)")
    args = p.parse_args(argv)

    out = Path(args.out)
    check_folder(out)
    check_outputs({f"out ({name})": out / name for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)},
                  {"checkpoint": checkpoint_files(args.checkpoint), "--metrics": args.metrics})
    replacing = (out / WEIGHTS_NAME).exists()
    overrides = {k: v for k, v in (("clip_model", args.clip_model), ("normalize_prefix", args.normalize_prefix))
                 if v is not None}
    model = load_checkpoint(args.checkpoint, "cpu", lm=args.lm, **overrides)
    save_pretrained(model, out, dataset=args.dataset or infer_dataset(args.checkpoint), recipe=args.recipe,
                    metrics=args.metrics, source=Path(args.checkpoint).name, repo_id=args.repo_id)
    c = model.config
    clip = f"unknown ({c.prefix_size}-d; name it with --clip_model)" if c.clip_model == UNKNOWN_CLIP else c.clip_model
    print(f"{'replaced the model in' if replacing else 'wrote'} {out}: {c.mapping_type} mapper, K={c.prefix_length}, "
          f"CLIP {clip}{' (normalised)' if c.normalize_prefix else ''}, LM {c.lm} "
          f"{'loaded by name' if c.frozen_lm else 'stored'}")
    local = [name for name in (c.lm, c.clip_model) if hub_access.is_local(name)]
    if local:
        print(f"note: {' and '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}, which "
              "load on this machine only: do not upload this folder; to share it, convert with --lm / --clip_model "
              "naming the Hugging Face Hub ids instead")
    return out


if __name__ == "__main__":
    run(main)
