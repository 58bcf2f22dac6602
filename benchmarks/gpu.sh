#!/usr/bin/env bash
# The GPU figures in one prepared run: under 8 minutes on one H100/H200, every part under a timeout,
# partial results written as each part ends.
#
#   bash benchmarks/gpu.sh            # on the GPU machine; results under $OUT (default ./out/gpu)
#   bash benchmarks/gpu.sh --smoke    # CPU smoke: tiny shapes, no nvidia-smi, about 2 minutes
#   python benchmarks/gpu_results.py merge $OUT/gpu-results.md   # then: docs/benchmarks.md's "## GPU"
#
# Parts (each under `timeout`; the whole script keeps to TOTAL_S, default 470 s, by shrinking the
# later parts' limits to what is left):
#   1. benchmarks/kernels.py --no-e2e              -> $OUT/kernels.txt   (T_KERNELS, default 110 s)
#      coupling kernels' GB/s against the measured copy bandwidth, fp32/bf16/fp16, additive/affine,
#      forward/inverse/fused backward, beside the unfused torch sequence and torch.compile of it;
#   2. benchmarks/step_time.py --device cuda       -> $OUT/step_time.jsonl (T_STEP, default 180 s)
#      GPT-2 medium (24 layers, d 1024, 16 heads), batch 4, seq 1024, bf16 autocast: conventional,
#      reversible (Triton kernels, BWSKC_KERNELS=auto), per-block checkpointing, reversible with the
#      torch seam, each with torch.compile off, then on (inductor; fullgraph=True, falling back to
#      fullgraph=False with the failure line recorded); median step after warm-up, ratios to
#      conventional in the same process;
#   3. benchmarks/long_context.py --device cuda    -> $OUT/long_context.jsonl, long_context.png
#      (T_LONG, default 160 s): GPT-2 12 layers d 768, batch 1, seq 1024..32768, peak
#      torch.cuda.max_memory_allocated above the baseline per mode, a fresh process per point, the
#      longest sequence within an 8 GB budget per mode;
#      STEP_ARGS and LONG_ARGS are appended to parts 2 and 3 (e.g. LONG_ARGS="--attn-pdrop 0": attention
#      dropout off, so bwskc's modes keep the fused attention kernel; see long_context.py);
#   after each part: benchmarks/gpu_results.py render -> $OUT/gpu-results.md and gpu-results.json
#   (device name from nvidia-smi --query-gpu=name, date, versions, every part's exit status: 0 ok,
#   124 its timeout); the whole log is $OUT/gpu.log. Seven files in all (the device tool returns 8).
#
# Nothing is installed: the machine's python3 (override with PYTHON) must hold torch, triton,
# transformers and matplotlib. bwskc is imported from this checkout: where `import bwskc.kernels` fails
# (the checkout is not pip-installed there), a tree of symbolic links under /tmp maps bwskc.passes,
# bwskc.kernels and bwskc.grammar to passes/, kernels/ and grammar/ as pyproject's package-dir does.
# lark and interegular (bwskc.text's parser; pure Python, absent from the GPU image) are linked in from
# .venv/lib/python3.*/site-packages/ or .pydeps/ where the machine's python lacks them: with the device
# tool, name .venv/lib/python3.11/site-packages/lark and .../interegular in `carry`:
#   run(command="bash benchmarks/gpu.sh", timeout_s=540,
#       carry=[".venv/lib/python3.11/site-packages/lark", ".venv/lib/python3.11/site-packages/interegular"])
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-$ROOT/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
T_KERNELS=${T_KERNELS:-110}
T_STEP=${T_STEP:-180}
T_LONG=${T_LONG:-160}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

