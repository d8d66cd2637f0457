#!/usr/bin/env bash
# Paper Table 1, COCO Karpathy test: MLP mapper + GPT-2 fine-tuning (K = 10, CLIP ViT-B/32, 156M parameters).
# Paper: B@4 32.15, METEOR 27.10, CIDEr 108.35, SPICE 20.12 (7 h on a GTX1080).
# Needs data/coco/train2014/, data/coco/val2014/ and data/coco/dataset_coco.json (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

$PY parse_coco.py --annotations data/coco/dataset_coco.json --split train --clip_model_type ViT-B/32
$PY parse_coco.py --annotations data/coco/dataset_coco.json --split test --clip_model_type ViT-B/32
$PY train.py --data data/coco/oscar_split_ViT-B_32_train.pkl --out_dir runs/coco_mlp --prefix coco_mlp \
    --epochs 10 --bs 40
$PY evaluate.py --checkpoint runs/coco_mlp/coco_mlp-009.safetensors \
    --features data/coco/oscar_split_ViT-B_32_test.pkl --annotations data/coco/dataset_coco.json --split test \
    --out runs/coco_mlp/metrics.json --save_captions runs/coco_mlp/captions_test.json
