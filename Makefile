# The README's commands. Each installs into .venv first (once, again when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test bench lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed  ## publish sources/ into feeds/, then serve and keep it fresh
	$(VENV)/bin/feeder refresh
	exec $(VENV)/bin/feeder run

test: $(VENV)/.installed  ## lint and run the tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

bench: $(VENV)/.installed  ## the benchmarks (not run by CI: they take minutes)
	$(VENV)/bin/python -m bench
