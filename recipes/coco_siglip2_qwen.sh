#!/usr/bin/env bash
# Beyond the paper: ClipCap with a current image tower and language model, on COCO as the Table 1 rows run (Karpathy
# train + restval, the epoch of best val CIDEr scored on test). No row of the paper: its numbers exist only once
# someone runs it on a GPU, and the README says so.
#
#   image tower     SigLIP 2 So400m/14, 224 px (google/siglip2-so400m-patch14-224): 1152-d pooled embeddings
#   language model  Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B: 896 wide, 24 layers), its weights frozen in bf16, LoRA of
#                   rank 16 on its attention and MLP projections (about 9M weights)
#   mapper          MLP, K = 10 (the paper's MLP row), on L2-normalised embeddings
#   schedule        4 epochs of batch 40, lr 1e-4, the paper's warm-up and linear decay
#
# Why, at the paper's budget (its MLP + GPT-2 row: 10 epochs in 7 h on one GTX1080, about 1e17 FLOPs; under an hour
# of a current GPU in bf16):
# - The image tower is where quality comes cheapest: features are extracted once, so a larger tower costs one pass
#   over COCO's 123K images (about 2e16 FLOPs for So400m at 224 px), not training time. SigLIP 2 is among the
#   strongest open image-text encoders of its size (Tschannen et al., 2025), and its fixed-resolution checkpoints
#   load as SigLIP, whose preprocessing this project reproduces (NaFlex checkpoints are refused).
# - The language model: one LoRA step costs about two forward passes of Qwen2.5-0.5B per token (about 2 GFLOPs, 2.5x
#   fine-tuning GPT-2's 0.75), so 4 epochs cost what the paper's 10 did. Frozen bf16 weights and adapters fit a
#   16 GB card at batch 40; fine-tuning all 494M weights with AdamW would take 8 GB for weights, gradients and
#   optimizer state alone. Qwen2.5-0.5B is the strongest decoder of that size we know of (18T pre-training tokens).
# - LoRA rather than prefix-only: the paper's rows that tune GPT-2 beat its frozen MLP row by 16 CIDEr; adapters tune
#   the LM at 2% of its weights, and the checkpoint holds the mapper and the adapters, not the LM.
# - lr 1e-4 rather than 2e-5: adapters start at zero and are trained at higher rates than whole models (the LoRA
#   paper's GPT-2 runs used 2e-4); the mapper, trained from scratch either way, takes the same rate.
# - Normalised embeddings: SigLIP's training compares directions only; the mapper then sees inputs of one length.
#
# Flags from the any-LM work (train.py --lm, alias --gpt2; --lm_dtype; --lora_rank). The environment overrides:
# COCO RUNS EPOCHS BS VAL_CAPTIONS LORA_RANK LR PY GPUS, and the pair itself: TOWER (its features' file name:
# TOWER_TAG) and LM. The Table 1 rows' CLIP, TAG and GPT2 do not reach it: `make reproduce GPT2=gpt2-medium` changes
# the paper's rows, not this pair.
ROW=coco_siglip2_qwen DEFAULT_CLIP=google/siglip2-so400m-patch14-224
CLIP=${TOWER:-$DEFAULT_CLIP}
TAG=${TOWER_TAG:-${DEFAULT_CLIP//\//_}}
GPT2=${LM:-Qwen/Qwen2.5-0.5B}
EPOCHS=${EPOCHS:-4}
LR=${LR:-1e-4}  # coco.sh passes it on
TRAIN_FLAGS=(--lm_dtype bfloat16 --lora_rank "${LORA_RANK:-16}" --normalize_prefix)
source "$(dirname "$0")/coco.sh"
