# The two README commands: `make demo` and `make test`. Both set everything up first.
.PHONY: demo test lint bench setup clean

PY = $(shell scripts/bootstrap.sh)

setup:
	@scripts/bootstrap.sh >/dev/null

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/blocks.py

clean:
	rm -rf .venv runs lightning_logs .pytest_cache .ruff_cache
