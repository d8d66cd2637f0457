# The COCO job of a Table 1 row, sourced by the row's recipe (coco_*.sh), which sets ROW, DEFAULT_CLIP
# and TRAIN_FLAGS. Stages (recipes/stages.sh): features of Karpathy's train (+ restval), val and test splits,
# each made once; train, keeping the epoch with the best val CIDEr ({ROW}_best, as the authors reported their
# best epoch), resuming a killed run; score that checkpoint on test.
# The environment overrides the paper's settings: COCO RUNS CLIP TAG GPT2 EPOCHS BS LR WARMUP VAL_CAPTIONS PY GPUS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/stages.sh
STAGES="features train score"
COCO=${COCO:-data/coco}
RUN_DIR=${RUNS:-runs}/$ROW PREFIX=$ROW
CLIP=${CLIP:-$DEFAULT_CLIP}
EPOCHS=${EPOCHS:-10}
FEATURES=$COCO/oscar_split_${TAG:-${DEFAULT_CLIP//\//_}}
split_batch "${BS:-40}"
optimizer_flags
needs coco "$COCO/dataset_coco.json" "$COCO/train2014" "$COCO/val2014"

features() {
    for split in train val test; do
        once "${FEATURES}_$split.pkl" "${LAUNCH[@]}" parse_coco.py --annotations "$COCO/dataset_coco.json" \
            --images_root "$COCO" --split $split --clip_model_type "$CLIP" --out_path "${FEATURES}_$split.pkl" \
            --references_path "$COCO/karpathy_${split}_references.json"
    done
}
train() {
    resume_from "$RUN_DIR/${ROW}_resume.pt"
    outputs "$RUN_DIR/$ROW-$(printf %03d $((EPOCHS - 1))).safetensors" "$RUN_DIR/${ROW}_best.safetensors"
    always "${LAUNCH[@]}" train.py --data "${FEATURES}_train.pkl" --val_data "${FEATURES}_val.pkl" \
        --val_captions "${VAL_CAPTIONS:-1000}" --out_dir "$RUN_DIR" --prefix "$ROW" --epochs "$EPOCHS" --bs "$BATCH" \
        --gpt2 "${GPT2:-gpt2}" "${TRAIN_FLAGS[@]}" "${OPTIM[@]}" "${RESUME[@]}"
}
score() {
    outputs "$RUN_DIR/metrics.json" "$RUN_DIR/captions_test.json"
    always "$PY" evaluate.py --checkpoint "$RUN_DIR/${ROW}_best.safetensors" --features "${FEATURES}_test.pkl" \
        --annotations "$COCO/dataset_coco.json" --split test --out "$RUN_DIR/metrics.json" \
        --save_captions "$RUN_DIR/captions_test.json"
}
stages "$@"
