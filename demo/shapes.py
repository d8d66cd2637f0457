"""``make demo``: the whole ClipCap job, end to end, on a captioned dataset drawn on the spot.

    python -m demo.shapes          # offline, a few minutes on a CPU: tiny random backbones
    python -m demo.shapes --real   # OpenAI CLIP ViT-B/32 and GPT-2 (used anyway when both are cached)

Read top to bottom, it is the job a user runs on COCO, step for step and through the same code:

1. draw the dataset: scenes of two coloured shapes, captioned "a small red circle left of a
   large blue square." and "... next to ...", saved as PNG files with a Karpathy-style split file;
2. encode both splits with CLIP into feature stores (parse_coco.py's reader and extractor);
3. train ClipCap, MLP mapper and GPT-2 fine-tuned (train.py's loop);
4. caption the held-out images with beam search (predict.py's captioner) and score them with the
   COCO caption metrics (evaluate.py's scorer);
5. do 3-4 again with every image embedding replaced by zeros: a caption-only baseline, which can
   only learn which captions are likely. The gap between the two is what the images contribute;
6. write a report folder under --out: metrics.json, the loss curve, and a gallery of held-out images.

Offline the backbones are tiny random models built on the spot (:mod:`testing.tiny`): the scores
show that the pipeline learns captions from images, they are not the paper's numbers. With
``--real``, or when ``openai/clip-vit-base-patch32`` and ``gpt2`` are in the local Hugging
Face cache, the demo uses those.
"""
from __future__ import annotations

import argparse
import html
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from clipcap import cli
from clipcap.annotations import load_references
from clipcap.captioner import Captioner
from clipcap.data import load_features
from clipcap.encoder import OPENAI_CHECKPOINTS
from clipcap.evaluation import METRIC_KEYS, PERCENT, Evaluation, Scorer
from clipcap.extraction import extract
from clipcap.featureset import FeatureSet, save_original_pickle
from clipcap.files import ClipCapError, atomic_write, markdown_table, write_json
from clipcap.model import ClipCapConfig
from clipcap.runtime import resolve_device
from clipcap.sources import ImageItem, coco_images, coco_items, coco_shards
from clipcap.training import TrainConfig, train
from testing.tiny import make_tiny_clip, make_tiny_gpt2

# --------------------------------------------------------------------------- 1. the dataset

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 214), "yellow": (240, 190, 20),
           "purple": (148, 73, 189)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.22}  # half the shape's width, as a fraction of the image's
IMAGE_SIZE = 128
BACKGROUND = (245, 245, 240)


