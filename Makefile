# The two set-up commands of the README: `make demo` and `make test` (every test, what CI
# runs, on as many pytest-xdist workers as cores); `make check` is the fast tier for the edit
# loop: the tests not marked `slow`, on as many workers as cores too, with CI's number of
# hypothesis examples (tests/conftest.py's profiles).
# Each creates .venv on first use and installs the package with torch pinned
# (constraints.txt: the CPU build of torch 2.13.0; anything else pulls CUDA wheels) and
# its `dev` extra, which includes the `experiments` extra that the command line needs.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchnorm demo

test: $(STAMP)
	$(PY) -m pytest -n auto

check: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -n auto -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/batchnorm bench kernels --out docs/bench --markdown docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
