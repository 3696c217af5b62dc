#!/usr/bin/env bash
# The one prepared script for a machine with an NVIDIA GPU. Runs from the repository
# root on the GPU machine, using what scripts/gpu-bundle.sh built elsewhere
# (.gpu-bundle/; the GPU machine needs no Rust toolchain):
#
#   1. nvidia-smi (the card as found; no settings are changed)
#   2. every bundled CUDA test executable, with HIPRUNE_REQUIRE_GPU=1 (a missing
#      device fails instead of skipping)
#   3. hiprune bench kernels --backend cuda, where the bundled CLI has that backend
#   4. a summary table, last
#
# Logs go to $OUT (or ./gpu-check-logs). Every step runs under `timeout`; the whole
# script stays under 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

bundle=${HIPRUNE_GPU_BUNDLE:-.gpu-bundle}
logs=${OUT:-gpu-check-logs}
mkdir -p "$logs"
start=$(date +%s)
summary=()

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under timeout, logs to $logs/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo
    echo "==> $name (limit ${limit}s)"
    timeout --signal=KILL "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    summary+=("$(printf '%-28s %-16s %5ss' "$name" "$status" "$(($(date +%s) - t0))")")
    return "$rc"
}

echo "==> environment"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "cargo: $(command -v cargo || echo 'not installed (expected: the bundle is prebuilt)')"
echo "nvcc: $(command -v nvcc || echo 'not on PATH')"
[ -f "$bundle/manifest.txt" ] && cat "$bundle/manifest.txt"
if [ ! -d "$bundle/tests" ]; then
    echo "no $bundle/tests: run scripts/gpu-bundle.sh on the build machine and carry $bundle" >&2
    exit 1
fi

# cuBLAS for the dense baseline: cudarc loads libcublas.so.13 at run time. Add the
# folders that hold it (CUDA toolkit or the PyTorch wheels) to the loader path.
cublas_dirs=$(find /usr/local /opt /usr/lib -name 'libcublas.so.13*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${cublas_dirs}${LD_LIBRARY_PATH:-}"
echo "cuBLAS folders: ${cublas_dirs:-none found}"

step nvidia-smi 20 nvidia-smi

export HIPRUNE_REQUIRE_GPU=1
failed=0
for exe in "$bundle"/tests/cuda_*; do
    [ -x "$exe" ] || continue
    step "$(basename "$exe")" 150 "$exe" --test-threads=4 --nocapture || failed=1
done

# Kernel benchmark. `hiprune bench kernels` takes --backend; builds whose CLI does not
# run CUDA yet answer "unsupported" and the step reports it.
bench_args=(bench kernels --backend cuda --shapes sd35-large --m 1,4096 --weights int4,nf4 --seconds 0.3)
if [ -x "$bundle/hiprune" ]; then
    # ENABLE: drop the `|| true` below once `hiprune bench kernels --backend cuda` lands,
    # so that a failing benchmark fails this script.
    step bench-kernels-cuda 120 "$bundle/hiprune" "${bench_args[@]}" || true
    if grep -q "unsupported: backend" "$logs/bench-kernels-cuda.log" 2>/dev/null; then
        summary[-1]="$(printf '%-28s %-16s' bench-kernels-cuda 'not in this build')"
    fi
fi

echo
echo "==> summary ($(($(date +%s) - start)) s in all; logs in $logs)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/card: /'
printf '%-28s %-16s %6s\n' step status time
for line in "${summary[@]}"; do
    echo "$line"
done
for exe in "$bundle"/tests/cuda_*; do
    name=$(basename "$exe")
    grep -hE "^test result|worst relative error|^test .* FAILED" "$logs/$name.log" 2>/dev/null | sed "s/^/$name: /"
done
exit "$failed"
