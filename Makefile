# Every target installs what it needs into .venv first (pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test test-slow test-all bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train a small TiTok on CPU from the demo shards (built on first use) and report PSNR before
# and after training; writes outputs/demo/summary.json and outputs/demo/reconstructions/*.png.
demo: install
	$(BIN)/python -m tokenizers_vis.data.demo data/demo
	rm -rf outputs/demo
	$(BIN)/python train.py experiment=demo hydra.run.dir=outputs/demo
	$(BIN)/python -m tokenizers_vis.training.report outputs/demo

# The fast suite (the README's test command).
test: install
	$(BIN)/python -m pytest -q

# Longer tests: subprocess training runs, DDP with 2 CPU processes.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

bench: install
	$(BIN)/python benchmarks/train_throughput.py --sweep cpu
