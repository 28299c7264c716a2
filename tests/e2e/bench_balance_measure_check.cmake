# `longattn-bench calibrate` and `balance-measure` on the CPU at tiny sizes: calibrate writes a
# machine file that reads back with a positive rate for every length; balance-measure, run with it
# on a fresh random batch and a shipped one at 2 and 4 ranks, forward and backward, reports for
# every executable plan a measured compute per rank (positive, max/mean >= 1, one entry per rank),
# the model's prediction beside it and both step times, flat-minheap as modelled only; a batch is cut
# to --total-tokens as the help says (a hand-computed case); a bad device is refused in one line.
#   cmake -DBENCH=<longattn-bench> -DDATA=<bench/data> -DWORK=<scratch dir> -P bench_balance_measure_check.cmake
set(failures "")
set(tiny --device cpu --heads 2 --kv-heads 1 --head-dim 16 --warmups 1 --reps 1)

execute_process(COMMAND ${BENCH} calibrate ${tiny} --lengths 16,32,64 --tokens 128 --out ${WORK}/calibrated_machine.txt
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
string(REGEX MATCH "RESULT [^\n]*" result "${out}")
if(NOT rc EQUAL 0 OR NOT result)
  string(APPEND failures "\n  calibrate exited ${rc}: ${err}${out}")
else()
  file(READ ${WORK}/calibrated_machine.txt machine)
  foreach(length 16 32 64)
    if(NOT machine MATCHES "\ncausal 16 ${length} [0-9.e+-]+ [0-9.e+-]+\n")
      string(APPEND failures "\n  the machine file has no causal rate line for length ${length}:\n${machine}")
    endif()
  endforeach()
  string(REGEX MATCHALL "\"forward_tflops\":[0-9.]+" rates "${result}")
  list(LENGTH rates n_rates)
  if(NOT n_rates EQUAL 3 OR result MATCHES "_tflops\":0.0000[,}]")
    string(APPEND failures "\n  calibrate's RESULT wants 3 positive rate points: ${result}")
  endif()
endif()

# Fresh lengths: short sequences and one long one.
set(lengths "")
foreach(i RANGE 12)
  string(RANDOM LENGTH 2 ALPHABET 0123456789 digits)
  math(EXPR length "4 + ${digits}")
  string(APPEND lengths "${length}\n")
endforeach()
string(RANDOM LENGTH 2 ALPHABET 0123456789 digits)
math(EXPR length "200 + ${digits}")
string(APPEND lengths "${length}\n")
file(WRITE ${WORK}/balance_measure_lengths.txt "# fresh lengths for bench_balance_measure_output\n${lengths}")

execute_process(COMMAND ${BENCH} balance-measure ${tiny} --backward --ranks 2,4 --gpus-per-node 2 --total-tokens 512
                        --lengths-file ${WORK}/balance_measure_lengths.txt,${DATA}/giant_and_short.txt
                        --machine cpu --machine-file ${WORK}/calibrated_machine.txt
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 300)
string(REGEX MATCH "RESULT [^\n]*" result "${out}")
if(NOT rc EQUAL 0 OR NOT result)
  string(APPEND failures "\n  balance-measure exited ${rc}: ${err}${out}")
else()
  foreach(key worst_hierarchical_imbalance target_imbalance total_tokens)
    if(NOT result MATCHES "\"${key}\":[0-9.]+")
      string(APPEND failures "\n  RESULT lacks ${key}: ${result}")
    endif()
  endforeach()
  if(NOT result MATCHES "\"mode\":\"forward\\+backward\"" OR NOT result MATCHES "\"timing\":\"wall clock\"")
    string(APPEND failures "\n  RESULT does not say forward+backward by the wall clock: ${result}")
  endif()
  string(REGEX MATCHALL "\"ranks\":[0-9]+" runs "${result}")
  list(LENGTH runs n_runs)
  if(NOT n_runs EQUAL 4)
    string(APPEND failures "\n  want 4 runs (2 files x 2 rank counts), got ${n_runs}: ${result}")
  endif()
  # Every executable plan: measured and modelled numbers, max/mean >= 1, one measurement per rank.
  string(REGEX MATCHALL "\"executable\":true[^}]*}" plans "${result}")
  list(LENGTH plans n_plans)
  if(n_plans LESS 8)
    string(APPEND failures "\n  want hierarchical, per-sequence-zigzag and whole-sequences measured in every run: ${n_plans} plans")
  endif()
  foreach(plan IN LISTS plans)
    foreach(key measured_max_ms measured_mean_ms model_max_ms modelled_step_ms measured_step_ms)
      if(NOT plan MATCHES "\"${key}\":[0-9.]+" OR plan MATCHES "\"${key}\":0.0000[,}]")
        string(APPEND failures "\n  no positive ${key} in ${plan}")
      endif()
    endforeach()
    string(REGEX MATCH "\"measured_imbalance\":([0-9.]+)" _ "${plan}")
    if(NOT CMAKE_MATCH_1 OR CMAKE_MATCH_1 LESS 1)
      string(APPEND failures "\n  measured max/mean below 1 or missing in ${plan}")
    endif()
    string(REGEX MATCH "\"measured_ms\":\\[([^]]*)\\]" _ "${plan}")
    string(REPLACE "," ";" per_rank "${CMAKE_MATCH_1}")
    list(LENGTH per_rank n_ranks)
    if(NOT n_ranks EQUAL 2 AND NOT n_ranks EQUAL 4)
      string(APPEND failures "\n  measured_ms has ${n_ranks} entries, not one per rank: ${plan}")
    endif()
  endforeach()
  if(NOT result MATCHES "\"flat-minheap\":{\"executable\":false,\"modelled_step_ms\":[0-9.]+")
    string(APPEND failures "\n  flat-minheap is not reported as modelled only: ${result}")
  endif()
  if(NOT out MATCHES "cut to --total-tokens 512")
    string(APPEND failures "\n  the output does not say the shipped batch was cut: ${out}")
  endif()
endif()

# The cut by hand: the longest (1000) at most half of 800, then 300 and 50 fit and the last 400 no
# longer does: 3 sequences, 750 tokens, longest 400.
file(WRITE ${WORK}/balance_measure_cut.txt "1000\n300\n50\n400\n")
execute_process(COMMAND ${BENCH} balance-measure ${tiny} --ranks 2 --gpus-per-node 2 --total-tokens 800
                        --lengths-file ${WORK}/balance_measure_cut.txt
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
if(NOT rc EQUAL 0 OR NOT out MATCHES "measured batch: 3 sequences, 750 tokens, longest 400 \\(cut to --total-tokens 800\\)")
  string(APPEND failures "\n  the cut of 1000,300,50,400 to 800 tokens: exit ${rc}, ${err}${out}")
endif()

execute_process(COMMAND ${BENCH} balance-measure --device gpu --lengths-file ${WORK}/balance_measure_lengths.txt
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
string(REGEX MATCHALL "\n" lines "${err}")
list(LENGTH lines n_lines)
if(rc EQUAL 0 OR NOT err MATCHES "--device takes cpu or cuda" OR NOT n_lines EQUAL 1)
  string(APPEND failures "\n  a bad device: exit ${rc}, stderr '${err}' (want one line)")
endif()

if(failures)
  message(FATAL_ERROR "longattn-bench balance-measure:${failures}")
endif()
message(STATUS "calibrate wrote a machine file; balance-measure measured every executable plan at 2 and 4 ranks")
