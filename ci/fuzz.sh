#!/bin/sh
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time, from the seed
# corpus in fuzz/seeds, and fails on the first crash. Needs the nightly
# toolchain and cargo-fuzz (.ci/run installs both where missing).
# FUZZ_SECONDS sets the time per target (default 60).
set -eu
seconds="${FUZZ_SECONDS:-60}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "ci/fuzz.sh: the fuzz targets need the nightly Rust toolchain (cargo fuzz uses -Zsanitizer); install it with: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version 2>/dev/null | grep -q "^cargo-fuzz 0.13.2$"; then
    echo "ci/fuzz.sh: installing cargo-fuzz 0.13.2"
    cargo +nightly install cargo-fuzz --version 0.13.2 --locked
fi
cd "$(dirname "$0")/../fuzz"
# The committed lock file, as it is (as --locked does for the workspace).
cargo +nightly metadata --locked --format-version 1 >/dev/null
cargo +nightly fuzz build -O
targets=$(cargo +nightly fuzz list)
if [ -z "$targets" ]; then
    echo "ci/fuzz.sh: cargo fuzz lists no targets" >&2
    exit 1
fi
scratch=$(mktemp -d /tmp/teletun-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
trap 'exit 130' INT TERM
for target in $targets; do
    echo "fuzz: $target for ${seconds} s"
    mkdir -p "$scratch/$target"
    # New inputs go to the scratch corpus; the seeds stay as committed.
    # A crash leaves its input in fuzz/artifacts/$target and fails the run.
    if ! cargo +nightly fuzz run -O "$target" "$scratch/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1; then
        tail -n 40 "$scratch/$target.log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^stat::number_of_executed_units|^Done [0-9]+ runs" "$scratch/$target.log" | tail -n 1
done
