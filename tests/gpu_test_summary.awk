# One closing line for `make test`: how the GPU suites (test_gpu, test_nccl) fared in the last ctest
# run, read from its log (Testing/Temporary/LastTest.log), with the reasons the skipped cases gave.
# On a machine without a GPU they all skip; this line replaces ctest's list of every one of them.

# gtest colours its markers when it believes it writes to a terminal (it does under mpirun).
{ gsub(/\033\[[0-9;]*m/, "") }
# Each test's section starts with its command line; only the GPU binaries' sections are counted.
# Under mpirun every rank prints gtest's totals for the same cases, so a section counts the largest,
# and its skip reasons once per rank (each rank prints "Running N tests" once).
/^Command: / { gpu = ($0 ~ /\/test_(gpu|nccl)"/); if (gpu) sections++; p = s = f = ranks = pending = 0; delete section_reasons; next }
/^<end of output>/ {
  if (gpu) {
    passed += p; skipped += s; failed += f
    if (p + s + f == 0) unfinished++
    for (r in section_reasons) reasons[r] += int((section_reasons[r] + (ranks > 1 ? ranks : 1) - 1) / (ranks > 1 ? ranks : 1))
  }
  gpu = 0; next
}
!gpu { next }
/^\[==========\] Running / { ranks++; next }
# gtest prints "<file>:<line>: Skipped" and then the reason GTEST_SKIP() gave; under mpirun the
# ranks' lines interleave, so a reason is the next line that is neither a marker nor another
# "Skipped" nor empty.
/: Skipped$/ { pending++; next }
pending && $0 != "" && !/^\[/ { section_reasons[$0]++; pending--; next }
/^\[  PASSED  \] [0-9]+ tests?\./ { if ($4 > p) p = $4; next }
/^\[  SKIPPED \] [0-9]+ tests?,/ { if ($4 > s) s = $4; next }
/^\[  FAILED  \] [0-9]+ tests?,/ { if ($4 > f) f = $4; next }

END {
  if (!sections) {
    print "GPU tests: none were run (this build has no CUDA parts: no nvcc at configure time, or LONGATTN_CUDA=OFF)"
    exit 0
  }
  line = sprintf("GPU tests: %d passed, %d skipped, %d failed", passed, skipped, failed)
  if (unfinished) line = line sprintf(", %d run(s) ended without gtest's totals (crashed or timed out: see above)", unfinished)
  # The reasons, most frequent first, at most three.
  for (shown = 0; shown < 3; shown++) {
    best = ""
    for (r in reasons)
      if (best == "" || reasons[r] > reasons[best]) best = r
    if (best == "") break
    line = line (shown ? "; " : ": skipped because ") best " (" reasons[best] ")"
    delete reasons[best]
  }
  if (length(reasons) > 0) line = line "; and other reasons"
  print line
}
