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

# One pytest process per test file: every StreamingDataset keeps descriptors for all streaming
# shared memory in its process, so a single process building hundreds of them runs out of files.
# pytest's exit code 5 (no tests collected) fails the run too, with its own message.
test: $(INSTALLED)
	@status=0; for file in tests/test_*.py; do \
		echo "== $$file"; $(VENV)/bin/python -m pytest -q "$$file"; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "make test: $$file collected no tests" >&2; fi; \
		if [ $$rc -ne 0 ]; then status=$$rc; fi; \
	done; exit $$status
