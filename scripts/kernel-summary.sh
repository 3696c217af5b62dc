#!/usr/bin/env bash
# Prints the short table of a `hiprune bench kernels --csv` report: one line per shape,
# M and weights, with the median time, GB/s (weights + x + y once each), TFLOP/s, the
# fraction of the measured bandwidth and the ratio to the baseline (cuBLAS f16 on
# CUDA: > 1 is faster than cuBLAS).
#
#   scripts/kernel-summary.sh report.csv
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 REPORT.csv" >&2; exit 2; }
awk -F, '
/^#/ { next }
!header { for (i = 1; i <= NF; i++) col[$i] = i; header = 1
          printf "%-12s %5s %-10s %-7s %10s %9s %8s %6s %8s\n", "K x N", "M", "weights", "kernel", "median us", "GB/s", "TFLOP/s", "% bw", "vs base"
          next }
{ printf "%-12s %5d %-10s %-7s %10.1f %9.1f %8.2f %5.0f%% %7.2fx\n",
         $col["k"] "x" $col["n"], $col["m"], $col["weights"], $col["kernel"],
         $col["median_s"] * 1e6, $col["gbps"], $col["gflops"] / 1000,
         100 * $col["fraction_of_bandwidth"], $col["speedup_vs_baseline"] }
' "$1"
