# The COCO job of a Table 1 row, sourced by the row's recipe (coco_*.sh), which sets ROW, DEFAULT_CLIP
# and TRAIN_FLAGS. Features of Karpathy's train (+ restval), val and test splits, each made once;
# training keeps the epoch with the best val CIDEr ({ROW}_best, as the authors reported their best
# epoch); that checkpoint is scored on test.
# The environment overrides the paper's settings: COCO RUNS CLIP TAG GPT2 EPOCHS BS VAL_CAPTIONS PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
COCO=${COCO:-data/coco}
OUT=${RUNS:-runs}/$ROW
CLIP=${CLIP:-$DEFAULT_CLIP}
FEATURES=$COCO/oscar_split_${TAG:-${DEFAULT_CLIP//\//_}}

for split in train val test; do
    [ -e "${FEATURES}_$split.pkl" ] || $PY parse_coco.py --annotations "$COCO/dataset_coco.json" \
        --images_root "$COCO" --split $split --clip_model_type "$CLIP" --out_path "${FEATURES}_$split.pkl" \
        --references_path "$COCO/karpathy_${split}_references.json"
done
$PY train.py --data "${FEATURES}_train.pkl" --val_data "${FEATURES}_val.pkl" --val_captions "${VAL_CAPTIONS:-1000}" \
    --out_dir "$OUT" --prefix "$ROW" --epochs "${EPOCHS:-10}" --bs "${BS:-40}" --gpt2 "${GPT2:-gpt2}" "${TRAIN_FLAGS[@]}"
$PY evaluate.py --checkpoint "$OUT/${ROW}_best.safetensors" --features "${FEATURES}_test.pkl" \
    --annotations "$COCO/dataset_coco.json" --split test --out "$OUT/metrics.json" --save_captions "$OUT/captions_test.json"