def draw_scene(rng: random.Random) -> tuple[Image.Image, list[str]]:
    """Two random shapes side by side, one in each half of the picture, and two captions naming them
    from left to right.

    Every attribute is drawn independently, so no word can be guessed from the others: a
    captioner has to look. The shapes sit on the middle line: moved up and down as well, they
    would be hard to tell apart through the tiny random CLIP.
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    names = []
    for half in (0, 1):
        size, colour, shape = rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        r = SIZES[size]
        x = (half / 2 + rng.uniform(r + 0.02, 0.48 - r)) * IMAGE_SIZE
        y, r = IMAGE_SIZE / 2, r * IMAGE_SIZE
        if shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        names.append(f"{size} {colour} {shape}")
    left, right = names
    return image, [f"a {left} left of a {right}.", f"a {left} next to a {right}."]


def make_shapes_dataset(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Draw ``n_train + n_test`` scenes into ``out_dir/{train,test}/`` and describe them in
    ``out_dir/dataset_shapes.json``, laid out like Karpathy's ``dataset_coco.json``; returns that file."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    images = []
    for image_id in tqdm(range(n_train + n_test), desc="drawing scenes", unit="img"):
        split = "train" if image_id < n_train else "test"
        image, captions = draw_scene(rng)
        name = f"{image_id:06d}.png"
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        image.save(out_dir / split / name)
        images.append({"filepath": split, "filename": name, "cocoid": image_id, "split": split,
                       "sentences": [{"raw": c, "sentid": 2 * image_id + k} for k, c in enumerate(captions)]})
    path = out_dir / "dataset_shapes.json"
    write_json(path, {"dataset": "shapes", "images": images}, indent=None)
    return path


# --------------------------------------------------------------------------- 2. backbones and features

REAL_CLIP, REAL_GPT2 = "ViT-B/32", "gpt2"


@dataclass(frozen=True)
class Recipe:
    """The backbones and the optimisation of a demo run.

    The paper's settings (lr 2e-5, 5,000 warm-up steps, batch 40, 10 epochs) are for pretrained
    GPT-2 on COCO's 566K captions. The demo has a few thousand captions, so it warms up over a
    few dozen steps; a random tiny GPT-2 learns its language from scratch and takes a larger lr.
    """

    clip_model: str
    gpt2: str
    tiny: bool
    lr: float
    warmup: int
    bs: int
    epochs: int


def tiny_recipe(out_dir: Path, corpus: list[str], seed: int) -> Recipe:
    """Build a random CLIP (64 px, ViT width 128, 128-d embeddings) and a random GPT-2 (width 64, 2 layers)
    with a tokenizer trained on ``corpus``, into ``out_dir``.

    Initialised as usual, the random CLIP gives every scene nearly the same embedding, and a
    probe trained on them names the left shape's colour 60% of the time; with every initial
    weight x3 and the position embeddings x20 on top, 93%. GPT-2 runs without dropout, which
    learns these few thousand captions in fewer steps.
    """
    clip = make_tiny_clip(out_dir / "clip", image_size=64, patch_size=8, width=128, projection_dim=128, seed=seed,
                          initializer_factor=3, position_scale=20)
    gpt2 = make_tiny_gpt2(out_dir / "gpt2", corpus, n_embd=64, n_layer=2, n_head=2, dropout=0.0, seed=seed)
    return Recipe(str(clip), str(gpt2), tiny=True, lr=2e-3, warmup=30, bs=32, epochs=6)


def real_recipe() -> Recipe:
    """OpenAI's CLIP ViT-B/32 and GPT-2 small from the Hugging Face hub (or its local cache).

    Fine-tuning GPT-2 small on a CPU takes far longer than the tiny models: minutes per epoch.
    """
    return Recipe(REAL_CLIP, REAL_GPT2, tiny=False, lr=1e-4, warmup=50, bs=32, epochs=2)


def real_backbones_cached() -> bool:
    """Whether the configs and weights of CLIP ViT-B/32 and GPT-2 are in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(repo: str, name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, name), str)

    return all(cached(repo, "config.json") and (cached(repo, "model.safetensors") or cached(repo, "pytorch_model.bin"))
               for repo in (OPENAI_CHECKPOINTS[REAL_CLIP], REAL_GPT2))


def check_hub() -> None:
    """Fail in one line, and at once, when the real backbones are neither cached nor downloadable."""
    from huggingface_hub import HfApi

    for repo in (OPENAI_CHECKPOINTS[REAL_CLIP], REAL_GPT2):
        try:
            HfApi().model_info(repo, timeout=10)
        except Exception as e:  # whatever the network layer raises, the meaning is the same
            raise ClipCapError(f"--real: {repo} is not in the local Hugging Face cache and the hub cannot be "
                               f"reached ({type(e).__name__}); run once online, or leave out --real to use "
                               "tiny offline backbones") from None


def extract_split(annotations: Path, split: str, clip_model: str, store: Path, device: str) -> FeatureSet:
    """One split's CLIP features, as ``parse_coco.py --annotations ... --split ... --feature_store`` makes them."""
    shards = coco_shards(coco_images(annotations, split), annotations.parent)
    skipped = extract(shards, store, clip_model, device=device)
    if skipped:
        raise ClipCapError(f"{store}: {skipped} drawn images could not be encoded; see {store / 'skipped.tsv'}")
    return load_features(store)


def blank(features: FeatureSet) -> FeatureSet:
    """The same captions with every image embedding replaced by zeros: nothing of the images is left."""
    return FeatureSet(torch.zeros(int(features.embeddings.shape[0]), features.dim), list(features.captions),
                      features.image_index, list(features.image_ids))


# --------------------------------------------------------------------------- 3-5. train, caption, score


def train_captioner(data: Path, out_dir: Path, recipe: Recipe, epochs: int, seed: int, device: str) -> dict[str, Any]:
    """train.py's training: MLP mapper, GPT-2 fine-tuned, the recipe's optimisation."""
    return train(TrainConfig(model=ClipCapConfig(gpt2=recipe.gpt2), data=str(data), out_dir=str(out_dir),
                             prefix="shapes", epochs=epochs, batch_size=recipe.bs, lr=recipe.lr, warmup=recipe.warmup,
                             clip_model=recipe.clip_model, seed=seed, device=device, num_workers=0, log_every=10))


