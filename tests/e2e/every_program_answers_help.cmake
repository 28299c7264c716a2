# Every program, and every longattn-bench subcommand, answers --help and -h: exit 0 and a usage
# text (at least one --flag) on stdout. The subcommands are read from `longattn-bench --help`, so a new one
# is covered without editing this file. Run as
#   cmake -DPROGRAMS="<path>;<path>..." -DBENCH=<longattn-bench path> -P every_program_answers_help.cmake
set(failures "")

function(expect_help what)
  foreach(spelling --help -h)
    execute_process(COMMAND ${ARGN} ${spelling} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
    if(NOT rc STREQUAL "0")
      set(failures "${failures}\n  ${what} ${spelling}: exit ${rc}, stderr: ${err}")
    elseif(NOT out MATCHES "--[a-z]")
      set(failures "${failures}\n  ${what} ${spelling}: exit 0 but no usage text with flags on stdout: '${out}'")
    else()
      message(STATUS "${what} ${spelling}: ok")
    endif()
  endforeach()
  set(failures "${failures}" PARENT_SCOPE)
  set(last_help_output "${out}" PARENT_SCOPE)
endfunction()

foreach(program IN LISTS PROGRAMS)
  get_filename_component(name ${program} NAME)
  expect_help(${name} ${program})
endforeach()

expect_help(longattn-bench ${BENCH})
string(REGEX MATCHALL "\n  [a-z][a-z0-9-]*" listed "${last_help_output}")
if(NOT listed)
  set(failures "${failures}\n  longattn-bench --help lists no benchmarks")
endif()
foreach(item IN LISTS listed)
  string(STRIP "${item}" subcommand)
  expect_help("longattn-bench ${subcommand}" ${BENCH} ${subcommand})
endforeach()

if(failures)
  message(FATAL_ERROR "programs that do not answer --help or -h:${failures}")
endif()
