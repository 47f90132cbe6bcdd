# spacesync developer entry points. Each target creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
JS := tests/js
JS_STAMP := $(JS)/node_modules/.installed-$(shell cat $(JS)/package-lock.json | sha1sum | cut -c1-12)

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json  ## the moderator test client (matrix-js-sdk): npm ci
	cd $(JS) && npm ci --no-audit --no-fund --silent
	rm -f $(JS)/node_modules/.installed-*
	touch $(JS_STAMP)

demo: $(STAMP)  ## run the bot against a throwaway local Synapse with a sample Space (Ctrl-C to stop)
	$(BIN)/spacesync demo $(DEMO_ARGS)

lint: $(STAMP)  ## formatting, lint and types: ruff over the whole tree, mypy over spacesync
	$(BIN)/ruff format --check spacesync tests benchmarks
	$(BIN)/ruff check spacesync tests benchmarks
	$(BIN)/mypy

test: $(STAMP) $(JS_STAMP) lint  ## lint, then the whole suite: unit, property and integration tests (real Synapse and PostgreSQL)
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: $(STAMP)  ## the pure core only
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)  ## benchmarks (a real Synapse; scale.py a synthetic homeserver); figures go to docs/benchmarks.md by hand
	$(BIN)/python benchmarks/eviction.py
	$(BIN)/python benchmarks/reconcile.py
	$(BIN)/python benchmarks/power_levels.py
	$(BIN)/python benchmarks/lockdown.py
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf $(VENV) $(JS)/node_modules .demo .pytest_cache build *.egg-info
