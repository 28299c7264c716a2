# `longattn-bench strategies`, the modelled strategy table: a row for every Ulysses size U that
# divides both the ranks and the heads, one best per shape, a single GPU at 128k on the h200 machine
# at exactly the rates of the measured point the model is built on (547 forward, 535 forward+backward
# TFLOP/s, bench/results/cost_model_defaults_2026-12-05.md), and bad input refused in one line.
#   cmake -DBENCH=<longattn-bench> -P bench_strategies_check.cmake
set(failures "")
string(RANDOM LENGTH 1 ALPHABET 123 pick)
math(EXPR ranks "4 << ${pick}")  # 8, 16 or 32 ranks
string(RANDOM LENGTH 1 ALPHABET 01 twelve)
if(twelve)
  set(heads 12)
  set(want_rows 3)  # U = 1, 2, 4
else()
  set(heads 32)
  math(EXPR want_rows "${pick} + 3")  # U = 1, 2, 4, ..., ranks
endif()

execute_process(COMMAND ${BENCH} strategies --machine h200 --ranks 1,${ranks} --gpus-per-node 8 --seq-lens 131072
                        --heads ${heads} --kv-heads ${heads}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
string(REGEX MATCH "RESULT [^\n]*" result "${out}")
if(NOT rc EQUAL 0)
  string(APPEND failures "\n  strategies exited ${rc}: ${err}")
elseif(NOT result)
  string(APPEND failures "\n  no RESULT line in: ${out}")
else()
  string(REGEX MATCHALL "\"ranks\":${ranks}," rows "${result}")
  list(LENGTH rows n_rows)
  if(NOT n_rows EQUAL want_rows)
    string(APPEND failures "\n  ${n_rows} rows for ${ranks} ranks and ${heads} heads, want ${want_rows}: ${result}")
  endif()
  string(REGEX MATCHALL "\"best\":true" best "${result}")
  list(LENGTH best n_best)
  if(NOT n_best EQUAL 2)
    string(APPEND failures "\n  ${n_best} rows marked best for 2 shapes: ${result}")
  endif()
  if(NOT result MATCHES "\"ranks\":1,\"ulysses\":1,\"ring\":1,[^}]*\"fwd_tflops_per_gpu\":547.00,[^}]*\"fwd_bwd_tflops_per_gpu\":535.00")
    string(APPEND failures "\n  one H200 at 128k is not at the measured 547 / 535 TFLOP/s: ${result}")
  endif()
  if(NOT out MATCHES "modelled, not measured")
    string(APPEND failures "\n  the table does not say it is modelled: ${out}")
  endif()
endif()

execute_process(COMMAND ${BENCH} strategies --heads 30 --kv-heads 4
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
string(REGEX MATCHALL "\n" lines "${err}")
list(LENGTH lines n_lines)
if(rc EQUAL 0 OR NOT err MATCHES "--kv-heads 4" OR NOT n_lines EQUAL 1)
  string(APPEND failures "\n  30 heads over 4 kv heads: exit ${rc}, stderr '${err}' (want one line naming --kv-heads)")
endif()

if(failures)
  message(FATAL_ERROR "longattn-bench strategies:${failures}")
endif()
message(STATUS "strategies: ${want_rows} splits of ${ranks} ranks for ${heads} heads, the 1-GPU point at the measured rates")
