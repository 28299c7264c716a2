# What the CPU benchmarks print: `longattn-bench ring --device cpu` has no GPU columns and no overlap
# or scaling figures it cannot measure; `longattn-bench kernels` measures sgemm with kernels as wide
# as the CPU's, and gives no fwd/sgemm ratio when OpenBLAS is forced onto its SSE3 kernels.
#   cmake -DBENCH=<longattn-bench> -P bench_cpu_output_check.cmake
string(RANDOM LENGTH 1 ALPHABET 2345678 blocks)
math(EXPR seq "${blocks} * 64")
set(failures "")

execute_process(COMMAND ${BENCH} ring --device cpu --seq-lens ${seq} --heads 2 --head-dim 32 --iters 1
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
string(REGEX MATCH "\nseq [^\n]*" heading "\n${out}")
if(NOT rc EQUAL 0)
  string(APPEND failures "\n  ring exited ${rc}: ${err}")
elseif(NOT heading MATCHES "ranks" OR NOT heading MATCHES "GF/rank" OR heading MATCHES "gpu|GiB|ovl|scaling")
  string(APPEND failures "\n  ring's heading on a CPU: '${heading}'")
elseif(NOT out MATCHES "\"overlap_fwd\":null" OR NOT out MATCHES "\"strong_scaling\":null" OR NOT out MATCHES "\"gpu_mem_gib\":null")
  string(APPEND failures "\n  ring's RESULT on a CPU has overlap, scaling or GPU memory values: ${out}")
endif()

file(READ /proc/cpuinfo cpuinfo)
set(kernels_args kernels --seq-len ${seq} --heads 1 --head-dim 32 --iters 1 --causal 1)
execute_process(COMMAND ${BENCH} ${kernels_args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
if(NOT rc EQUAL 0)
  string(APPEND failures "\n  kernels exited ${rc}: ${err}")
elseif(out MATCHES "core [^ ]" AND cpuinfo MATCHES " avx2 ")
  if(NOT out MATCHES "\"blas_core\":\"(Haswell|Zen|SkylakeX|Cooperlake|CooperLake|SapphireRapids)\"")
    string(APPEND failures "\n  kernels measured sgemm with narrower kernels than this AVX2 CPU runs: ${out}")
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} -E env OPENBLAS_CORETYPE=Prescott ${BENCH} ${kernels_args}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
  if(NOT rc EQUAL 0 OR NOT out MATCHES "\"fwd_ratio\":null")
    string(APPEND failures "\n  kernels with OpenBLAS forced to SSE3 still gives a ratio (exit ${rc}): ${out}${err}")
  endif()
endif()

if(failures)
  message(FATAL_ERROR "CPU benchmark output:${failures}")
endif()
message(STATUS "ring and kernels print only what a CPU run measures (seq ${seq})")
