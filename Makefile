# Everything a newcomer needs: `make test` and `make demo` build .venv from nothing (with the
# optional tokamax kernels and lm-eval-harness, which the tests cover).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install venv-beam test check-format format demo notebooks clean
DEMO_DIR ?= workdir/demo
NOTEBOOK_DIR ?= workdir/notebooks
# One formatter for the tree: yapf, Google style, 2-space indent, 100 columns (setup.cfg [yapf]).
FORMATTED := yuanjax tests configs benchmarks launch

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,tokamax,eval]'
	touch $(STAMP)

install: $(STAMP)

# Apache Beam (yuanjax.data.beam_prepare) pins protobuf and pyarrow below the main stack's: it
# gets its own environment, with the repository on PYTHONPATH (constraints-beam.txt).
BEAM_VENV := .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed
$(BEAM_STAMP): constraints-beam.txt
	test -x $(BEAM_VENV)/bin/python || $(PY) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install -q --upgrade pip
	$(BEAM_VENV)/bin/python -m pip install -q -c constraints-beam.txt apache-beam sentencepiece \
	  grain ml-collections tqdm fsspec gcsfs zstandard pyarrow
	touch $(BEAM_STAMP)

venv-beam: $(BEAM_STAMP)

# pytest-xdist workers: one per core the tests may use, at most 4 (each holds its own JAX and
# compiled programs; past 4 the longest test files bound the time). TEST_WORKERS=0: no workers.
TEST_WORKERS ?= $(shell $(PY) -c 'import os; print(min(4, len(os.sched_getaffinity(0)) \
  if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))')
# loadfile: each test file runs whole on one worker, so a module-scoped fixture is built once.
# PYTEST_ARGS: more pytest flags, e.g. PYTEST_ARGS=--durations=15.
test: $(STAMP) $(BEAM_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests
	$(MAKE) check-format

check-format: $(STAMP)
	@$(BIN)/python -m yapf --diff --recursive --parallel $(FORMATTED) > .format.diff; \
	  rc=$$?; if [ $$rc -ne 0 ]; then head -50 .format.diff; \
	  echo "not formatted: run 'make format' (yapf; diff in .format.diff)"; exit 1; fi; rm -f .format.diff

format: $(STAMP)
	$(BIN)/python -m yapf --in-place --recursive --parallel $(FORMATTED)

demo: $(STAMP)
	$(BIN)/python -m yuanjax.train --config=configs/demo.py --workdir=$(DEMO_DIR)

# Executes notebooks/*.py for real (minutes each on a CPU) and writes the paired .ipynb with
# their outputs; their training runs live in $(NOTEBOOK_DIR) (delete it to start over).
notebooks: $(STAMP)
	YUANJAX_NOTEBOOK_DIR=$(abspath $(NOTEBOOK_DIR)) $(BIN)/python -m yuanjax.analysis.notebook

clean:
	rm -rf $(VENV) $(BEAM_VENV) build *.egg-info
