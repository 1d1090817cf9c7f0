# make demo  - the main job: a TP x EP decoder run across processes, checked against a reference
# make test  - the CPU test suite (GPU tests are marked and skipped without GPUs)
# Both create .venv on first use and install what they need (the CPU torch build without a GPU).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.llmcomm-installed
DEMO_ARGS ?=

.PHONY: demo test bench-allreduce bench-moe doctor clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA and triton"; \
		$(BIN)/python -m pip install -q "torch>=2.9" triton; \
	else \
		echo "no GPU: installing the CPU build of torch"; \
		$(BIN)/python -m pip install -q torch==2.13.0 || \
		$(BIN)/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch; \
	fi
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmcomm demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

doctor: $(STAMP)
	$(BIN)/llmcomm doctor --tp 2 --pp 2

bench-allreduce: $(STAMP)
	$(BIN)/llmcomm bench allreduce

bench-moe: $(STAMP)
	$(BIN)/llmcomm bench moe

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
