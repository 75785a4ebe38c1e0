# llm-serve: the commands a newcomer can guess. Everything runs inside ./.venv, which `setup`
# creates from configs/requirements/main.lock (reused while the lock is unchanged).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format bench bench-train vllm-env lock clean

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

# Re-resolve configs/requirements/main.in into configs/requirements/main.lock (needs the package registry).
lock:
	@bash scripts/lock.sh

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info artifacts
