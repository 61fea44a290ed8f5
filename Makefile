# Everything a newcomer needs: `make test` and `make demo` build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo notebooks clean
DEMO_DIR ?= workdir/demo
NOTEBOOK_DIR ?= workdir/notebooks

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m yuanjax.train --config=configs/demo.py --workdir=$(DEMO_DIR)

# Executes notebooks/*.py for real (minutes each on a CPU) and writes the paired .ipynb with
# their outputs; their training runs live in $(NOTEBOOK_DIR) (delete it to start over).
notebooks: $(STAMP)
	YUANJAX_NOTEBOOK_DIR=$(abspath $(NOTEBOOK_DIR)) $(BIN)/python -m yuanjax.analysis.notebook

clean:
	rm -rf $(VENV) build *.egg-info
