# `longattn-bench balance`, the modelled varlen plans: on a shipped batch at 64 GPUs the RESULT line
# carries the issue's keys and the hierarchical plan balances within 5%; on fresh random lengths it
# is never slower than packing whole sequences (where its search starts); a negative length is
# refused in one line naming the sequence.
#   cmake -DBENCH=<longattn-bench> -DDATA=<bench/data> -DWORK=<scratch dir> -P bench_balance_check.cmake
set(failures "")
set(files lognormal_long_tail bimodal_mix giant_and_short)
string(RANDOM LENGTH 1 ALPHABET 012 pick)
list(GET files ${pick} file)

execute_process(COMMAND ${BENCH} balance --lengths-file ${DATA}/${file}.txt --ranks 64 --gpus-per-node 8 --machine h200
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
string(REGEX MATCH "RESULT [^\n]*" result "${out}")
if(NOT rc EQUAL 0)
  string(APPEND failures "\n  ${file} at 64 GPUs exited ${rc}: ${err}")
elseif(NOT result)
  string(APPEND failures "\n  no RESULT line in: ${out}")
else()
  foreach(key imbalance speedup_vs_per_sequence_zigzag speedup_vs_whole_sequences speedup_vs_flat_minheap planner_ms)
    if(NOT result MATCHES "\"${key}\":[0-9.]+")
      string(APPEND failures "\n  RESULT lacks a number for ${key}: ${result}")
    endif()
  endforeach()
  string(REGEX MATCH "\"imbalance\":([0-9.]+)" _ "${result}")
  if(CMAKE_MATCH_1 GREATER 1.05)
    string(APPEND failures "\n  ${file} at 64 GPUs: imbalance ${CMAKE_MATCH_1} over 1.05")
  endif()
  if(NOT out MATCHES "modelled")
    string(APPEND failures "\n  the table does not say it is modelled: ${out}")
  endif()
endif()

# Fresh lengths: a few hundred short sequences and a handful of long ones, on 16 GPUs in 2 nodes.
set(lengths "")
foreach(i RANGE 300)
  string(RANDOM LENGTH 4 ALPHABET 0123456789 digits)
  math(EXPR length "128 + ${digits}")
  string(APPEND lengths "${length}\n")
endforeach()
foreach(i RANGE 4)
  string(RANDOM LENGTH 5 ALPHABET 0123456789 digits)
  math(EXPR length "100000 + ${digits} * 3")
  string(APPEND lengths "${length}\n")
endforeach()
file(WRITE ${WORK}/balance_lengths.txt "# fresh lengths for bench_balance_output\n${lengths}")
execute_process(COMMAND ${BENCH} balance --lengths-file ${WORK}/balance_lengths.txt --ranks 16 --gpus-per-node 8
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
string(REGEX MATCH "\"speedup_vs_whole_sequences\":([0-9.]+)" _ "${out}")
if(NOT rc EQUAL 0 OR NOT CMAKE_MATCH_1)
  string(APPEND failures "\n  fresh lengths: exit ${rc}, ${err}${out}")
elseif(CMAKE_MATCH_1 LESS 0.9999)
  string(APPEND failures "\n  fresh lengths: slower than whole sequences (${CMAKE_MATCH_1}x); lengths in ${WORK}/balance_lengths.txt")
endif()

file(WRITE ${WORK}/balance_bad_lengths.txt "4096\n-7\n")
execute_process(COMMAND ${BENCH} balance --lengths-file ${WORK}/balance_bad_lengths.txt --ranks 8
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
string(REGEX MATCHALL "\n" lines "${err}")
list(LENGTH lines n_lines)
if(rc EQUAL 0 OR NOT err MATCHES "sequence 1 has a negative length -7" OR NOT n_lines EQUAL 1)
  string(APPEND failures "\n  a negative length: exit ${rc}, stderr '${err}' (want one line naming sequence 1)")
endif()

if(failures)
  message(FATAL_ERROR "longattn-bench balance:${failures}")
endif()
message(STATUS "balance: ${file} at 64 GPUs balanced, fresh lengths no slower than whole sequences, bad input refused")
