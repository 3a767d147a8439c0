# make serve: set up .venv and serve the default model. make test: set up, type-check, run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps
STAMP := $(VENV)/.installed
# The strict editable install (pyproject.toml: [tool.setuptools]) links each module file into
# build/__editable__.*/llmrpc/: a module file added or removed needs a new link tree, so the
# install reruns when this list of them changes.
MODULES := build/modules.txt
PIP_EDITABLE := --config-settings editable_mode=strict
QUIET_BUILD := PYTHONWARNINGS=ignore  # setuptools' banner about the link tree, at every install

.PHONY: serve test typecheck protos install clean FORCE

$(DEPS): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(QUIET_BUILD) $(BIN)/pip install -q -e '.[test]' $(PIP_EDITABLE)
	touch $(DEPS)

$(MODULES): FORCE
	@mkdir -p build
	@find engine kernels services bench protos \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) \
		-not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(STAMP): $(DEPS) $(MODULES)
	$(QUIET_BUILD) $(BIN)/pip install -q --no-deps --no-build-isolation -e . $(PIP_EDITABLE)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llmrpc serve

typecheck: $(STAMP)
	$(BIN)/python -m mypy

test: typecheck
	$(BIN)/python -m pytest -q

# Regenerate the Python stubs from protos/ (a test fails when they are stale).
protos: $(STAMP)
	$(BIN)/python -m llmrpc.services.protogen

clean:
	rm -rf $(VENV) build *.egg-info
