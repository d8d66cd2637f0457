#!/usr/bin/env bash
# Paper Table 1, Conceptual Captions validation (used as test, about 12.5K images that still download):
# MLP mapper + GPT-2 fine-tuning (K = 10, CLIP ViT-B/32, 156M parameters).
# Paper: ROUGE-L 26.71, CIDEr 87.26, SPICE 18.5 (80 h on a GTX1080).
# Needs data/conceptual/{train,val}/ from img2dataset and data/conceptual/Validation_GCC-1.1.0-Validation.tsv
# (see the README). Validation images that no longer download have no features: --only_common_images.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

$PY parse_conceptual.py --split val --clip_model_type ViT-B/32
$PY parse_conceptual.py --split train --clip_model_type ViT-B/32 --feature_store
$PY train.py --data data/conceptual/conceptual_clip_ViT-B_32_train --out_dir runs/conceptual_mlp \
    --prefix conceptual_mlp --epochs 10 --bs 40
$PY evaluate.py --checkpoint runs/conceptual_mlp/conceptual_mlp-009.safetensors \
    --features data/conceptual/conceptual_clip_ViT-B_32_val.pkl \
    --annotations data/conceptual/Validation_GCC-1.1.0-Validation.tsv --only_common_images \
    --out runs/conceptual_mlp/metrics.json --save_captions runs/conceptual_mlp/captions_val.json
