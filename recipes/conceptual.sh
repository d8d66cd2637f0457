# The Conceptual Captions job of a Table 1 row, sourced by the row's recipe (conceptual_*.sh), which sets
# ROW, DEFAULT_CLIP and TRAIN_FLAGS. Needs $CC/{train,val}/ from img2dataset and
# $CC/Validation_GCC-1.1.0-Validation.tsv (see data/README.md). Stages (recipes/stages.sh): features, train
# (resuming a killed run), score. The validation set is the test set here, so no epoch is chosen by it: the
# last epoch is scored. Validation images that no longer download have no features, hence --only_common_images.
# The environment overrides the paper's settings: CC RUNS CLIP TAG GPT2 EPOCHS BS LR WARMUP PY GPUS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source recipes/stages.sh
STAGES="features train score"
CC=${CC:-data/conceptual}
RUN_DIR=${RUNS:-runs}/$ROW PREFIX=$ROW
CLIP=${CLIP:-$DEFAULT_CLIP}
EPOCHS=${EPOCHS:-10}
FEATURES=$CC/conceptual_clip_${TAG:-${DEFAULT_CLIP//\//_}}
LAST=$RUN_DIR/$ROW-$(printf %03d $((EPOCHS - 1))).safetensors
split_batch "${BS:-40}"
optimizer_flags
needs conceptual "$CC/Validation_GCC-1.1.0-Validation.tsv" "$CC/train" "$CC/val"

features() {
    once "${FEATURES}_val.pkl" "${LAUNCH[@]}" parse_conceptual.py --data_root "$CC" --split val \
        --clip_model_type "$CLIP" --out_path "${FEATURES}_val.pkl"
    once "${FEATURES}_train/store.json" "${LAUNCH[@]}" parse_conceptual.py --data_root "$CC" --split train \
        --clip_model_type "$CLIP" --out_path "${FEATURES}_train" --feature_store
}
train() {
    resume_from "$RUN_DIR/${ROW}_resume.pt"
    outputs "$LAST"
    always "${LAUNCH[@]}" train.py --data "${FEATURES}_train" --out_dir "$RUN_DIR" --prefix "$ROW" --epochs "$EPOCHS" \
        --bs "$BATCH" --gpt2 "${GPT2:-gpt2}" "${TRAIN_FLAGS[@]}" "${OPTIM[@]}" "${RESUME[@]}"
}
score() {
    outputs "$RUN_DIR/metrics.json" "$RUN_DIR/captions_val.json"
    always "$PY" evaluate.py --checkpoint "$LAST" --features "${FEATURES}_val.pkl" \
        --annotations "$CC/Validation_GCC-1.1.0-Validation.tsv" --only_common_images \
        --out "$RUN_DIR/metrics.json" --save_captions "$RUN_DIR/captions_val.json"
}
stages "$@"
