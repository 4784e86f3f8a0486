# The two README commands: `make demo` and `make test`. Both set everything up first.
# `make tensorboard` opens the runs (LOGDIR=runs by default) without activating anything.
.PHONY: demo test test-fast lint bench gpu-check setup tensorboard clean

PY = $(shell scripts/bootstrap.sh)
LOGDIR ?= runs

setup:
	@scripts/bootstrap.sh >/dev/null

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

# Everything but the tests marked slow (inductor compiles, multi-process DDP).
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/blocks.py

tensorboard: setup
	$(PY) -m tensorboard.main --logdir $(LOGDIR)

clean:
	rm -rf .venv runs lightning_logs .pytest_cache .ruff_cache

# On a CUDA machine, with nothing but torch, triton and pytest installed (no setup, no
# network): the Triton path's tests and benchmark in one time budget (BUDGET seconds),
# writing gpu-check.md, .json and .jsonl. Fails at once, with a clear message, where no GPU
# is visible. GPU_PY: the Python with torch (.venv's if there is one).
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BUDGET ?= 360
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --budget $(BUDGET)
