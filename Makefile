# simcal: two commands do all the set-up on a fresh machine.
#   make repro   the main job: the paper reproduction on the embedded dataset (tables and figures in figures/)
#   make test    the whole test suite (what CI runs)
SHELL := /bin/bash
VENV  := .venv
BIN   := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export MPLBACKEND ?= Agg

.PHONY: install repro test test-nbs test-py check-sync bench clean

install: $(STAMP)

# a virtual environment inside the checkout, with the package and its dev extras (pins live in settings.ini)
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (simcal)" >/dev/null
	touch $@

repro: $(STAMP)
	$(BIN)/simcal repro

# notebooks are the source: cleaning and exporting them must not change the repository
check-sync: $(STAMP)
	bash .ci/unchanged nbdev_clean
	bash .ci/unchanged nbdev_export

test-nbs: $(STAMP)
	nbdev_test --n_workers 2 --do_print --timing

test-py: $(STAMP)
	$(BIN)/python -m pytest -q tests

test: check-sync test-nbs test-py

bench: $(STAMP)
	$(BIN)/python tests/bench_evaluator.py

clean:
	rm -rf $(VENV) build dist *.egg-info
