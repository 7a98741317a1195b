# simcal: two commands do all the set-up on a fresh machine.
#   make repro   the main job: the paper reproduction on the embedded dataset (tables and figures in figures/)
#   make test    the whole test suite (what CI runs)
SHELL := /bin/bash
VENV  := .venv
BIN   := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
JUPYTER_CFG := $(VENV)/etc/jupyter/jupyter_server_config.py
export PATH := $(BIN):$(PATH)

.PHONY: install lab readme repro compare test test-nbs test-py check-sync bench bench-repro gpu-check clean

install: $(STAMP)

# a virtual environment inside the checkout, with the package and its dev extras (pins live in settings.ini)
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# the kernel's display name is the one nbdev_clean writes into every notebook, so opening one changes nothing
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name python3 >/dev/null
	@# Jupyter started from this environment cleans notebooks on save as nbdev_clean does (settings.ini: jupyter_hooks)
	@mkdir -p $(dir $(JUPYTER_CFG))
	@printf '%s\n' "def nbdev_clean_jupyter(**kwargs):" "    try: from nbdev.clean import clean_jupyter" \
	  "    except ModuleNotFoundError: return" "    clean_jupyter(**kwargs)" "" \
	  "c.ContentsManager.pre_save_hook = nbdev_clean_jupyter" > $(JUPYTER_CFG)
	touch $@

repro: $(STAMP)
	$(BIN)/simcal repro

# the comparison of long-tail classifier fixes (SimCal, NorCal, logit adjustment, tau-norm, cRT, LWS, BAGS) on the
# demo detector: not part of `make repro`; reuses its steps in runs/, writes figures/longtail_*
compare: $(STAMP)
	$(BIN)/simcal repro --only longtail.ipynb

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

# the main job's time per step and per notebook, as a table (runs `simcal repro` into a fresh work folder)
bench-repro: $(STAMP)
	$(BIN)/python tests/bench_repro.py

# on a CUDA machine: paper-preset training steps (NCCL, AMP), a calibration step, dual-head inference
gpu-check: $(STAMP)
	$(BIN)/python tests/gpu_check.py

clean:
	rm -rf $(VENV) build dist *.egg-info

# README.md is rendered from the start page nbs/index.ipynb
readme: $(STAMP)
	$(BIN)/python tests/render_readme.py

# JupyterLab on the notebooks, from this environment (its kernel and save hook)
lab: $(STAMP)
	$(BIN)/jupyter lab nbs
