#!/usr/bin/env bash
# Run the whole test suite (what `make test` and .ci/run call), after `make setup`.
# Installs Debian's chromium for the browser tests when it is missing and we may use apt-get,
# installs the PPO stage's trl (seconds; DeepSpeed tests run only after `make deepspeed-env`),
# bootstraps the default model once, then runs pytest with any extra arguments passed through.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-browser.sh || echo "test: chromium could not be installed; browser tests will be skipped"
bash scripts/setup-extra.sh ppo || echo "test: trl 0.9.6 (make ppo-env) could not be installed; the PPO test will be skipped"
.venv/bin/llm-models pull default
exec .venv/bin/python -m pytest tests "$@"
