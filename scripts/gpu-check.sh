#!/usr/bin/env bash
# The one prepared script for a machine with an NVIDIA GPU. Runs from the repository
# root on the GPU machine, using what scripts/gpu-bundle.sh built elsewhere
# (.gpu-bundle/; the GPU machine needs no Rust toolchain):
#
#   1. nvidia-smi (the card as found; no settings are changed)
#   2. every bundled CUDA test executable, with HIPRUNE_REQUIRE_GPU=1 (a missing
#      device fails instead of skipping)
#   3. the C interface test ffi/tests/backends.c: HP_BACKEND_CUDA and HP_BACKEND_AUTO
#      run a forward on the GPU and match the CPU context within the CUDA tolerance
#   4. hiprune bench kernels --backend cuda: INT4/NF4 against cuBLAS f16 on every
#      SD3.5-Large linear shape at M = 1, 8, 4096 (CSV kept in the logs)
#   5. hiprune bench model --backend cuda: a tiny probe first, then the
#      SD3.5-Large-shaped model at 1024x1024 with the paper's cut (blocks 25-28 and
#      31-34 removed), INT4 against the dense f16 original in one run (seeded weights generated on the spot, in HIPRUNE_BENCH_TMP)
#   6. a summary: steps, then the kernel table (shape, M, time, GB/s, TFLOP/s, ratio
#      to cuBLAS), last
#
# Logs go to $OUT (or ./gpu-check-logs). Every step runs under `timeout`, capped by
# what is left of a 340-second budget, so the whole script stays under 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

bundle=${HIPRUNE_GPU_BUNDLE:-.gpu-bundle}
logs=${OUT:-gpu-check-logs}
mkdir -p "$logs"
start=$(date +%s)
budget=${HIPRUNE_GPU_CHECK_BUDGET:-340}
summary=()

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under timeout (LIMIT, or what is left
# of the budget if less), stdout and stderr to the terminal and $logs/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc status left
    t0=$(date +%s)
    left=$((budget - (t0 - start)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        summary+=("$(printf '%-28s %-16s' "$name" 'SKIPPED (budget)')")
        return 124
    fi
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

# The C interface: HP_BACKEND_CUDA and HP_BACKEND_AUTO from C run on the GPU and match
# the CPU context within the CUDA tolerance.
if [ -x "$bundle/c/backends" ]; then
    step c-backends-cuda 60 "$bundle/c/backends" "$bundle/c/sd35.hpk" "$bundle/c/inputs" || failed=1
fi

# Kernel benchmark: CSV to its own file (the table is printed from it at the end),
# progress to the log.
bench_csv="$logs/bench-kernels-cuda.csv"
bench_args=(bench kernels --backend cuda --shapes sd35-large --m 1,8,4096 --weights int4,nf4 --seconds 0.25 --csv)
if [ -x "$bundle/hiprune" ]; then
    # bash -c '"$@" > "$0"' CSV CMD...: runs CMD with its stdout in CSV, under step's timeout.
    step bench-kernels-cuda 110 bash -c '"$@" > "$0"' "$bench_csv" "$bundle/hiprune" "${bench_args[@]}" || failed=1
fi

# Whole-model benchmark. A tiny model first: it checks the path end to end in seconds
# before the large run. The seeded SD3.5-Large checkpoint (15 GiB) and its INT4 package
# go to HIPRUNE_BENCH_TMP, not to $OUT.
bench_tmp=${HIPRUNE_BENCH_TMP:-$PWD/.bench-tmp}
mkdir -p "$bench_tmp"
model_ready=0
if [ -x "$bundle/hiprune" ]; then
    if TMPDIR=$bench_tmp step bench-model-tiny-cuda 60 "$bundle/hiprune" bench model --generate tiny --steps 2 --backend cuda; then
        model_ready=1
    else
        failed=1
    fi
fi
if [ "$model_ready" = 1 ]; then
    # --generate sd35-large uses the paper's cut (preset sd35-large-turbo) and INT4 g64.
    TMPDIR=$bench_tmp step bench-model-sd35-large-cuda 240 "$bundle/hiprune" bench model \
        --generate sd35-large --resolution 1024 --steps 3 --backend cuda || failed=1
fi
rm -rf "$bench_tmp"

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
grep -hE "vs CPU|^FAIL|passed" "$logs/c-backends-cuda.log" 2>/dev/null | sed "s/^/c-backends-cuda: /"
if [ -f "$logs/bench-model-sd35-large-cuda.log" ]; then
    echo
    grep -E "^(dense|compressed|reduction)" "$logs/bench-model-sd35-large-cuda.log"
fi
if [ -s "$bench_csv" ]; then
    echo
    grep -E "^# (gpu|cuda|clocks|bandwidth GB/s):" "$bench_csv"
    scripts/kernel-summary.sh "$bench_csv"
fi
exit "$failed"
