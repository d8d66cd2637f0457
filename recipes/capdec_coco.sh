#!/usr/bin/env bash
# CapDec (Nukrai, Mokady, Globerson, Findings of EMNLP 2022), its COCO row: ClipCap trained on CLIP *text*
# embeddings of COCO's Karpathy train captions (train + restval) alone, with Gaussian noise, no image read; then
# scored on the Karpathy test images, captioned from their CLIP *image* embeddings.
# The settings of CapDec's train.py for COCO: CLIP RN50x4 (text and image towers of one file), transformer mapper
# (K = 40, 40 CLIP tokens, 8 layers), GPT-2 fine-tuned, batch 36, 10 epochs, lr 2e-5; embeddings L2-normalised,
# noise of variance 0.016 per coordinate added after the normalisation and normalised again, as its code does.
# No image chooses the epoch (that would be training on images): the last one is scored.
# The README lists no number of the CapDec paper beside this row: none was checked against a run of it here.
# The environment overrides: COCO RUNS CLIP TAG GPT2 EPOCHS BS K NOISE PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
COCO=${COCO:-data/coco}
ROW=capdec_coco
OUT=${RUNS:-runs}/$ROW
CLIP=${CLIP:-RN50x4}
FEATURES=$COCO/oscar_split_${TAG:-${CLIP//\//_}}  # the test features are those of recipes/coco_transformer.sh
EPOCHS=${EPOCHS:-10}
K=${K:-40}

[ -e "${FEATURES}_text_train.pkl" ] || $PY parse_captions.py "$COCO/dataset_coco.json" --split train --text_only \
    --clip_model "$CLIP" --out "${FEATURES}_text_train.pkl"
[ -e "${FEATURES}_test.pkl" ] || $PY parse_coco.py --annotations "$COCO/dataset_coco.json" --images_root "$COCO" \
    --split test --clip_model_type "$CLIP" --out_path "${FEATURES}_test.pkl" \
    --references_path "$COCO/karpathy_test_references.json"
$PY train.py --data "${FEATURES}_text_train.pkl" --out_dir "$OUT" --prefix "$ROW" --epochs "$EPOCHS" --bs "${BS:-36}" \
    --gpt2 "${GPT2:-gpt2}" --mapping_type transformer --num_layers 8 --prefix_length "$K" --prefix_length_clip "$K" \
    --normalize_prefix --noise_variance "${NOISE:-0.016}"
$PY evaluate.py --checkpoint "$OUT/$ROW-$(printf %03d $((EPOCHS - 1))).safetensors" --features "${FEATURES}_test.pkl" \
    --annotations "$COCO/dataset_coco.json" --split test --out "$OUT/metrics.json" --save_captions "$OUT/captions_test.json"
