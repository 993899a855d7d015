# The two commands a user needs (see README): `make demo` and `make test`.
# Both create or update the virtualenv in .venv first; it is reused while pyproject.toml is unchanged.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.installed
# llm-foundry pins older streaming and transformers than the newest our pins allow: its tests
# (tests/test_foundry*.py) run in a venv of their own, so the rest is tested on the newest.
FOUNDRY_VENV := .venv-foundry
FOUNDRY_INSTALLED := $(FOUNDRY_VENV)/.installed
# A variable, not a literal argument: the comma in it would split $(call)'s arguments.
FOUNDRY_EXTRAS := -e '.[dev,foundry]'

.PHONY: demo test venv foundry-venv

# Installs into venv $(1) the requirement $(2). PyPI downloads (torch's CUDA wheels are GBs) are
# sometimes cut off mid-file: pip resumes them, and the whole install is tried three times, so one
# network blip does not fail a fresh checkout. --resume-retries needs the pip upgraded just before.
define pip_install
for attempt in 1 2 3; do \
	$(1)/bin/python -m pip install --quiet --retries 10 --resume-retries 10 $(2) && exit 0; \
	echo "pip install $(2) into $(1) failed (attempt $$attempt of 3)" >&2; sleep 15; \
done; exit 1
endef

venv: $(INSTALLED)

foundry-venv: $(FOUNDRY_INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --retries 10 --upgrade pip
	$(call pip_install,$(VENV),-e '.[dev]')
	touch $(INSTALLED)

$(FOUNDRY_INSTALLED): pyproject.toml
	test -x $(FOUNDRY_VENV)/bin/python || $(PYTHON) -m venv $(FOUNDRY_VENV)
	$(FOUNDRY_VENV)/bin/python -m pip install --quiet --retries 10 --upgrade pip
	$(call pip_install,$(FOUNDRY_VENV),$(FOUNDRY_EXTRAS))
	touch $(FOUNDRY_INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/python -m composer_pike.demo

# One pytest process per test file: every StreamingDataset keeps descriptors for all streaming
# shared memory in its process, so a single process building hundreds of them runs out of files.
# pytest's exit code 5 (no tests collected) fails the run too, with its own message.
# PIKE_REQUIRE_FOUNDRY=1: the llm-foundry tests fail, instead of skipping, if llm-foundry is missing.
test: $(INSTALLED) $(FOUNDRY_INSTALLED)
	@status=0; for file in tests/test_*.py; do \
		case "$$file" in tests/test_foundry*) python=$(FOUNDRY_VENV)/bin/python;; *) python=$(VENV)/bin/python;; esac; \
		echo "== $$file"; PIKE_REQUIRE_FOUNDRY=1 $$python -m pytest -q "$$file"; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "make test: $$file collected no tests" >&2; fi; \
		if [ $$rc -ne 0 ]; then status=$$rc; fi; \
	done; exit $$status
