#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of under 8 minutes on one GPU:
#   1. engine parity on CUDA: llm-serve's HF engine (native decoder and transformers' code) against
#      transformers' greedy generation, base and a LoRA adapter (scripts/gpu_parity.py)
#   2. bf16 LoRA training, a few steps of llm-train
#   3. QLoRA 4-bit training (needs bitsandbytes)
#   4. DeepSpeed ZeRO-2 on one GPU (needs `make deepspeed-env`)
#   5. the vLLM engine's tests (needs `make vllm-env`, which installs CUDA vLLM where nvidia-smi works)
#   6. `make bench` single/c16, quick: ours against llamafactory-cli api, and ours on vLLM
#
# Run on a GPU machine after `make setup` (and the optional extras above):
#   bash scripts/gpu-check.sh            # run everything; skipped steps say what they need
#   bash scripts/gpu-check.sh --dry-run  # print each step's command or why it would be skipped
# Results: a table on stdout and artifacts/gpu-check/summary.json; each step's log beside it.
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise. GPU_CHECK_BUDGET (seconds,
# default 470) caps the whole run: a step gets its own cap or what is left, whichever is less.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${GPU_CHECK_OUT:-artifacts/gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-470}
DATA=${LLAMAFACTORY_DEMO_DATA:-../shared/data/llamafactory-demo}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$(date +%s)
RESULTS=()

record() {  # name status seconds detail
  RESULTS+=("$1|$2|$3|$4")
  printf '%-16s %-6s %6ss  %s\n' "$1" "$2" "$3" "$4"
}

# step NAME CAP_SECONDS SKIP_REASON COMMAND...: run COMMAND (bash -c) under the cap and the budget left.
step() {
  local name=$1 cap=$2 skip=$3
  shift 3
  local cmd="$*"
  if [ -n "$skip" ]; then
    record "$name" skip 0 "$skip"
    return
  fi
  if [ "$DRY" = 1 ]; then
    record "$name" plan 0 "timeout ${cap}s: $cmd"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    record "$name" skip 0 "out of the ${BUDGET}s budget"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$cap" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    record "$name" pass "$secs" "$(tail -n 1 "$OUT/$name.log" | cut -c1-150)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" fail "$secs" "timed out after ${cap}s (log: $OUT/$name.log)"
  else
    record "$name" fail "$secs" "exit $rc: $(tail -n 1 "$OUT/$name.log" | cut -c1-120) (log: $OUT/$name.log)"
  fi
}

have_py_module() { [ -x "$PY" ] && "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

# --- what this machine has ---------------------------------------------------------------------
NO_GPU=""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  NO_GPU="no working nvidia-smi: not a CUDA machine"
elif [ ! -x "$PY" ]; then
  NO_GPU="$PY missing: run make setup first"
elif [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NO_GPU="torch in $PY does not see a CUDA device"
fi
if [ "$DRY" = 1 ] && [ -n "$NO_GPU" ]; then
  echo "gpu-check: dry run: $NO_GPU; the plan below is what a GPU machine would run"
  NO_GPU=""
elif [ -z "$NO_GPU" ] && [ "$DRY" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
NO_DATA=""
if [ -f "$DATA/dataset_info.json" ]; then
  DATA=$(cd "$DATA" && pwd)
else
  NO_DATA="LLaMA-Factory demo data not found at $DATA (set LLAMAFACTORY_DEMO_DATA)"
fi
NO_BNB=""
have_py_module bitsandbytes || NO_BNB="bitsandbytes is not installed in $PY (pip install bitsandbytes)"
NO_DS=""
[ -f .venv/llm-serve-extras/deepspeed/deepspeed/__init__.py ] || NO_DS="DeepSpeed extra missing: make deepspeed-env"
NO_VLLM=""
[ -x .venv-vllm/bin/python ] || NO_VLLM=".venv-vllm missing: make vllm-env"

first() { for s in "$@"; do [ -n "$s" ] && { echo "$s"; return; }; done; }
TRAIN="$BIN/llm-train configs/train/sft_lora.yaml dataset_dir=$DATA max_samples=64 max_steps=8 cutoff_len=256 bf16=true --no-progress --overwrite"

# --- the steps ---------------------------------------------------------------------------------
step parity 120 "$NO_GPU" "$PY scripts/gpu_parity.py"
step lora-bf16 100 "$(first "$NO_GPU" "$NO_DATA")" \
  "$TRAIN output_dir=$OUT/lora-bf16 && $PY -c \"import json; m=json.load(open('$OUT/lora-bf16/run_manifest.json')); assert m['hyperparameters']['bf16'] is True; print('final loss', m['metrics']['final_loss'], 'tokens/s', m['metrics'].get('tokens_per_second'))\""
step qlora-4bit 100 "$(first "$NO_GPU" "$NO_DATA" "$NO_BNB")" \
  "$TRAIN quantization_bit=4 output_dir=$OUT/qlora-4bit && $PY -c \"import json; m=json.load(open('$OUT/qlora-4bit/run_manifest.json')); assert m['hyperparameters']['quantization_bit'] == 4; print('final loss', m['metrics']['final_loss'])\""
step deepspeed-z2 120 "$(first "$NO_GPU" "$NO_DATA" "$NO_DS")" \
  "$TRAIN output_dir=$OUT/deepspeed-z2 --deepspeed z2 --nproc-per-node 1 && $PY -c \"import json; m=json.load(open('$OUT/deepspeed-z2/run_manifest.json')); assert m['parallel']['backend'] == 'deepspeed/nccl'; print('final loss', m['metrics']['final_loss'])\""
step vllm-engine 150 "$(first "$NO_GPU" "$NO_VLLM")" ".venv-vllm/bin/python -m pytest tests/vllm -q -x -p no:cacheprovider"
BENCH_TARGETS=ours,llamafactory
[ -z "$NO_VLLM" ] && BENCH_TARGETS=$BENCH_TARGETS,ours-vllm
step bench 180 "$NO_GPU" \
  "$PY -m serve.bench.run --quick --scenarios single,c16 --targets $BENCH_TARGETS --out-dir $OUT/bench"

# --- summary -----------------------------------------------------------------------------------
failed=0
{
  echo "{"
  echo "  \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false),"
  echo "  \"seconds\": $(($(date +%s) - START)),"
  echo "  \"steps\": ["
  n=${#RESULTS[@]}
  for i in "${!RESULTS[@]}"; do
    IFS='|' read -r name status secs detail <<<"${RESULTS[$i]}"
    [ "$status" = fail ] && failed=1
    sep=","
    [ "$i" = $((n - 1)) ] && sep=""
    detail=${detail//\\/\\\\}
    detail=${detail//\"/\\\"}
    echo "    {\"name\": \"$name\", \"status\": \"$status\", \"seconds\": $secs, \"detail\": \"$detail\"}$sep"
  done
  echo "  ]"
  echo "}"
} >"$OUT/summary.json"
echo "gpu-check: $(($(date +%s) - START)) s; summary in $OUT/summary.json"
exit $failed
