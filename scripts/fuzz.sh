#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and fails on any crash, timeout or
# out-of-memory. FUZZ_SECONDS (default 30) is each target's budget; FUZZ_TARGETS (default all)
# names the targets to run. Each run starts from the committed seeds (fuzz/seeds/<target>) and
# the corpus earlier runs grew (fuzz/corpus/<target>, not committed); a crash leaves its input
# in fuzz/artifacts/<target>/, which `cargo fuzz tmin` minimises.
#
# libFuzzer needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. cargo-fuzz is installed into ~/.cargo/bin the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
# Slower than this per input is a hang; more memory than this is a leak or an unbounded
# allocation (the largest legitimate input, a 64 KiB page restore, needs a few MiB).
timeout=10
rss_mb=1024

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
# The fuzz crate is its own workspace with its own target directory.
unset CARGO_TARGET_DIR
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
# One build for every target (they share all dependencies); -a keeps overflow checks and
# debug assertions on, as in the unit tests.
cargo fuzz build -a
for target in $targets; do
  mkdir -p "fuzz/corpus/$target"
  echo "fuzz: $target for ${seconds}s" >&2
  log="fuzz/artifacts/$target.log"
  mkdir -p fuzz/artifacts
  status=0
  cargo fuzz run -a "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
    -malloc_limit_mb="$rss_mb" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$log" || true
  if [ "$status" != 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed (status $status); the input is in fuzz/artifacts/$target" >&2
    exit 1
  fi
done
