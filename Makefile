# One-command entry points. Each target installs what it needs (Debian packages), configures once
# and builds incrementally, so a second run is quick.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
NP ?= 4
DEMO_ARGS ?= --seq-len 16384 --heads 8 --kv-heads 2 --head-dim 64 --layout zigzag --causal --backward --check --dtype fp32

MPIRUN := mpirun --oversubscribe --bind-to none $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)

SAN_BUILD ?= build-sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

.PHONY: all deps configure build test test-python test-sanitize demo bench clean

all: build

deps:
	@bash scripts/setup-deps.sh

$(BUILD)/CMakeCache.txt:
	@$(MAKE) --no-print-directory deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

configure: $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# ctest's own summary, then one line on the GPU suites (on a machine without a GPU they all skip;
# tests/CMakeLists.txt registers them as one entry there, so ctest does not list each case).
test: build
	cd $(BUILD) && { ctest --output-on-failure --timeout 900; status=$$?; \
	  awk -f $(CURDIR)/tests/gpu_test_summary.awk Testing/Temporary/LastTest.log; \
	  if [ $$status -ne 0 ]; then awk -f $(CURDIR)/tests/failure_digest.awk Testing/Temporary/LastTest.log; fi; exit $$status; }
	@$(MAKE) --no-print-directory test-python

# The Python package and its pytest suite (python/tests): .venv/ at the repository root with torch
# from PyPI (several GB the first time, then kept under pip's cache folder) and the package linked
# against $(BUILD)'s library. A failed setup fails `make test`: the suite is part of it.
test-python: build
	bash scripts/setup-python.sh $(BUILD)
	.venv/bin/python -m pytest -q python/tests

# The CPU build under AddressSanitizer + UndefinedBehaviorSanitizer, every test (CUDA off: the
# sanitizers do not see device code). Leak checks run on the binaries that do not load MPI (Open
# MPI's plugins leak at exit by design); install_find_package is left out (the installed archive is
# instrumented, a plain consumer cannot link it).
test-sanitize:
	@$(MAKE) --no-print-directory deps
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLONGATTN_CUDA=OFF $(CMAKE_ARGS) \
	  -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" -DCMAKE_SHARED_LINKER_FLAGS="$(SAN_FLAGS)"
	cmake --build $(SAN_BUILD) -j $(JOBS)
	cd $(SAN_BUILD) && { ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure --timeout 900 -E install_find_package || \
	  { awk -f $(CURDIR)/tests/failure_digest.awk Testing/Temporary/LastTest.log; exit 1; }; }
	for t in test_common test_partition test_kernels test_offload; do \
	  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 $(SAN_BUILD)/bin/$$t --gtest_brief=1 || exit 1; done

demo: build
	$(MPIRUN) -np $(NP) $(BUILD)/bin/ring_attention $(DEMO_ARGS)

bench: build
	$(BUILD)/bin/longattn-bench kernels

clean:
	rm -rf $(BUILD) $(SAN_BUILD)