def caption_and_score(checkpoint: str, features: FeatureSet, references: dict, scorer: Scorer,
                      device: str) -> tuple[list[dict[str, Any]], Evaluation]:
    """predict.py's beam search over the held-out features, then evaluate.py's scores."""
    captioner = Captioner.from_checkpoint(checkpoint, device=device)
    results = captioner.caption_features(features, strategy="beam", beam_size=5)
    return results, scorer(results, references)


def exact_match(results: list[dict[str, Any]], references: dict) -> float:
    """Share of images whose caption is word for word one of their references, in percent like the scores."""
    return PERCENT * sum(r["caption"] in references[r["image_id"]] for r in results) / len(results)


# --------------------------------------------------------------------------- 6. the report

MODEL, BASELINE = "ClipCap (image)", "caption-only baseline"
BASELINE_NOTE = ("caption-only baseline: trained and decoded the same way, with every image embedding replaced "
                 "by zeros, so all it can learn is which captions are likely")


def score_rows(scores: dict[str, dict[str, float]]) -> list[list[str]]:
    """Header and one row per system, corpus scores in the paper's units (x100)."""
    keys = [k for k in (*METRIC_KEYS, "exact_match") if k in next(iter(scores.values()))]
    return [["captions from", *keys]] + [[name, *(f"{s[k]:.1f}" for k in keys)] for name, s in scores.items()]


