#!/usr/bin/env bash
# The seeds' six-variant experiment at CPU scale: a Pythia-style GPT-NeoX (4 layers, d 128, vocabulary
# 4096) on WikiText-2 from ../shared/data, following its README's split convention (train on valid.txt;
# test.txt split by article into validation and test halves; NOT the standard WikiText-2 protocol).
# Scratch: 3 epochs. Finetune: 1 epoch, starting from the scratch conventional run's best checkpoint
# (a config alone has no pretrained weights; this plays the pretrained model's part).
# Usage, from the repository root in the project's venv: examples/pythia-wikitext2/run.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/pythia-wikitext2}"
data="${BWSKC_DATA:-$here/../../../shared/data/wikitext-2}"
common=(--model "$here/config.json" --data "$data" --out "$out" --mode all --batch-size 16 --seq-len 128
        --seed 0)
bwskc train "${common[@]}" --experiment scratch --epochs 3
bwskc train "${common[@]}" --experiment finetune --epochs 1 --resume
