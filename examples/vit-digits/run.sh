#!/usr/bin/env bash
# Image classification's six variants at CPU scale: a ViT (4 layers, d 64, 16x16 images in 4x4 patches)
# on real handwritten digits, the image folder ../shared/data/digits (1,437 train, 180 valid, 180 test;
# 10 classes; its README). Images resized to 18x18, randomly cropped to 16x16 in training (no flip: a
# mirrored digit is another glyph), centre-cropped in evaluation. Scratch: 10 epochs; finetune: 3 epochs
# from the scratch conventional run's best checkpoint (a config alone has no pretrained weights).
# Usage, from the repository root in the project's venv: examples/vit-digits/run.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/vit-digits}"
data="${BWSKC_DIGITS:-$here/../../../shared/data/digits}"
common=(--model "$here/config.json" --data "$data" --out "$out" --mode all --batch-size 32 --augment crop
        --lr 1e-3 --seed 0)
bwskc train "${common[@]}" --experiment scratch --epochs 10
bwskc train "${common[@]}" --experiment finetune --epochs 3 --resume
