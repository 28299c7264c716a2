# The last lines `make test` prints when ctest failed: for each failed test, the lines that say why
# (gtest's "Failure" with the values and traces after it, CMake and program errors), read from
# ctest's log (Testing/Temporary/LastTest.log). A failing test's whole output comes earlier from
# --output-on-failure; CI keeps only the head and the tail of a long log, and under mpirun four
# ranks' output can bury the one assertion, so this repeats it at the end.

{ gsub(/\033\[[0-9;]*m/, "") }
/^[0-9]+\/[0-9]+ Test: / { name = $3; n = 0; inside = 0; next }
/^Output:$/ { inside = 1; next }
/^<end of output>$/ { inside = 0; next }
inside {
  # A failure line and the few after it (expected/actual values, the trace with the seed).
  if ($0 ~ /: Failure$|CMake Error|[Ee]rror: |^E   |FAILED|[Tt]imeout|Assertion|Segmentation|Aborted|terminate called/) keep = 6
  if (keep > 0 && n < 40) { lines[++n] = $0; keep-- }
  next
}
/^Test Failed\.$|^Test not run\.$/ {
  if (shown < 4) {
    print "---- why " name " failed (from ctest's log; the first lines of each failure)"
    for (i = 1; i <= n; i++) print "  " lines[i]
    if (n == 0) print "  (no failure line found: see its output above)"
  }
  shown++
  next
}
END { if (shown > 4) print "---- and " shown - 4 " more failed tests: see their output above" }
