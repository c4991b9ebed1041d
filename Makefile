# Two entry points: `make quickstart` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test lint bench clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the local CPU build: otherwise pip pulls several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# constraints.txt: the exact versions the test suite passed with (`make lock` refreshes it).
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/medtune quickstart --out runs/quickstart

# Two workers for the two cores of the CI machine (one torch thread each: tests/conftest.py); whole
# files per worker, since some files check a matrix their own tests fill in.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/eval_speed.py

# Refresh constraints.txt: install the newest versions pyproject.toml allows into a scratch venv and
# freeze them (torch and medtune itself excluded). Then run `make test` before committing it.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q -e '.[dev]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v -i '^torch==' > constraints.txt
	rm -rf .venv-lock
	@echo "constraints.txt refreshed; run make test (rm .venv/.installed first) before committing it"

clean:
	rm -rf runs .pytest_cache
