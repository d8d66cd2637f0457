"""A scored run's gallery and CLIPScore: what the report shows of its captions beyond the metrics.

For the first few test images: a thumbnail, the greedy caption, the beam caption that was scored
and two references. For every scored image: CLIP-S and RefCLIP-S (Hessel et al., 2021, x100 like every
score here) of the scored
caption, from the test features when the CLIPScore model made them, else from the images. The inputs
are read from the commands that made them: the scoring (evaluate.py's flags) and the features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .files import ClipCapError, atomic_write, write_json
from .stages import Step, resolve

THUMBNAIL = 256  # pixels, the longer side


def gallery_folder(score: Step) -> Path:
    """Where the gallery of a scoring command goes: ``gallery/`` beside ``metrics.json``, ``gallery_nocaps/``
    beside ``metrics_nocaps.json``."""
    out = resolve(score.flag("--out") or "metrics.json")
    return out.with_name("gallery" + out.stem.removeprefix("metrics"))


def image_opener(features: Step, infos: dict[Any, dict[str, str]]) -> Callable[[Any], Any]:
    """image id -> a readable image (path or file object), or None, for the images of a features command."""
    from .annotations import image_key

    script = features.script()
    if script == "parse_conceptual.py":
        from .fetch import CONCEPTUAL_SPLITS
        from .sources import conceptual_shards

        root, split = resolve(features.flag("--data_root") or "data/conceptual"), features.flag("--split") or "val"
        items = {}
        for shard in conceptual_shards(root / split, root / CONCEPTUAL_SPLITS[split]):
            items.update((image_key(item.image_id), item) for item in shard.list_items()[0])
        return lambda k: items[k].open() if k in items else None
    root = resolve(features.flag("--images_root") if script == "parse_coco.py" else features.flag("--images") or ".")
    return lambda k: root / infos[k]["file"] if k in infos and (root / infos[k]["file"]).is_file() else None


def thumbnail(source: Any, path: Path) -> None:
    from .encoder import load_image

    image = load_image(source, name=str(path))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    with atomic_write(path) as tmp:
        image.convert("RGB").save(tmp, format="JPEG", quality=85)


def make_gallery(score: Step, features: Step, out_dir: Path, count: int, clipscore_model: str | None,
                 device: str = "cpu") -> dict[str, Any]:
    """Write ``out_dir/gallery.json`` and its thumbnails for the run that ``score`` scored; returns the JSON."""
    from .annotations import image_key, load_annotations
    from .captioner import Captioner
    from .cli.evaluate import parse_args
    from .data import load_features
    from .evaluation import load_results

    args = parse_args(score.script_args())
    references, infos = load_annotations(resolve(args.annotations), args.split)
    references = {image_key(k): v for k, v in references.items()}
    scored = {image_key(r["image_id"]): r["caption"] for r in load_results(resolve(args.save_captions))}
    test = load_features(resolve(args.features))
    ids, rows = test.first_rows()
    row_of = {image_key(k): r for k, r in zip(ids, rows)}
    opener = image_opener(features, infos)
    chosen = []
    for k in scored:
        if len(chosen) == count:
            break
        if k in references and k in row_of and opener(k) is not None:
            chosen.append(k)
    captioner = Captioner.from_checkpoint(resolve(args.checkpoint), device=device)
    greedy = captioner.caption_embeddings(test.embeddings_at(np.array([row_of[k] for k in chosen], dtype=np.int64)),
                                          strategy="greedy") if chosen else []
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for n, (k, caption) in enumerate(zip(chosen, greedy)):
        thumbnail(opener(k), out_dir / "images" / f"{n}.jpg")
        images.append({"image_id": k, "file": f"images/{n}.jpg", "greedy": caption[0], "beam": scored[k],
                       "references": references[k][:2]})
    gallery = {"checkpoint": args.checkpoint, "captions": args.save_captions, "images": images,
               "clipscore": clipscore(scored, references, test, row_of, opener, clipscore_model, device)}
    write_json(out_dir / "gallery.json", gallery)
    return gallery


def clipscore(captions: dict[Any, str], references: dict[Any, list[str]], test: Any, row_of: dict[Any, int],
              opener: Callable[[Any], Any], model: str | None, device: str) -> dict[str, Any]:
    """Mean CLIP-S and RefCLIP-S of the scored captions; a model that cannot load is reported, not fatal."""
    import torch

    from .clipscore import KEYS, CLIPScorer
    from .encoder import load_image, same_clip
    from .evaluation import PERCENT

    if model is None:
        return {"skipped": "no CLIPScore model"}
    from transformers.utils import logging as hf_logging

    ids = [k for k in captions if k in references]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading the text tower of a full CLIP reports its unused image weights
    try:
        scorer = CLIPScorer(model, device)
        if same_clip(test.clip_model, model) and all(k in row_of for k in ids):
            embeds = test.embeddings_at(np.array([row_of[k] for k in ids], dtype=np.int64))
        else:
            ids = [k for k in ids if opener(k) is not None]
            embeds = torch.cat([scorer.encoder([load_image(opener(k)) for k in ids[start:start + 64]]).float().cpu()
                                for start in range(0, len(ids), 64)]) if ids else torch.zeros(0, 1)
        values = scorer({k: captions[k] for k in ids}, {k: references[k] for k in ids}, embeds)
    except ClipCapError as e:
        return {"skipped": str(e)}
    finally:
        hf_logging.set_verbosity(verbosity)
    return {"model": model, "images": len(ids),  # in the units evaluate.py writes them: x100
            **{key: PERCENT * float(np.mean([v[key] for v in values.values()])) for key in KEYS}}
