#!/usr/bin/env bash
# Builds and runs the CPU emulation of the 4-bit kernels' layout and fragment math, and
# checks that every kernel file compiles for sm_87 / sm_90 with no spills and no
# warnings. Needs nvcc (NVCC, CUDA_HOME or PATH); needs no GPU.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cuda_dir="$(dirname "$here")"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ]; then nvcc="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$nvcc" ]; then nvcc="$(command -v nvcc || true)"; fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
    echo "nvcc not found: set NVCC or CUDA_HOME, or put nvcc on PATH" >&2
    exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "== emulation"
"$nvcc" -std=c++17 -O2 -Werror all-warnings -L"$(dirname "$nvcc")/../lib" \
    -o "$out/emulate" "$here/emulate_layout.cu"
"$out/emulate"

echo "== kernels: sm_87 / sm_90, ptxas report"
status=0
for f in "$cuda_dir"/*.cu; do
    log="$out/$(basename "$f").log"
    "$nvcc" -std=c++17 -O3 -Xptxas=-v -Werror all-warnings \
        -gencode arch=compute_87,code=sm_87 -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_87,code=compute_87 -c "$f" -o "$out/$(basename "$f").o" >"$log" 2>&1 || {
        cat "$log"; status=1; continue; }
    # One line per kernel and arch: registers, spills.
    awk '/Compiling entry function/ {name=$7; arch=$NF}
         /spill stores/ {st=$5; ld=$9}
         /Used [0-9]+ registers/ {for (i=1;i<=NF;i++) if ($i=="Used") r=$(i+1);
             printf "%-8s %-10s regs %3s  spill st %s ld %s  %s\n", "'"$(basename "$f")"'", arch, r, st, ld, name}' "$log" \
        | sed "s/'//g" | tee -a "$out/report"
done
if grep -E "spill st [1-9]|ld [1-9]" "$out/report" >/dev/null; then
    echo "spills found" >&2
    status=1
fi
exit $status
