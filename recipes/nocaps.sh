#!/usr/bin/env bash
# Paper Table 1, nocaps validation: the two COCO models, scored per domain (in, near, out) and over all images.
# Paper (CIDEr / SPICE, overall): MLP + GPT-2 tuning 65.7 / 11.1; transformer, GPT-2 frozen 65.83 / 10.86.
# Run recipes/coco_mlp.sh and recipes/coco_transformer.sh first. Needs $NOCAPS/nocaps_val_4500_captions.json
# and its 4,500 images in $NOCAPS/val/ (see data/README.md). The transformer runs scored are those that
# coco_transformer.sh left in $RUNS, whatever its K (K=40 scores only that one; with none yet, the K=10 run that
# coco_transformer.sh makes by default). Stages (recipes/stages.sh): features, score.
# The environment overrides: NOCAPS RUNS K PY, and each model's CLIP: MLP_CLIP MLP_TAG TRANSFORMER_CLIP TRANSFORMER_TAG.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/stages.sh
STAGES="features score"
NOCAPS=${NOCAPS:-data/nocaps}
RUNS=${RUNS:-runs}
RUN_DIR=$RUNS/nocaps
ANNOTATIONS=$NOCAPS/nocaps_val_4500_captions.json
# Each model: its run (ROW), the CLIP of its features and their file name's tag.
MODELS=(coco_mlp "${MLP_CLIP:-ViT-B/32}" "${MLP_TAG:-ViT-B_32}")
transformers=()
for run in "$RUNS"/coco_transformer_k${K:-[0-9]*}; do
    if [ -d "$run" ]; then transformers+=("$(basename "$run")"); fi
done
if [ ${#transformers[@]} -eq 0 ]; then transformers=("coco_transformer_k${K:-10}"); fi
for row in "${transformers[@]}"; do
    MODELS+=("$row" "${TRANSFORMER_CLIP:-RN50x4}" "${TRANSFORMER_TAG:-RN50x4}")
done
needs nocaps "$ANNOTATIONS" "$NOCAPS/val"
for ((i = 0; i < ${#MODELS[@]}; i += 3)); do needs model "$RUNS/${MODELS[i]}/${MODELS[i]}_best.safetensors"; done

features() {
    for ((i = 0; i < ${#MODELS[@]}; i += 3)); do
        once "$NOCAPS/nocaps_val_${MODELS[i + 2]}.pkl" "$PY" parse_nocaps.py --annotations "$ANNOTATIONS" \
            --images "$NOCAPS/val" --clip_model_type "${MODELS[i + 1]}" --out_path "$NOCAPS/nocaps_val_${MODELS[i + 2]}.pkl"
    done
}
score() {  # caption nocaps with runs/ROW/ROW_best and score it per domain
    for ((i = 0; i < ${#MODELS[@]}; i += 3)); do
        local row=${MODELS[i]}
        outputs "$RUNS/$row/metrics_nocaps.json" "$RUNS/$row/captions_nocaps.json"
        always "$PY" evaluate.py --checkpoint "$RUNS/$row/${row}_best.safetensors" \
            --features "$NOCAPS/nocaps_val_${MODELS[i + 2]}.pkl" --annotations "$ANNOTATIONS" \
            --out "$RUNS/$row/metrics_nocaps.json" --save_captions "$RUNS/$row/captions_nocaps.json"
    done
}
stages "$@"
