# One closing line for `make test`: how the GPU suites (test_gpu, test_nccl) fared in the last ctest
# run, read from its log (Testing/Temporary/LastTest.log), with the reasons the skipped cases gave.
# On a machine without a GPU they all skip; this line replaces ctest's list of every one of them.

# Each test's section starts with its command line; only the GPU binaries' sections are counted.
# Under mpirun every rank prints gtest's totals for the same cases, so a section counts the largest.
/^Command: / { gpu = ($0 ~ /\/test_(gpu|nccl)"/); if (gpu) sections++; p = s = f = 0; next }
/^<end of output>/ { if (gpu) { passed += p; skipped += s; failed += f; if (p + s + f == 0) unfinished++ }; gpu = 0; next }
!gpu { next }
# gtest prints "<file>:<line>: Skipped" and then the reason GTEST_SKIP() gave.
/: Skipped$/ { if ((getline reason) > 0) reasons[reason]++; next }
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
