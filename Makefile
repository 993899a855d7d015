# The two commands a user needs (see README): `make demo` and `make test`.
# Both create or update the virtualenv in .venv first; it is reused while pyproject.toml is unchanged.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: demo test venv

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/python -m composer_pike.demo

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q
