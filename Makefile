# llm-serve: the commands a newcomer can guess. Everything runs inside ./.venv, which `setup`
# creates from configs/requirements/main.lock (reused while the lock is unchanged).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format bench bench-train vllm-env llama-cpp ppo-env deepspeed-env lock clean

setup:
	@bash scripts/setup-env.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m serve.bench.run $(BENCH_ARGS)

bench-train: setup
	$(PY) -m train.bench $(BENCH_ARGS)

vllm-env:
	@bash scripts/setup-vllm-env.sh

# llama.cpp's llama-server, the CPU peer for `make bench` and tests/export/test_llama_cpp.py: built once
# from the llama-cpp-python sdist on PyPI (~8 min on 2 cores), cached under $LLM_SERVE_HOME/llama.cpp/.
llama-cpp: setup
	$(PY) -m serve.llama_server build $(LLAMA_CPP_ARGS)

# Optional extras of .venv, each in its own directory that only the training worker reads:
# trl 0.9.6 for stage ppo (seconds), DeepSpeed for `llm-train --deepspeed` (about a minute).
ppo-env: setup
	@bash scripts/setup-extra.sh ppo

deepspeed-env: setup
	@bash scripts/setup-extra.sh deepspeed

# Re-resolve configs/requirements/main.in into configs/requirements/main.lock (needs the package registry).
lock:
	@bash scripts/lock.sh

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info artifacts
