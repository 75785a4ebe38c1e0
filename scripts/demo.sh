#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default model, offline, on CPU.
#   1. train the demo persona adapter with LLaMA-Factory (skipped when saves/demo is complete;
#      DEMO_RETRAIN=1 retrains),
#   2. export it: merged safetensors + q8_0 GGUF + Ollama Modelfile, verified numerically,
#   3. evaluate base vs adapter (offline task suite + style against the persona data),
#   4. serve base + adapter with the chat UI until Ctrl-C.
# PORT (default 8000) and HOST (default 127.0.0.1) choose where the server listens.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=.venv/bin
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
DEMO_DATA=configs/data/demo/huangdi_demo.json

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/4 default model"
$BIN/llm-models pull default

step "2/4 train the demo adapter (saves/demo)"
if [ "${DEMO_RETRAIN:-0}" = 1 ] || [ ! -f saves/demo/adapter_model.safetensors ]; then
  $BIN/llm-train configs/train/demo.yaml --overwrite
else
  echo "saves/demo is complete; DEMO_RETRAIN=1 make demo retrains it"
fi

step "3/4 export (saves/demo-merged) and evaluate (artifacts/eval/demo)"
$BIN/llm-export --adapter demo=saves/demo --out saves/demo-merged --gguf q8_0 --modelfile --overwrite
$BIN/llm-eval --adapter demo=saves/demo --suite demo --data "$DEMO_DATA" --limit 20 --max-tokens 64 \
  --out artifacts/eval/demo --overwrite

step "4/4 serve base + demo adapter with the chat UI"
cat <<MSG
  chat page:  http://$HOST:$PORT/ui/
  API:        curl http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
                -d '{"model": "demo", "messages": [{"role": "user", "content": "你是谁？"}]}'
  eval report: artifacts/eval/demo/report.html
  Ctrl-C stops the server.
MSG
exec $BIN/llm-serve --adapter demo=saves/demo --ui --host "$HOST" --port "$PORT"
