# make demo  - the main job: a TP x EP decoder run across processes, checked against a reference
# make test  - the CPU test suite (GPU tests are marked and skipped without GPUs)
# make compile-check [TRITON=3.6.0] - every GPU kernel compiled for sm_90 by that Triton release,
#              no GPU needed (the device image has 3.6; `make test` uses the newest): a venv of
#              its own, .venv-triton-<version>
# Both create .venv on first use and install what they need (the CPU torch build without a GPU).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.llmcomm-installed
DEMO_ARGS ?=
TRITON  ?= 3.6.0
TVENV   := .venv-triton-$(TRITON)

.PHONY: demo test compile-check bench-allreduce bench-moe doctor clean

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

compile-check:
	test -x $(TVENV)/bin/python || $(PY) -m venv $(TVENV)
	$(TVENV)/bin/python -m pip install -q triton==$(TRITON) pytest numpy torch==2.13.0
	PYTHONPATH=src:. $(TVENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_kernel_compile.py

doctor: $(STAMP)
	$(BIN)/llmcomm doctor --tp 2 --pp 2

bench-allreduce: $(STAMP)
	$(BIN)/llmcomm bench allreduce

bench-moe: $(STAMP)
	$(BIN)/llmcomm bench moe

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info src/*.egg-info .pytest_cache
