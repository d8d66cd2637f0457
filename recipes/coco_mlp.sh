#!/usr/bin/env bash
# Paper Table 1, COCO Karpathy test: MLP mapper + GPT-2 fine-tuning (K = 10, CLIP ViT-B/32, 156M parameters).
# Paper: B@4 32.15, METEOR 27.10, CIDEr 108.35, SPICE 20.12 (7 h on a GTX1080).
ROW=coco_mlp DEFAULT_CLIP=ViT-B/32
TRAIN_FLAGS=()
source "$(dirname "$0")/coco.sh"
