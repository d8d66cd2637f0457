#!/usr/bin/env bash
# CapDec (Nukrai, Mokady, Globerson, Findings of EMNLP 2022), its COCO row: ClipCap trained on CLIP *text*
# embeddings of COCO's Karpathy train captions (train + restval) alone, with Gaussian noise, no image read; then
# scored on the Karpathy test images, captioned from their CLIP *image* embeddings.
# The settings of CapDec's train.py for COCO: CLIP RN50x4 (text and image towers of one file), transformer mapper
# (K = 40, 40 CLIP tokens, 8 layers), GPT-2 fine-tuned, batch 36, 10 epochs, lr 2e-5; embeddings L2-normalised,
# noise of variance 0.016 per coordinate added after the normalisation and normalised again, as its code does.
# No image chooses the epoch (that would be training on images): the last one is scored.
# The README lists no number of the CapDec paper beside this row: none was checked against a run of it here.
# Stages (recipes/stages.sh): features (the captions' text embeddings; the test images' features, those of
# recipes/coco_transformer.sh), train (resuming a killed run), score.
# The environment overrides: COCO RUNS CLIP TAG GPT2 EPOCHS BS K NOISE PY GPUS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/stages.sh
STAGES="features train score"
COCO=${COCO:-data/coco}
ROW=capdec_coco DEFAULT_CLIP=RN50x4
RUN_DIR=${RUNS:-runs}/$ROW PREFIX=$ROW
CLIP=${CLIP:-$DEFAULT_CLIP}
FEATURES=$COCO/oscar_split_${TAG:-${DEFAULT_CLIP//\//_}}
EPOCHS=${EPOCHS:-10}
LAST=$RUN_DIR/$ROW-$(printf %03d $((EPOCHS - 1))).safetensors
K=${K:-40}
split_batch "${BS:-36}"
needs coco "$COCO/dataset_coco.json" "$COCO/val2014"  # the test images; of the training images, only captions

features() {
    once "${FEATURES}_text_train.pkl" "${LAUNCH[@]}" parse_captions.py "$COCO/dataset_coco.json" --split train \
        --text_only --clip_model "$CLIP" --out "${FEATURES}_text_train.pkl"
    once "${FEATURES}_test.pkl" "${LAUNCH[@]}" parse_coco.py --annotations "$COCO/dataset_coco.json" \
        --images_root "$COCO" --split test --clip_model_type "$CLIP" --out_path "${FEATURES}_test.pkl" \
        --references_path "$COCO/karpathy_test_references.json"
}
train() {
    resume_from "$RUN_DIR/${ROW}_resume.pt"
    outputs "$LAST"
    always "${LAUNCH[@]}" train.py --data "${FEATURES}_text_train.pkl" --out_dir "$RUN_DIR" --prefix "$ROW" \
        --epochs "$EPOCHS" --bs "$BATCH" --gpt2 "${GPT2:-gpt2}" --mapping_type transformer --num_layers 8 \
        --prefix_length "$K" --prefix_length_clip "$K" --normalize_prefix --noise_variance "${NOISE:-0.016}" \
        "${RESUME[@]}"
}
score() {
    outputs "$RUN_DIR/metrics.json" "$RUN_DIR/captions_test.json"
    always "$PY" evaluate.py --checkpoint "$LAST" --features "${FEATURES}_test.pkl" \
        --annotations "$COCO/dataset_coco.json" --split test --out "$RUN_DIR/metrics.json" \
        --save_captions "$RUN_DIR/captions_test.json"
}
stages "$@"
