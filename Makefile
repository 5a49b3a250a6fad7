# `make demo` and `make test` each build (or reuse) .venv and then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 is the one pair that serves the whole stack:
# mosaicml-streaming imports torchvision, which must match the installed torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean gpu-wheels gpu-suite

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

# -- the GPU suite (bench/gpu_suite.py, docs/gpu.md) ---------------------------------------------------
# A GPU machine that runs its own Python 3.12 + torch and reaches no package index gets the few
# packages its image lacks as wheels: make gpu-wheels here, carry .whl/, then make gpu-suite there.
# torchao 0.18.0 is the release built against torch 2.11 (the GPU image's torch).
GPU_WHEELS := omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 torchao==0.18.0
GPU_WHEEL_DIR := .whl
GPU_WHEEL_LIMIT_KB := 61440
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
# e.g. PIP_DOWNLOAD_FLAGS="--no-index --find-links /path/to/wheels" to fill .whl/ from local copies
PIP_DOWNLOAD_FLAGS ?=
GPU_SITE ?= /tmp/site
GPU_SUITE_ARGS ?=

gpu-wheels:
	rm -rf $(GPU_WHEEL_DIR) && mkdir -p $(GPU_WHEEL_DIR)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) $(PIP_DOWNLOAD_FLAGS) \
		-d $(GPU_WHEEL_DIR) $(GPU_WHEELS)
	@ls -l $(GPU_WHEEL_DIR)
	@size=$$(du -sk $(GPU_WHEEL_DIR) | cut -f1); echo "$(GPU_WHEEL_DIR): $$size KiB"; \
		test $$size -le $(GPU_WHEEL_LIMIT_KB) || { echo "$(GPU_WHEEL_DIR) exceeds $(GPU_WHEEL_LIMIT_KB) KiB"; exit 1; }

gpu-suite:
	test -n "$$(ls $(GPU_WHEEL_DIR)/*.whl 2>/dev/null)" || { echo "no wheels in $(GPU_WHEEL_DIR): run make gpu-wheels first"; exit 2; }
	$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target $(GPU_SITE) $(GPU_WHEEL_DIR)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
		$(PYTHON) bench/gpu_suite.py $(GPU_SUITE_ARGS)
