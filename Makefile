PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format bench clean shells

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/sidequest serve

# Most tests wait on processes, servers and databases, not on the CPU: three at a time on two cores
# keeps the suite under ten minutes. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3

test: $(VENV)/.installed-dev shells
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The completion tests run the zsh and fish scripts in the real shells (Debian's packages).
shells:
	@command -v zsh >/dev/null && command -v fish >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq zsh fish >/dev/null; }

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.engine_bench

clean:
	rm -rf $(VENV) .pytest_cache
