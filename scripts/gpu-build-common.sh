# Sourced by the GPU run scripts: environment, device record and the CUDA build, in one place.
# Sets OUT, SRC, BUILD, JOBS; defines gpu_build TARGET... (configure + build, exits on failure) and
# gpu_build_tree (one source tree into one build folder, for builds side by side).
OUT=${OUT:-/tmp/longattn-gpu-out}
mkdir -p "$OUT"
SRC=$(pwd)
BUILD=${BUILD:-$SRC/build-gpu}
JOBS=${JOBS:-$(nproc)}
# NVLink multicast stays off for every program and launcher (it can take the host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/device.txt" 2>&1
nvidia-smi topo -m >> "$OUT/device.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/device.txt"
head -4 "$OUT/device.txt"

# The cudnn backend against the same cuDNN PyTorch's peers use (its wheel's 9.19; the system has
# 9.14): build and run with that library. The frontend headers come with the tree (.deps, carried).
TORCH_CUDNN=${TORCH_CUDNN:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn}
CUDNN_ARGS=()
if [ -f "$TORCH_CUDNN/include/cudnn.h" ]; then
  CUDNN_ARGS=(-DLONGATTN_CUDNN_ROOT="$TORCH_CUDNN")
  export LD_LIBRARY_PATH="$TORCH_CUDNN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
[ -f "$SRC/.deps/cudnn-frontend/include/cudnn_frontend.h" ] || echo "no .deps/cudnn-frontend: the cudnn backend is left out (carry .deps)"

gpu_configure() {
  cmake -S "$1" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLONGATTN_CUDA=ON -DLONGATTN_CUDA_ARCHS=90a \
    "${CUDNN_ARGS[@]}" -DCMAKE_CUDA_FLAGS="${CUDA_FLAGS:-}" > "$OUT/configure.log" 2>&1
}

gpu_build() {
  if ! gpu_configure "$SRC"; then
    # Another part's half-finished folder must not stop the GPU run: retry on a copy without it.
    echo "configure failed in place (see configure.log); retrying without offload/" | tee -a "$OUT/configure.log"
    rm -rf /tmp/longattn-src "$BUILD"/CMakeCache.txt && mkdir -p /tmp/longattn-src
    tar --exclude='./build*' --exclude='./offload' --exclude='./tests/offload' -cf - . | (cd /tmp/longattn-src && tar xf -)
    gpu_configure /tmp/longattn-src || { tail -30 "$OUT/configure.log"; exit 1; }
  fi
  grep -E "cuDNN|CUDA parts|NCCL" "$OUT/configure.log"
  local start
  start=$(date +%s)
  if ! cmake --build "$BUILD" -j"$JOBS" --target "$@" > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -30
    exit 1
  fi
  echo "build ($*): $(( $(date +%s) - start )) s"
}

# gpu_build_tree SRC BUILD_DIR LOG TARGET...: configure and build one source tree without cuDNN
# (comparisons between trees need only the own kernels, and cuDNN's large headers are the slowest
# part of the build); all output to LOG; returns non-zero on failure.
gpu_build_tree() {
  local src=$1 dir=$2 log=$3
  shift 3
  local start
  start=$(date +%s)
  {
    cmake -S "$src" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DLONGATTN_CUDA=ON -DLONGATTN_CUDA_ARCHS=90a \
      -DLONGATTN_CUDNN_FRONTEND_INCLUDE=OFF -DCMAKE_CUDA_FLAGS="${CUDA_FLAGS:-}" &&
      cmake --build "$dir" -j"$JOBS" --target "$@"
  } > "$log" 2>&1
  local rc=$?
  echo "build of $src ($*): $(( $(date +%s) - start )) s, exit code $rc" | tee -a "$log"
  return $rc
}