def write_gallery(path: Path, images: list[ImageItem], captions: dict[str, dict[Any, str]],
                  per_image: dict[Any, dict[str, float]], notes: list[str], rows: list[list[str]]) -> None:
    """An HTML page: the scores, the loss curve, and held-out images (copied beside the page) with
    each system's caption, the references and the image's CIDEr."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    cards = []
    for image in images:
        name = Path(image.path).name
        shutil.copyfile(image.path, path.parent / "images" / name)
        references = image.captions
        lines = [f'<p class="{"right" if by_id[image.image_id] in references else "wrong"}"><b>{html.escape(system)}:'
                 f'</b> {html.escape(by_id[image.image_id])}</p>' for system, by_id in captions.items()]
        lines.append("<p class='refs'><b>references:</b> " + "<br>".join(map(html.escape, references)) + "</p>")
        if "CIDEr" in per_image[image.image_id]:
            lines.append(f"<p class='refs'>CIDEr {per_image[image.image_id]['CIDEr']:.0f}</p>")
        cards.append(f'<div class="card"><img src="images/{name}" alt="held-out image {image.image_id}">'
                     + "".join(lines) + "</div>")
    table = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ClipCap demo: held-out captions</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 12px 0; }} td {{ border: 1px solid #ccc; padding: 3px 8px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 12px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 13px; }}
.card img {{ width: 100%; max-width: 256px; display: block; margin: auto; }}
.card p {{ margin: 4px 0; }} .right {{ color: #11772d; }} .wrong {{ color: #b3261e; }} .refs {{ color: #666; }}
</style></head><body>
<h2>ClipCap demo: captions of held-out images</h2>
{"".join(f"<p>{html.escape(note)}</p>" for note in notes)}
<table>{table}</table>
<p>Scores x100 (pycocoevalcap); exact_match: share of images whose caption is one of its references, word
for word. Below, a caption is green when it is, red when it is not.</p>
<img src="loss.png" alt="training loss" style="max-width: 560px">
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    with atomic_write(path) as tmp:
        tmp.write_text(page)


# --------------------------------------------------------------------------- the job


@dataclass
class DemoConfig:
    out: str = "demo_out"
    real: bool | None = None  # None: the real backbones when both are in the local Hugging Face cache
    n_train: int = 3000
    n_test: int = 300
    epochs: int | None = None  # None: the recipe's
    seed: int = 0
    device: str = "auto"
    baseline: bool = True  # also train and score the caption-only baseline
    metrics: tuple[str, ...] | None = None  # None: all of evaluate.py's (SPICE is skipped offline)
    gallery_size: int = 24


def describe(recipe: Recipe, n_train: int) -> str:
    """A plain statement of which backbones ran, and so what the scores mean."""
    if not recipe.tiny:
        return (f"backbones: OpenAI CLIP {REAL_CLIP} and GPT-2 small, fine-tuned on {n_train} drawn scenes "
                "(the paper's models, not its COCO data)")
    return ("backbones: TINY RANDOM models built on the spot (CLIP ViT 64 px, width 128; GPT-2 width 64, 2 layers), "
            "because the real ones are not at hand offline. The scores show that the pipeline learns captions from "
            "images; they are not the paper's numbers (--real uses CLIP ViT-B/32 and GPT-2).")


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo into ``cfg.out``; returns what ``report/metrics.json`` holds."""
    start = time.perf_counter()
    out = Path(cfg.out)
    for part in ("shapes", "backbones", "features", "train", "train_baseline", "report"):
        shutil.rmtree(out / part, ignore_errors=True)  # a rerun starts from scratch, never from stale parts
    device = resolve_device(cfg.device)
    real = cfg.real if cfg.real is not None else real_backbones_cached()
    if real and not real_backbones_cached():
        check_hub()

    annotations = make_shapes_dataset(out / "shapes", cfg.n_train, cfg.n_test, cfg.seed)
    corpus = [c for image in coco_images(annotations, "train") for c in image.captions]
    recipe = real_recipe() if real else tiny_recipe(out / "backbones", corpus, cfg.seed)
    about = describe(recipe, cfg.n_train)
    print(about)
    if recipe.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and on a busy CPU 2 threads run 20x slower
    epochs = cfg.epochs or recipe.epochs

    train_features = extract_split(annotations, "train", recipe.clip_model, out / "features" / "train", device)
    test_features = extract_split(annotations, "test", recipe.clip_model, out / "features" / "test", device)
    references = load_references(annotations, "test")
    systems = {MODEL: (out / "features" / "train", test_features, out / "train")}
    if cfg.baseline:
        save_original_pickle(blank(train_features), out / "features" / "train_blank.pkl")
        systems[BASELINE] = (out / "features" / "train_blank.pkl", blank(test_features), out / "train_baseline")

    runs, captions, scores, per_image = {}, {}, {}, {}
    with Scorer(cfg.metrics) as scorer:
        for name, (data, held_out, train_dir) in systems.items():
            print(f"--- {name}: training on {data}")
            runs[name] = train_captioner(data, train_dir, recipe, epochs, cfg.seed, device)
            results, evaluation = caption_and_score(runs[name]["checkpoint"], held_out, references, scorer, device)
            captions[name] = {r["image_id"]: r["caption"] for r in results}
            scores[name] = {**evaluation.scores, "exact_match": exact_match(results, references)}
            if name == MODEL:
                per_image = {row["image_id"]: row for row in evaluation.per_image}

    report = out / "report"
    report.mkdir(parents=True)
    shutil.copyfile(runs[MODEL]["loss_plot"], report / "loss.png")
    rows = score_rows(scores)
    notes = [about, BASELINE_NOTE] if cfg.baseline else [about]
    held_out = coco_items(coco_images(annotations, "test"), annotations.parent)[:cfg.gallery_size]
    write_gallery(report / "gallery.html", held_out, captions, per_image, notes, rows)
    write_json(report / "captions.json", captions)
    summary = {"backbones": "real" if not recipe.tiny else "tiny random", "about": about,
               "recipe": {**asdict(recipe), "epochs": epochs},
               "dataset": {"train_images": cfg.n_train, "test_images": cfg.n_test, "seed": cfg.seed,
                           "annotations": str(annotations)},
               "held_out_scores": scores, "checkpoints": {name: r["checkpoint"] for name, r in runs.items()},
               "seconds": round(time.perf_counter() - start, 1)}
    write_json(report / "metrics.json", summary, indent=2)

    print(f"\nheld-out scores, {cfg.n_test} images (x100; exact_match: the caption is one of the references):")
    print(markdown_table(rows))
    for note in notes:
        print(note)
    print(f"report: {report}/ (metrics.json, loss.png, gallery.html); {summary['seconds']:.0f} s")
    return summary


def main() -> None:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help="work and report folder")
    p.add_argument("--real", action="store_true", default=None,
                   help="CLIP ViT-B/32 and GPT-2 from the Hugging Face hub or its cache, instead of tiny random models")
    p.add_argument("--n_train", type=int, default=d.n_train, help="training images (2 captions each)")
    p.add_argument("--n_test", type=int, default=d.n_test, help="held-out images")
    p.add_argument("--epochs", type=int, default=None, help="default: 6 with tiny backbones, 2 with real ones")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto: cuda if available, else cpu")
    p.add_argument("--no_baseline", dest="baseline", action="store_false",
                   help="skip the caption-only baseline (the same training with the images blanked out)")
    args = p.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars of tiny models are noise
    hf_logging.set_verbosity_error()
    run(DemoConfig(**vars(args)))


if __name__ == "__main__":
    cli.run(main)
