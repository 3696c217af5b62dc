#!/usr/bin/env bash
# Builds, on a machine with a Rust toolchain and nvcc (no GPU needed), everything that
# scripts/gpu-check.sh runs on a GPU machine, and puts it in .gpu-bundle/:
#
#   .gpu-bundle/tests/cuda_*     the CUDA integration-test executables (release)
#   .gpu-bundle/hiprune          the CLI, for `hiprune bench kernels|model --backend cuda`
#   .gpu-bundle/c/               ffi/tests/backends.c built against this build's
#                                libhiprune.so, with a package and forward inputs
#   .gpu-bundle/manifest.txt     revision, archs and sizes
#
# nvcc is found as build.rs finds it (NVCC, CUDA_HOME, CUDA_PATH, PATH);
# HIPRUNE_CUDA_ARCHS picks the GPUs (default 87;90). Then carry .gpu-bundle/ and
# scripts/ to the GPU machine and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=.gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/tests"

echo "==> cargo test --release --features cuda --no-run (CUDA tests)"
cargo test --release --features cuda --test 'cuda_*' --no-run 2>&1 | tee "$bundle/build.log" |
    grep -E '^(error|warning: ptxas)|Executable' || true
# "  Executable tests/cuda_linear.rs (target/release/deps/cuda_linear-0123abcd)"
grep -E 'Executable tests/cuda_[a-z0-9_]+\.rs' "$bundle/build.log" |
    sed -E 's/.*Executable tests\/(cuda_[a-z0-9_]+)\.rs \((.*)\)/\1 \2/' |
    while read -r name exe; do
        cp "$exe" "$bundle/tests/$name"
    done
if [ -z "$(ls -A "$bundle/tests")" ]; then
    echo "no CUDA test executables were built; see $bundle/build.log" >&2
    exit 1
fi

echo "==> cargo build --release --features cuda --bin hiprune"
cargo build --release --features cuda --bin hiprune
cp target/release/hiprune "$bundle/hiprune"

# The C interface on the GPU: ffi/tests/backends.c against the shared library of this
# CUDA build (found beside it through $ORIGIN), with the package and inputs the C tests
# make (tests/ffi_c.rs writes them while it runs).
echo "==> the C backend test (ffi/tests/backends.c) against the CUDA shared library"
cargo test --release --features cuda --test ffi_c backend_choice >"$bundle/c-build.log" 2>&1 || {
    cat "$bundle/c-build.log" >&2
    exit 1
}
mkdir -p "$bundle/c/inputs"
cp target/release/deps/libhiprune.so "$bundle/c/"
cp target/tmp/ffi_c/sd35.hpk "$bundle/c/"
cp target/tmp/ffi_c/fwd_* "$bundle/c/inputs/"
cc -std=c99 -Wall -Wextra -Werror -DHP_TEST_CUDA_BUILD=1 -Iinclude -Iffi/tests \
    ffi/tests/backends.c -o "$bundle/c/backends" -L"$bundle/c" -lhiprune -lm \
    '-Wl,-rpath,$ORIGIN'

# Line tables are not needed on the GPU machine; the carried bundle stays small.
strip --strip-debug "$bundle"/hiprune "$bundle"/tests/* "$bundle"/c/libhiprune.so 2>/dev/null || true

ptxas_log=$(ls -t target/release/build/hiprune-*/out/ptxas.log 2>/dev/null | head -1 || true)
[ -n "$ptxas_log" ] && cp "$ptxas_log" "$bundle/ptxas.log"

{
    echo "revision: $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- . ':!.gpu-bundle' || echo -dirty)"
    echo "archs: ${HIPRUNE_CUDA_ARCHS:-87;90}"
    echo "built: $(date -u +%Y-%m-%dT%H:%MZ)"
    (cd "$bundle" && du -b hiprune tests/* c/*)
} >"$bundle/manifest.txt"
cat "$bundle/manifest.txt"
echo "total: $(du -sh "$bundle" | cut -f1)"
