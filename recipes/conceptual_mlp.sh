#!/usr/bin/env bash
# Paper Table 1, Conceptual Captions validation (about 12.5K images that still download, used as test):
# MLP mapper + GPT-2 fine-tuning (K = 10, CLIP ViT-B/32, 156M parameters).
# Paper: ROUGE-L 26.71, CIDEr 87.26, SPICE 18.5 (80 h on a GTX1080).
ROW=conceptual_mlp DEFAULT_CLIP=ViT-B/32
TRAIN_FLAGS=()
source "$(dirname "$0")/conceptual.sh"
