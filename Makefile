# Two entry points, both idempotent: `make lab` serves the page, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5006
PANEL_FLAGS ?= --port $(PORT) --allow-websocket-origin localhost:$(PORT) --allow-websocket-origin 127.0.0.1:$(PORT)

.PHONY: lab test install install-test chromium bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make reinstalls happen only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,triton]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }

lab: install
	$(BIN)/python -m lab $(PANEL_FLAGS)

test: install-test chromium
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python -m engine.bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis test-results
