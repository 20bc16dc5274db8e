# Two commands set everything up on a fresh machine (see README.md):
#   make run    creates .venv, installs requirements.txt, starts the web UI on the shipped checkpoint
#   make test   creates .venv, installs requirements-dev.txt, runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

.PHONY: run test setup
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)
