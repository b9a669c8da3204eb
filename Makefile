# Two commands on a fresh machine: `make demo` and `make test`. Both build the venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

DEMO_OUT ?= demo-out
demo: venv
	$(BIN)/kneescreen demo --out $(DEMO_OUT)

# Both print the 15 slowest tests and run TEST_WORKERS pytest-xdist workers (2: the CI machine's
# cores; 0: one process; the units of work: tests/conftest.py, pytest_xdist_make_scheduler).
# test-fast: no Ray (a test that starts Ray without the `ray` marker fails), no slow tests.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS)
test: venv
	$(PYTEST)

test-fast: venv
	$(PYTEST) -m "not slow and not ray"

bench: venv
	$(BIN)/python bench/synth_rate.py --n 1000 --size 384

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(DEMO_OUT)
