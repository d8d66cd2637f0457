#!/usr/bin/env bash
# Paper Table 1, nocaps validation: the two COCO models, scored per domain (in, near, out) and over all images.
# Paper (CIDEr / SPICE, overall): MLP + GPT-2 tuning 65.7 / 11.1; transformer, GPT-2 frozen 65.83 / 10.86.
# Run recipes/coco_mlp.sh and recipes/coco_transformer.sh first. Needs $NOCAPS/nocaps_val_4500_captions.json
# and its 4,500 images in $NOCAPS/val/ (see data/README.md). The transformer runs scored are those that
# coco_transformer.sh left in $RUNS, whatever its K (K=40 scores only that one).
# The environment overrides: NOCAPS RUNS K PY, and each model's CLIP: MLP_CLIP MLP_TAG TRANSFORMER_CLIP TRANSFORMER_TAG.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NOCAPS=${NOCAPS:-data/nocaps}
RUNS=${RUNS:-runs}
ANNOTATIONS=$NOCAPS/nocaps_val_4500_captions.json

score() {  # ROW CLIP TAG: caption nocaps with runs/ROW/ROW_best and score it per domain
    local features=$NOCAPS/nocaps_val_$3.pkl
    [ -e "$features" ] || $PY parse_nocaps.py --annotations "$ANNOTATIONS" --images "$NOCAPS/val" \
        --clip_model_type "$2" --out_path "$features"
    $PY evaluate.py --checkpoint "$RUNS/$1/$1_best.safetensors" --features "$features" --annotations "$ANNOTATIONS" \
        --out "$RUNS/$1/metrics_nocaps.json" --save_captions "$RUNS/$1/captions_nocaps.json"
}
transformers=()
for run in "$RUNS"/coco_transformer_k${K:-[0-9]*}; do
    [ -d "$run" ] && transformers+=("$(basename "$run")")
done
if [ ${#transformers[@]} -eq 0 ]; then
    echo "error: no run $RUNS/coco_transformer_k${K:-*}: run recipes/coco_transformer.sh first" >&2
    exit 2
fi
score coco_mlp "${MLP_CLIP:-ViT-B/32}" "${MLP_TAG:-ViT-B_32}"
for row in "${transformers[@]}"; do
    score "$row" "${TRANSFORMER_CLIP:-RN50x4}" "${TRANSFORMER_TAG:-RN50x4}"
done
