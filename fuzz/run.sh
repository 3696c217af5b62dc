#!/usr/bin/env bash
# Runs one fuzz target for a number of seconds from the seed corpus (making it first if
# needed): ./run.sh <target> <seconds>. Exits non-zero on any crash, leak or timeout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="$1"
seconds="${2:-60}"
cd "$here"
[ -d "corpus/$target" ] || ./make-corpus.sh >/dev/null
mkdir -p "corpus/$target"
cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -dict=dict/safetensors.dict -timeout=20 -rss_limit_mb=4096 \
    -print_final_stats=1
