# The stages every recipe shares, sourced by the recipes from the repository root. A recipe defines a
# function per stage (features, train, score), names the data it needs, and ends with `stages "$@"`:
#
#   recipes/coco_mlp.sh               # every stage, in order
#   recipes/coco_mlp.sh train score   # these stages only
#   recipes/coco_mlp.sh plan          # print each stage's commands and outputs, run nothing
#
# Inside a stage, `once OUTPUT COMMAND...` runs COMMAND unless OUTPUT exists (features: made once, reused by
# every row), and `outputs PATH...; always COMMAND...` runs COMMAND, which leaves PATH... when complete.
# `make reproduce` reads the plan: it runs the stages one by one, skipping those whose outputs are complete
# for the same commands (clipcap/reproduce.py).
# The environment: PY (the interpreter, .venv/bin/python by default) and GPUS (processes per command under
# torchrun, for feature extraction and training; default: every GPU torch sees, 1 without a GPU).
PY=${PY:-.venv/bin/python}
RECIPE=$(basename "$0" .sh)
PLAN=
NEEDS=()
OUTPUTS=()
if [ -z "${GPUS:-}" ]; then
    GPUS=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPUS=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')
    fi
fi
if [ "$GPUS" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
else
    LAUNCH=("$PY")
fi

split_batch() {  # BATCH: the per-process share of the global batch $1 (the paper's 40)
    if (( $1 % GPUS )); then
        echo "error: BS=$1 (the global batch) does not split evenly over GPUS=$GPUS processes; set GPUS or BS" >&2
        exit 2
    fi
    BATCH=$(( $1 / GPUS ))
}

optimizer_flags() {  # OPTIM: --lr LR and --warmup WARMUP when set; train.py's defaults are the paper's (2e-5, 5,000)
    OPTIM=()
    if [ -n "${LR:-}" ]; then OPTIM+=(--lr "$LR"); fi
    if [ -n "${WARMUP:-}" ]; then OPTIM+=(--warmup "$WARMUP"); fi
}

needs() {  # needs KIND PATH...: input data (KIND coco, nocaps or conceptual) or another row's model (KIND model)
    local kind=$1 path
    shift
    for path in "$@"; do NEEDS+=("$kind" "$path"); done
}

outputs() {  # outputs PATH...: what the next `always` command leaves when it completes
    OUTPUTS=("$@")
}

_step() {  # print the step in plan mode; say whether to run it
    if [ -n "$PLAN" ]; then
        printf 'step\t%s\t%s\n' "$STAGE" "$(printf '%q ' "$@")"
        if (( ${#OUTPUTS[@]} )); then printf 'output\t%s\n' "${OUTPUTS[@]}"; fi
        OUTPUTS=()
        return 1
    fi
    OUTPUTS=()
}

once() {  # once OUTPUT COMMAND...
    local out=$1
    shift
    OUTPUTS=("$out")
    if _step "$@" && [ ! -e "$out" ]; then "$@"; fi
}

always() {  # always COMMAND...
    if _step "$@"; then "$@"; fi
}

resume_from() {  # RESUME: --resume FOLDER when FOLDER holds a resumable run (never in the plan: it is progress)
    RESUME=()
    if [ -z "$PLAN" ] && [ -e "$1" ]; then RESUME=(--resume "$(dirname "$1")"); fi
}

stages() {  # stages [plan | STAGE...]: $STAGES in order, or the named ones, or the plan
    local all=($STAGES) i
    if [ "${1:-}" = plan ]; then
        PLAN=1
        printf 'row\t%s\t%s\t%s\n' "$RECIPE" "$RUN_DIR" "${PREFIX:-}"
        for ((i = 0; i < ${#NEEDS[@]}; i += 2)); do printf 'needs\t%s\t%s\n' "${NEEDS[i]}" "${NEEDS[i + 1]}"; done
        for STAGE in "${all[@]}"; do "$STAGE"; done
        return
    fi
    for STAGE in "$@"; do
        if [[ " ${all[*]} " != *" $STAGE "* ]]; then
            echo "error: $RECIPE has no stage '$STAGE' (its stages: ${all[*]}; or plan)" >&2
            exit 2
        fi
    done
    for ((i = 0; $# == 0 && i < ${#NEEDS[@]}; i += 2)); do  # a whole run checks its inputs first
        if [ ! -e "${NEEDS[i + 1]}" ]; then
            if [ "${NEEDS[i]}" = model ]; then
                echo "error: ${NEEDS[i + 1]} is missing: train that model first (make reproduce ROWS=$RECIPE runs it)" >&2
            else
                echo "error: ${NEEDS[i + 1]} is missing: fetch it with 'make data ROWS=$RECIPE' (data/README.md)" >&2
            fi
            exit 2
        fi
    done
    for STAGE in "${@:-${all[@]}}"; do "$STAGE"; done
}
