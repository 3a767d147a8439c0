# make serve: set up .venv and serve the default model. make test: set up and run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test protos install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llmrpc serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the Python stubs from protos/ (a test fails when they are stale).
protos: $(STAMP)
	$(BIN)/python -m llmrpc.services.protogen

clean:
	rm -rf $(VENV) build *.egg-info
