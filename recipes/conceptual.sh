# The Conceptual Captions job of a Table 1 row, sourced by the row's recipe (conceptual_*.sh), which sets
# ROW, DEFAULT_CLIP and TRAIN_FLAGS. Needs $CC/{train,val}/ from img2dataset and
# $CC/Validation_GCC-1.1.0-Validation.tsv (see data/README.md). The validation set is the test set here,
# so no epoch is chosen by it: the last epoch is scored. Validation images that no longer download have
# no features, hence --only_common_images.
# The environment overrides the paper's settings: CC RUNS CLIP TAG GPT2 EPOCHS BS PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
CC=${CC:-data/conceptual}
OUT=${RUNS:-runs}/$ROW
CLIP=${CLIP:-$DEFAULT_CLIP}
EPOCHS=${EPOCHS:-10}
FEATURES=$CC/conceptual_clip_${TAG:-${DEFAULT_CLIP//\//_}}

[ -e "${FEATURES}_val.pkl" ] || $PY parse_conceptual.py --data_root "$CC" --split val --clip_model_type "$CLIP" \
    --out_path "${FEATURES}_val.pkl"
[ -e "${FEATURES}_train/store.json" ] || $PY parse_conceptual.py --data_root "$CC" --split train \
    --clip_model_type "$CLIP" --out_path "${FEATURES}_train" --feature_store
$PY train.py --data "${FEATURES}_train" --out_dir "$OUT" --prefix "$ROW" --epochs "$EPOCHS" --bs "${BS:-40}" \
    --gpt2 "${GPT2:-gpt2}" "${TRAIN_FLAGS[@]}"
$PY evaluate.py --checkpoint "$OUT/$ROW-$(printf %03d $((EPOCHS - 1))).safetensors" --features "${FEATURES}_val.pkl" \
    --annotations "$CC/Validation_GCC-1.1.0-Validation.tsv" --only_common_images \
    --out "$OUT/metrics.json" --save_captions "$OUT/captions_val.json"
