#!/usr/bin/env bash
# Paper Table 1 ablation, COCO Karpathy test: transformer mapper + GPT-2 fine-tuning (K = 10, CLIP RN50x4,
# 167M parameters). Paper: B@4 32.22, METEOR 27.79, CIDEr 109.83, SPICE 20.63 (7 h on a GTX1080).
K=${K:-10}
ROW=coco_transformer_tuned_k$K DEFAULT_CLIP=RN50x4
TRAIN_FLAGS=(--mapping_type transformer --num_layers 8 --prefix_length "$K" --prefix_length_clip "$K" --normalize_prefix)
source "$(dirname "$0")/coco.sh"
