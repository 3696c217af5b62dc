#!/usr/bin/env bash
# Builds the C library in release mode and installs it under PREFIX:
#
#   PREFIX/include/hiprune.h
#   PREFIX/lib/libhiprune.so, PREFIX/lib/libhiprune.a
#   PREFIX/lib/pkgconfig/hiprune.pc
#   PREFIX/lib/cmake/hiprune/hiprune-config.cmake (+ -version.cmake)
#
# Usage: ffi/install.sh PREFIX [extra cargo build arguments]
#   ffi/install.sh /usr/local                                   # lean CPU build
#   ffi/install.sh /opt/hiprune --features cuda                 # once CUDA lands
# The build always uses --no-default-features (no CLI, no compression toolchain);
# extra arguments are passed to cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: $0 PREFIX [cargo build arguments]" >&2
    exit 2
fi
prefix=$1
shift
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

# One release build of the rlib, cdylib and staticlib; rustc also reports the system
# libraries a static link needs.
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
cargo rustc --release --lib --no-default-features "$@" -- --print native-static-libs 2>&1 |
    tee "$build_log"
native=$(sed -n 's/.*native-static-libs: //p' "$build_log" | tail -1)
if [ -z "$native" ]; then
    # Nothing was rebuilt, so rustc printed nothing: the usual Linux set.
    native="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
fi
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
lib_dir="$target_dir/release"
version=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"name":"hiprune","version":"\([^"]*\)".*/\1/p')

install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/hiprune"
install -m 644 include/hiprune.h "$prefix/include/"
install -m 755 "$lib_dir/libhiprune.so" "$prefix/lib/"
install -m 644 "$lib_dir/libhiprune.a" "$prefix/lib/"

# CMake wants the static link libraries as a ;-list of names without -l.
cmake_libs=$(printf '%s\n' $native | sed -n 's/^-l//p' | paste -sd ';' -)
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@NATIVE_STATIC_LIBS@|$native|" \
    ffi/hiprune.pc.in >"$prefix/lib/pkgconfig/hiprune.pc"
sed -e "s|@VERSION@|$version|" -e "s|@CMAKE_STATIC_LIBS@|$cmake_libs|" \
    ffi/hiprune-config.cmake.in >"$prefix/lib/cmake/hiprune/hiprune-config.cmake"
sed -e "s|@VERSION@|$version|" \
    ffi/hiprune-config-version.cmake.in >"$prefix/lib/cmake/hiprune/hiprune-config-version.cmake"

echo "installed hiprune $version under $prefix"
echo "  pkg-config: PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs hiprune"
echo "  CMake:      cmake -DCMAKE_PREFIX_PATH=$prefix ..."
