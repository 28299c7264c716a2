# One-command entry points. Each target installs what it needs (Debian packages), configures once
# and builds incrementally, so a second run is quick.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
NP ?= 4
DEMO_ARGS ?= --seq-len 16384 --heads 8 --kv-heads 2 --head-dim 64 --layout zigzag --causal --backward --check --dtype fp32

MPIRUN := mpirun --oversubscribe --bind-to none $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)

.PHONY: all deps configure build test demo bench clean

all: build

deps:
	@bash scripts/setup-deps.sh

$(BUILD)/CMakeCache.txt:
	@$(MAKE) --no-print-directory deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

configure: $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure --timeout 900

demo: build
	$(MPIRUN) -np $(NP) $(BUILD)/bin/ring_attention $(DEMO_ARGS)

bench: build
	$(BUILD)/bin/longattn-bench kernels

clean:
	rm -rf $(BUILD)
