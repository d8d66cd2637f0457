#!/usr/bin/env bash
# Paper Table 1, Conceptual Captions validation: transformer mapper, GPT-2 frozen (8 layers, CLIP ViT-B/32, 43M
# parameters). Paper: ROUGE-L 25.12, CIDEr 71.82, SPICE 16.07 (72 h on a GTX1080). K=40 gives the original
# README's command (prefix length 40).
K=${K:-10}
ROW=conceptual_transformer_k$K DEFAULT_CLIP=ViT-B/32
TRAIN_FLAGS=(--only_prefix --mapping_type transformer --num_layers 8 --prefix_length "$K" --prefix_length_clip "$K")
source "$(dirname "$0")/conceptual.sh"
