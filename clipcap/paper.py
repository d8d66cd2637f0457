"""The paper's Table 1 as data: the one place in the repository that states its numbers.

Mokady, Hertz, Bermano, "ClipCap: CLIP Prefix for Image Captioning" (arXiv 2111.09734 v1). Scores are
in the paper's units (percent), under pycocoevalcap's metric names. Each row is one recipe in
recipes/ (its name is the recipe's file name) and holds the settings the paper states for it, against
which a run's own settings are compared. The README's tables and the reproduction report
(:mod:`clipcap.report`) show these numbers; a test holds them to each other. The rows beyond the
paper (:data:`EXTRA_ROWS`) are run and reported alike, beside the settings their own source states and
with the numbers of a paper only where they were checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The paper's training setup, shared by every row (the batch is the global one).
SETTINGS = {"epochs": 10, "batch_size": 40, "lr": 2e-5, "warmup": 5000, "gpt2": "gpt2", "prefix_length": 10}
# Table 1's columns, in its order (pycocoevalcap's names); the report adds ROUGE_L.
METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
METRIC_LABELS = {"Bleu_1": "B@1", "Bleu_2": "B@2", "Bleu_3": "B@3", "Bleu_4": "B@4", "METEOR": "METEOR",
                 "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain", "entire")  # "entire": the paper's "overall"
NOCAPS_METRICS = ("CIDEr", "SPICE")


@dataclass(frozen=True)
class Row:
    """One row of Table 1: what it trains, the scores it reports, and where each number comes from."""

    name: str  # the recipe: recipes/{name}.sh
    title: str
    dataset: str  # coco, conceptual or nocaps: the data the row is scored on
    scores: dict[str, Any]  # metric -> percent; nocaps: model row -> domain -> metric -> percent
    params: str = ""
    training_time: str = ""
    # The row's own settings beside SETTINGS. The transformer rows' RN50x4 and K = 10 follow from the paper's
    # parameter counts, not from its text (see the README's notes on the table).
    settings: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    source: str = "paper"  # whose settings (and scores) these are: Table 1's, or those of a row beyond it
    scores_note: str = ""  # why a row beyond Table 1 has no scores to compare with


MLP = {"mapping_type": "mlp", "clip_model": "ViT-B/32"}
TRANSFORMER = {"mapping_type": "transformer", "num_layers": 8, "only_prefix": True}

ROWS: tuple[Row, ...] = (
    Row("coco_transformer", "Transformer mapper, GPT-2 frozen", "coco",
        {"Bleu_4": 33.53, "METEOR": 27.45, "CIDEr": 113.08, "SPICE": 21.05}, "43M", "6 h GTX1080",
        {**TRANSFORMER, "clip_model": "RN50x4"}),
    Row("coco_mlp", "MLP mapper + GPT-2 fine-tuning", "coco",
        {"Bleu_1": 74.12, "Bleu_2": 57.40, "Bleu_3": 43.11, "Bleu_4": 32.15, "METEOR": 27.10, "ROUGE_L": 55.02,
         "CIDEr": 108.35, "SPICE": 20.12}, "156M", "7 h GTX1080", {**MLP, "only_prefix": False},
        ("B@1, B@2, B@3 and ROUGE-L come from the original repository's README, not from the paper.",)),
    Row("coco_transformer_tuned", "(ablation) Transformer + GPT-2 tuning", "coco",
        {"Bleu_4": 32.22, "METEOR": 27.79, "CIDEr": 109.83, "SPICE": 20.63}, "167M", "7 h",
        {**TRANSFORMER, "only_prefix": False, "clip_model": "RN50x4"}),
    Row("coco_mlp_frozen", "(ablation) MLP, GPT-2 frozen", "coco",
        {"Bleu_4": 27.39, "METEOR": 24.40, "CIDEr": 92.38, "SPICE": 18.04}, "32M", "6 h",
        {**MLP, "only_prefix": True}),
    Row("conceptual_mlp", "MLP mapper + GPT-2 fine-tuning", "conceptual",
        {"ROUGE_L": 26.71, "CIDEr": 87.26, "SPICE": 18.5}, "156M", "80 h GTX1080", {**MLP, "only_prefix": False}),
    Row("conceptual_transformer", "Transformer mapper, GPT-2 frozen", "conceptual",
        {"ROUGE_L": 25.12, "CIDEr": 71.82, "SPICE": 16.07}, "43M", "72 h GTX1080",
        TRANSFORMER),
    Row("nocaps", "The COCO models on nocaps validation", "nocaps",
        {"coco_mlp": {"in-domain": {"CIDEr": 79.73, "SPICE": 12.2}, "near-domain": {"CIDEr": 67.69, "SPICE": 11.26},
                      "out-domain": {"CIDEr": 49.35, "SPICE": 9.7}, "entire": {"CIDEr": 65.7, "SPICE": 11.1}},
         "coco_transformer": {"in-domain": {"CIDEr": 84.85, "SPICE": 12.14},
                              "near-domain": {"CIDEr": 66.82, "SPICE": 10.92},
                              "out-domain": {"CIDEr": 49.14, "SPICE": 9.57},
                              "entire": {"CIDEr": 65.83, "SPICE": 10.86}}},
        notes=("The in-domain and out-of-domain figures could not be checked against the paper's PDF.",)),
)
# Beyond Table 1: no number of the ClipCap paper applies. Their settings are those their source states (CapDec's
# train.py for COCO; the modern pair's recipe), against which a run's own are compared as Table 1's are.
EXTRA_ROWS: tuple[Row, ...] = (
    Row("coco_siglip2_qwen", "SigLIP 2 tower, Qwen2.5-0.5B with LoRA (a modern pair)", "coco", {},
        settings={"epochs": 4, "batch_size": 40, "lr": 1e-4, "warmup": 5000, "gpt2": "Qwen/Qwen2.5-0.5B",
                  "prefix_length": 10, "mapping_type": "mlp", "only_prefix": False, "normalize_prefix": True,
                  "lora_rank": 16, "lm_dtype": "bfloat16", "clip_model": "google/siglip2-so400m-patch14-224"},
        source="recipe", scores_note="none: in no paper; unmeasured until someone runs it on a GPU"),
    Row("capdec_coco", "CapDec: trained on caption text alone, scored on COCO's test images", "coco", {},
        settings={"epochs": 10, "batch_size": 36, "lr": 2e-5, "gpt2": "gpt2", "prefix_length": 40,
                  "mapping_type": "transformer", "num_layers": 8, "only_prefix": False, "normalize_prefix": True,
                  "noise_variance": 0.016, "clip_model": "RN50x4"},
        source="CapDec", scores_note="none: no run here was checked against the CapDec paper"),
)
BY_NAME = {row.name: row for row in ROWS}
EXTRA_BY_NAME = {row.name: row for row in EXTRA_ROWS}
NOCAPS_MODELS = tuple(BY_NAME["nocaps"].scores)  # the rows whose models nocaps scores


def paper_settings(row: Row) -> dict[str, Any]:
    """Every setting ``row``'s source states: the paper's shared setup and the row's own for Table 1."""
    return {**SETTINGS, **row.settings} if row.source == "paper" else dict(row.settings)
