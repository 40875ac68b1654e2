# gomerge: `make run` builds everything and merges a built-in example; `make test` runs every test.
# Everything is installed into .venv (Python) and the Go module cache; nothing needs installing by hand
# except Go >= 1.26, Python >= 3.9 and a C compiler.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GO ?= go
# Go's SIMD experiment builds the vector kernels (gomerge/kernels/kernels_simd.go); test-go also tests the portable ones.
export GOEXPERIMENT := simd
GO_SOURCES := $(wildcard gomerge/*.go gomerge/*/*.go gomerge/internal/*/*.go bindings/*.go) go.mod go.sum
ENGINE := python/gomerge/_engine/bindings.py
# A count, not a duration: a -fuzztime duration can end in a spurious "context deadline exceeded"
# on a loaded machine (a race in Go's fuzz coordinator, golang/go#75804); 100000 runs take 4-16 s each here.
FUZZTIME ?= 100000x
# the fuzz targets, each as its package's folder:target
FUZZ_TARGETS := gomerge/safetensors:FuzzOpenSafetensors gomerge/adapter:FuzzParseConfig gomerge/adapter:FuzzPatternResolve gomerge/adapter:FuzzWeightsJSON
# staticcheck runs once over both builds (vector kernels and portable): an unused name is one unused in both
STATICCHECK_MATRIX := simd: GOEXPERIMENT=simd\nportable: GOEXPERIMENT=\n
PY_SOURCES := python tests benchmarks examples
# Debian's qemu-user (static build), unpacked into .build (nothing is installed on the host): the CPU matrix
QEMU := .build/qemu/usr/bin/qemu-x86_64-static

.PHONY: all build run test test-go test-cpus test-python test-numerics fuzz lint wheel bench clean

all: build

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Stamps record that a requirements file is installed; they are redone when the file changes.
$(VENV)/.deps-build: requirements-build.txt | $(VENV)/bin/python
	$(PIP) install -q --disable-pip-version-check -r requirements-build.txt
	touch $@

$(VENV)/.deps-test: tests/requirements.txt $(VENV)/.deps-build
	$(PIP) install -q --disable-pip-version-check -r tests/requirements.txt
	touch $@

$(ENGINE): $(GO_SOURCES) bindings/build_engine.py $(VENV)/.deps-build
	$(PY) bindings/build_engine.py python/gomerge/_engine

build: $(ENGINE)

run: build
	PYTHONPATH=python $(PY) examples/quickstart.py

lint: $(VENV)/.deps-test
	@test -z "$$(gofmt -l gomerge bindings benchmarks)" || (echo "gofmt needed:"; gofmt -l gomerge bindings benchmarks; exit 1)
	$(GO) vet ./gomerge/... ./bindings ./benchmarks/floor
	GOEXPERIMENT= $(GO) vet ./gomerge/...
	$(GO) run ./gomerge/kernels/internal/gen512 -dir gomerge/kernels -check
	$(GO) run ./gomerge/kernels/internal/genasm -dir gomerge/kernels -check
	printf '$(STATICCHECK_MATRIX)' | $(GO) tool staticcheck -matrix ./gomerge/... ./bindings ./benchmarks/floor
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

# The Go tests with the vector kernels and with the portable ones, then both again under the race detector
# (which also checks unsafe pointer conversions).
test-go:
	$(GO) test -count=1 ./gomerge/... ./bindings
	GOEXPERIMENT= $(GO) test -count=1 ./gomerge/...
	$(GO) test -race -count=1 ./gomerge/... ./bindings
	GOEXPERIMENT= $(GO) test -race -count=1 ./gomerge/...

$(QEMU):
	$(PYTHON) tests/platforms/debs.py --arch amd64 --dest .build/qemu qemu-user-static

# Every CPU level this machine runs or emulates: the Go tests and examples/quickstart.py natively, under
# qemu -cpu Nehalem (portable kernels) and -cpu Haswell (AVX2), and the Go tests for arm64 under qemu-aarch64.
test-cpus: build $(QEMU)
	PY=$(PY) GO=$(GO) tests/platforms/cpus.sh

# The wheel tests (tests/test_wheel.py) run in test-wheels, once the wheels are built.
test-python: build $(VENV)/.deps-test $(VENV)/.deps-llama
	$(PY) -m pytest -q tests --ignore=tests/test_wheel.py

# The numerics matrix, beside the CPU matrix: the tests against PEFT's and torch's SVDs again with the reference's
# arithmetic on other paths (test-python ran the machine's default): MKL's AVX2 code path, MKL's COMPATIBLE
# (SSE2) path, and the SVD of the transpose (tests/svd_checks.py). Each run prints the path it took and its
# fingerprint; a tolerance that holds only on one path fails here, whatever this machine's CPU.
NUMERICS_TESTS := tests/test_peft_parity.py tests/test_peft_dropin.py tests/test_peft_pruning.py tests/test_dare.py \
	tests/test_rank.py tests/test_span_methods.py tests/test_extract.py tests/test_knots_core_methods.py tests/test_numerics.py
NUMERICS_PATHS := MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_CBWR=COMPATIBLE GOMERGE_TEST_REFERENCE_SVD=transpose

test-numerics: build $(VENV)/.deps-test
	@mkdir -p .build
	@for path in $(NUMERICS_PATHS); do \
		echo "== numerics matrix: $$path"; \
		rc=0; env $$path $(PY) -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS) >.build/numerics.log 2>&1 || rc=$$?; \
		grep -E '^numerics: |^[0-9]+ modules; | passed| failed' .build/numerics.log | sort -u; \
		if [ $$rc -ne 0 ]; then tail -n 200 .build/numerics.log; echo "test-numerics: failed with $$path"; exit 1; fi; \
	done

# Each fuzz target runs FUZZTIME inputs; a crasher is saved under its package's testdata/fuzz/ and fails the run
# (commit it: it then runs as a regression test in test-go).
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t#*:}; \
		echo "fuzz $$name in ./$$pkg ($(FUZZTIME))"; \
		$(GO) test ./$$pkg -run='^$$' -fuzz="^$$name$$" -fuzztime=$(FUZZTIME) || exit 1; \
	done

test: lint test-go test-cpus fuzz test-python test-numerics test-wheels

# llama-cpp-python (the GGUF export tests' client, tests/test_gguf_export.py) compiles llama.cpp from its source
# release, several minutes on 2 cores: its own stamp redoes that only when tests/requirements-llama.txt changes. The
# build is CPU-only and portable (no -march=native, no AVX/AVX2/FMA/F16C/BMI2: the cached library runs on any x86-64
# or arm64 CPU), without the multimodal library, tests, examples, tools or server.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF \
	-DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF

$(VENV)/.deps-llama: tests/requirements-llama.txt | $(VENV)/.deps-test
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --disable-pip-version-check \
		--no-binary llama-cpp-python -r tests/requirements-llama.txt
	touch $@

# `make wheel` is `make wheels` (below): the ten manylinux wheels and the sdist in dist/.
wheel: wheels

$(VENV)/.deps-bench: benchmarks/requirements.txt $(VENV)/.deps-test $(VENV)/.deps-llama
	$(PIP) install -q --disable-pip-version-check -r benchmarks/requirements.txt
	touch $@

# The comparisons with PEFT and the other peers (the slow peers only with --scenarios ...,SLOW); results in benchmarks/results/.
bench: build $(VENV)/.deps-bench
	PYTHONPATH=python:benchmarks $(PY) benchmarks/run.py

clean:
	rm -rf .build python/gomerge/_engine dist build *.egg-info python/*.egg-info

# Wheels the way users install them (tests/platforms/wheels.py): the sdist and manylinux2014 wheels for CPython
# 3.9-3.13 on x86_64 and aarch64 in dist/, compiled by zig for glibc 2.17, tagged by auditwheel, checked by twine.
# A second run reuses the wheels while nothing they are built from has changed.
.PHONY: wheels sdist test-wheels

$(VENV)/.deps-wheels: requirements-wheels.txt $(VENV)/.deps-build
	$(PIP) install -q --disable-pip-version-check -r requirements-wheels.txt
	touch $@

wheels: $(VENV)/.deps-wheels
	$(PY) tests/platforms/wheels.py wheels

sdist: $(VENV)/.deps-wheels
	$(PY) tests/platforms/wheels.py sdist

# Each x86_64 wheel in a fresh venv without Go, the aarch64 one under qemu (byte-identical merges), the sdist with
# and without Go; qemu and the arm64 CPython are fetched from Debian first.
test-wheels: wheels $(VENV)/.deps-test
	$(PY) tests/platforms/wheels.py emulator
	$(PY) -m pytest -q tests/test_wheel.py