log() { echo "[gpu.sh $(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }
left() { echo $((TOTAL_S - ($(date +%s) - START))); }
limit() {  # the smaller of a part's own limit and what is left of TOTAL_S, less 15 s for the render
  local want=$1 rest
  rest=$(($(left) - 15))
  [ "$rest" -lt "$want" ] && want=$rest
  [ "$want" -lt 1 ] && want=1
  echo "$want"
}

main() {
# what the machine's python lacks: bwskc from this checkout (package-dir mapping) and lark/interegular
# (pure Python; the GPU image has neither: carry .venv/lib/python3.*/site-packages/{lark,interegular})
SHIM=/tmp/bwskc-shim-$$
mkdir -p "$SHIM"
if ! (cd /tmp && "$PY" -c "import bwskc.kernels.dispatch, bwskc.passes") 2>/dev/null; then
  mkdir -p "$SHIM/bwskc"
  for f in "$ROOT"/bwskc/*; do ln -sf "$f" "$SHIM/bwskc/"; done
  for p in passes kernels grammar; do ln -sfn "$ROOT/$p" "$SHIM/bwskc/$p"; done
  log "bwskc is not installed for $PY: importing it through the link tree $SHIM"
fi
for mod in lark interegular; do
  (cd /tmp && "$PY" -c "import $mod") 2>/dev/null && continue
  found=""
  for d in "$ROOT"/.venv/lib/python3*/site-packages/"$mod" "$ROOT"/.pydeps/"$mod"; do
    [ -d "$d" ] && { ln -sfn "$d" "$SHIM/$mod"; found=$d; break; }
  done
  [ -n "$found" ] && log "$mod: not installed for $PY, using $found" || log "WARNING: $mod is missing for $PY"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

DATE=$(date -u +"%Y-%m-%d %H:%M UTC")
if [ "$SMOKE" = 1 ]; then
  NAME="cpu (smoke: tiny shapes, no GPU)"
  DEVICE=cpu
else
  NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  [ -n "$NAME" ] || NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
  [ -n "$NAME" ] || NAME="unknown (nvidia-smi and torch.cuda gave no name)"
  DEVICE=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
fi
VERSIONS=$("$PY" -c "
import platform, torch
try:
    import triton; t = triton.__version__
except Exception as e:
    t = 'none'
import transformers
print(f'python {platform.python_version()}, torch {torch.__version__}, triton {t}, transformers {transformers.__version__}')
" 2>&1 | tail -n 1)
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
log "device: $NAME; $VERSIONS; checkout $REV; results in $OUT"
STATUS=""

render() {
  "$PY" benchmarks/gpu_results.py render --dir "$OUT" --device-name "$NAME" --date "$DATE" \
    --versions "$VERSIONS" --revision "$REV" --status "$STATUS" --wall-s "$(($(date +%s) - START))" \
    $([ "$SMOKE" = 1 ] && echo --smoke) >/dev/null || log "render failed"
}

run_part() {  # name, limit, command...
  local name=$1 lim=$2 rc
  shift 2
  log "$name: start (limit ${lim}s): $*"
  timeout -k 10 "$lim" "$@"
  rc=$?
  [ "$rc" = 124 ] && log "$name: TIMEOUT after ${lim}s (partial results kept)"
  log "$name: exit $rc"
  STATUS="${STATUS:+$STATUS,}$name=$rc"
  render
}

# 1. kernel bandwidth (CPU: the interpreter smoke of every kernel, checked against the reference)
run_part kernels "$(limit "$T_KERNELS")" bash -c "set -o pipefail; '$PY' benchmarks/kernels.py --no-e2e 2>&1 | tee '$OUT/kernels.txt'"

# 2. step time, modes x torch.compile
if [ "$SMOKE" = 1 ]; then
  run_part step_time "$(limit "$T_STEP")" "$PY" benchmarks/step_time.py --smoke --modes conventional,reversible \
    --jsonl "$OUT/step_time.jsonl" ${STEP_ARGS:-}
else
  L=$(limit "$T_STEP")
  run_part step_time "$L" "$PY" benchmarks/step_time.py --device cuda \
    --modes conventional,reversible,checkpoint,reversible-torch --compile off,on --warmup 3 --repeats 10 \
    --deadline $((L * 2 / 3)) --jsonl "$OUT/step_time.jsonl" ${STEP_ARGS:-}
fi

# 3. long-context peak
if [ "$SMOKE" = 1 ]; then
  run_part long_context "$(limit "$T_LONG")" "$PY" benchmarks/long_context.py --smoke \
    --jsonl "$OUT/long_context.jsonl" --plot "$OUT/long_context.png" ${LONG_ARGS:-}
else
  L=$(limit "$T_LONG")
  run_part long_context "$L" "$PY" benchmarks/long_context.py --device cuda \
    --seqs 1024,2048,4096,8192,16384,32768 --budget-gb 8 --timeout 60 --deadline $((L - 45)) \
    --jsonl "$OUT/long_context.jsonl" --plot "$OUT/long_context.png" ${LONG_ARGS:-}
fi

log "done: $STATUS; $(($(date +%s) - START)) s in all"
log "results: $OUT/gpu-results.md (merge into docs/benchmarks.md: python benchmarks/gpu_results.py merge $OUT/gpu-results.md)"
[ -f "$OUT/gpu-results.md" ] && cat "$OUT/gpu-results.md"
}

main 2>&1 | tee "$OUT/gpu.log"
exit 0
