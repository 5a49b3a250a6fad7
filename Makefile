# `make demo` and `make test` each build (or reuse) .venv and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 is the one pair that serves the whole stack:
# mosaicml-streaming imports torchvision, which must match the installed torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH_PINS) -e '.[deepspeed,fp8,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m scd_train.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs demo_out
