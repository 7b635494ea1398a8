#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and fails on any crash, timeout or
# out-of-memory. FUZZ_SECONDS (default 30) is each target's budget; FUZZ_TARGETS (default all)
# names the targets to run. A crash leaves its input in fuzz/artifacts/<target>/ (minimise it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz tmin -a <target> <input>`) and the run's log beside it.
#
# libFuzzer needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. cargo-fuzz is installed into ~/.cargo/bin the first time. The instrumented
# build and the corpora live outside the checkout (FUZZ_CACHE, default ~/.cache/multidb-fuzz),
# so a fresh clone rebuilds only the crates that changed and each run starts from the corpus
# the previous runs grew, plus the committed seeds (fuzz/seeds/<target>).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
cache=${FUZZ_CACHE:-$HOME/.cache/multidb-fuzz}
# Slower than this per input is a hang; more memory than this is an allocation the input does
# not justify (the largest legitimate one, a restore of 64 KiB pages, needs a few MiB).
timeout=10
memory_mb=1024

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
unset CARGO_TARGET_DIR
target_dir="$cache/target"
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
# One build for every target (they share all dependencies); -a keeps overflow checks and
# debug assertions on, as in the unit tests.
cargo fuzz build -a --target-dir "$target_dir"
mkdir -p fuzz/artifacts
for target in $targets; do
  corpus="$cache/corpus/$target"
  mkdir -p "$corpus"
  extra=()
  # Restore's scoped threads free their thread-locals after the join that ends the input, so
  # LeakSanitizer reports std's channel context (160 bytes) as leaked; a false positive.
  [ "$target" = restore_dir ] && extra+=(-detect_leaks=0)
  echo "fuzz: $target for ${seconds}s" >&2
  log="fuzz/artifacts/$target.log"
  status=0
  cargo fuzz run -a --target-dir "$target_dir" "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$memory_mb" \
    -malloc_limit_mb="$memory_mb" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  if [ "$status" != 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed (status $status); the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
