# Two commands for a fresh machine: `make demo` and `make test` (and the longer `make replicate`).
# Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test lint replicate venv clean

$(VENV)/.installed-base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-all: $(VENV)/.installed-base
	$(PIP) install -q -e '.[hf,st,dev]'
	touch $@

# The `tpu` extra's libtpu (TPU's compiler, ~680 MB), in a folder of its own rather than in the
# venv: the TPU compile tests get it through MLM_VS_CLM_LIBTPU_DIR, and the test of the message
# for a missing libtpu still runs. Keep the version equal to setup.py's `tpu` extra.
LIBTPU := .cache/libtpu
$(LIBTPU)/.installed: | $(VENV)/.installed-base
	$(PIP) install -q --no-deps --target $(LIBTPU) 'libtpu==0.0.42.*'
	touch $@

venv: $(VENV)/.installed-all

demo: $(VENV)/.installed-all
	$(PY) -m mlm_vs_clm.demo --workdir=demo_runs

replicate: $(VENV)/.installed-all
	$(PY) -m mlm_vs_clm.replicate --workdir=replication_runs --report_dir=replication

test: $(VENV)/.installed-all $(LIBTPU)/.installed
	MLM_VS_CLM_LIBTPU_DIR=$(CURDIR)/$(LIBTPU) $(PY) -m pytest -n 2 -q tests

lint: $(VENV)/.installed-all
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_runs replication_runs
