#!/usr/bin/env bash
# Install an optional extra of the main environment into its own directory inside the venv:
#   scripts/setup-extra.sh ppo        # trl 0.9.6 for llm-train's PPO stage (`make ppo-env`; seconds)
#   scripts/setup-extra.sh deepspeed  # DeepSpeed for `llm-train --deepspeed` (`make deepspeed-env`)
# Pins come from configs/requirements/<name>.lock and go, without dependencies, into
# .venv/llm-serve-extras/<name>/, not into site-packages: only the training worker that needs them puts
# that directory on sys.path (train/ppo_compat.py, train/deepspeed_env.py), so every other process keeps
# the main lock's packages (trl 0.24.0, no DeepSpeed). Reused while the lock is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: scripts/setup-extra.sh ppo|deepspeed}
VENV=${VENV:-.venv}
LOCK=configs/requirements/$name.lock
[ -f "$LOCK" ] || { echo "setup-extra: no $LOCK" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || { echo "setup-extra: $VENV missing; run make setup first" >&2; exit 2; }
want=$(sha256sum "$LOCK" | cut -c1-16)
dest="$VENV/llm-serve-extras/$name"
if [ "$(cat "$dest/.lock-hash" 2>/dev/null)" = "$want" ]; then
  echo "setup-extra: $dest matches $LOCK"
  exit 0
fi
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$(dirname "$dest")"
"$VENV/bin/python" -m pip install -q --no-deps --no-compile --target "$tmp" -r "$LOCK"
echo "$want" > "$tmp/.lock-hash"
rm -rf "$dest"
mv "$tmp" "$dest"
echo "setup-extra: installed $LOCK into $dest"
