#!/usr/bin/env bash
# The seed Switch-Base-8's six-variant experiment at CPU scale: a Switch Transformers config with the
# seed's architecture (8 experts, top-1 routing, a sparse MLP every other layer, router z-loss and
# load-balancing loss at the seed's coefficients) scaled to run here: 4+4 layers, d 64, vocabulary 4096.
# Task: seq2seq LM on WikiText-2 from ../shared/data, following its README's split convention (train on
# valid.txt; test.txt split by article into validation and test halves; NOT the standard WikiText-2
# protocol): the encoder reads a block of 64 tokens, the decoder, teacher-forced, predicts the 64 that
# follow it (perplexity over decoder tokens, the prototype's convention).
# Scratch: 2 epochs. Finetune: 1 epoch, starting from the scratch conventional run's best checkpoint
# (a config alone has no pretrained weights; this plays the pretrained model's part).
# Usage, from the repository root in the project's venv: examples/switch-wikitext2/run.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/switch-wikitext2}"
data="${BWSKC_DATA:-$here/../../../shared/data/wikitext-2}"
common=(--model "$here/config.json" --data "$data" --out "$out" --mode all --batch-size 16 --seq-len 64
        --seed 0)
bwskc train "${common[@]}" --experiment scratch --epochs 2
bwskc train "${common[@]}" --experiment finetune --epochs 1 --resume
