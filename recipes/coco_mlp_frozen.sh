#!/usr/bin/env bash
# Paper Table 1 ablation, COCO Karpathy test: MLP mapper with GPT-2 frozen (K = 10, CLIP ViT-B/32, 32M parameters).
# Paper: B@4 27.39, METEOR 24.40, CIDEr 92.38, SPICE 18.04 (6 h on a GTX1080).
ROW=coco_mlp_frozen DEFAULT_CLIP=ViT-B/32
TRAIN_FLAGS=(--only_prefix)
source "$(dirname "$0")/coco.sh"
