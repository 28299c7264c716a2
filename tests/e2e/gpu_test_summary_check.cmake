# tests/gpu_test_summary.awk, which closes `make test`, against a ctest log made up here: GPU cases
# skipped for two reasons in random numbers, passes (one printed by two ranks), a coloured skip of
# two interleaved ranks, and CPU skips that must not be counted.
#   cmake -DSCRIPT=<gpu_test_summary.awk> -DWORK=<folder> -P gpu_test_summary_check.cmake
string(RANDOM LENGTH 2 ALPHABET 123456789 no_device)
string(RANDOM LENGTH 1 ALPHABET 123456789 not_hopper)
string(RANDOM LENGTH 1 ALPHABET 123456789 cpu_skips)
math(EXPR skipped "${no_device} + ${not_hopper}")

set(log "")
macro(add_case binary reason)
  string(APPEND log "1/9 Testing: case\nCommand: \"/b/bin/${binary}\" \"--gtest_filter=X\"\nOutput:\n"
                    "[ RUN      ] S.C\n/src/t.cpp:27: Skipped\n${reason}\n\n[  SKIPPED ] S.C (0 ms)\n"
                    "[  PASSED  ] 0 tests.\n[  SKIPPED ] 1 test, listed below:\n[  SKIPPED ] S.C\n<end of output>\n")
endmacro()
foreach(i RANGE 1 ${no_device})
  add_case(test_gpu "no CUDA device")
endforeach()
foreach(i RANGE 1 ${not_hopper})
  add_case(test_gpu "wgmma needs a Hopper GPU (sm_90a)")
endforeach()
foreach(i RANGE 1 ${cpu_skips})
  add_case(test_kernels "no AVX-512 here")
endforeach()
string(APPEND log "1/9 Testing: ok\nCommand: \"/b/bin/test_gpu\"\nOutput:\n[  PASSED  ] 1 test.\n<end of output>\n")
# Two ranks under mpirun print the totals of the same cases twice: counted once.
string(APPEND log "1/9 Testing: two ranks\nCommand: \"/usr/bin/mpiexec\" \"-np\" \"2\" \"/b/bin/test_nccl\"\nOutput:\n"
                  "[  PASSED  ] 1 test.\n[  PASSED  ] 1 test.\n<end of output>\n")
# Two ranks under mpirun, coloured (gtest colours its markers there), their lines interleaved:
# one skipped case, its reason counted once.
string(ASCII 27 esc)
set(green "${esc}[0;32m")
set(plain "${esc}[m")
string(APPEND log "1/9 Testing: two ranks skip\nCommand: \"/usr/bin/mpiexec\" \"-np\" \"2\" \"/b/bin/test_nccl\"\nOutput:\n"
                  "${green}[==========] ${plain}Running 1 test from 1 test suite.\n${green}[==========] ${plain}Running 1 test from 1 test suite.\n"
                  "${green}[ RUN      ] ${plain}N.A\n${green}[ RUN      ] ${plain}N.A\n/src/n.cpp:71: Skipped\n/src/n.cpp:71: Skipped\n"
                  "no CUDA device\n${green}[  SKIPPED ] ${plain}N.A (0 ms)\nno CUDA device\n${green}[  SKIPPED ] ${plain}N.A (0 ms)\n"
                  "${green}[  PASSED  ] ${plain}0 tests.\n${green}[  SKIPPED ] ${plain}1 test, listed below:\n"
                  "${green}[  PASSED  ] ${plain}0 tests.\n${green}[  SKIPPED ] ${plain}1 test, listed below:\n<end of output>\n")
math(EXPR skipped "${skipped} + 1")
math(EXPR no_device "${no_device} + 1")
file(WRITE ${WORK}/gpu_test_summary_fixture.log "${log}")

execute_process(COMMAND awk -f ${SCRIPT} ${WORK}/gpu_test_summary_fixture.log OUTPUT_VARIABLE line RESULT_VARIABLE rc)
string(STRIP "${line}" line)
set(expected "GPU tests: 2 passed, ${skipped} skipped, 0 failed: skipped because no CUDA device (${no_device}); wgmma needs a Hopper GPU (sm_90a) (${not_hopper})")
if(NOT rc EQUAL 0 OR NOT line STREQUAL expected)
  message(FATAL_ERROR "summary line\n  '${line}' (exit ${rc})\nexpected\n  '${expected}'")
endif()
message(STATUS "${line}")
