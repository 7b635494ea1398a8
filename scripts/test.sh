#!/usr/bin/env bash
# Runs every test: unit and property tests of each crate, then the end-to-end tests that drive
# the real `multidb` binary and the real `sqlite3` shell with the built libmultidb.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --release
cargo test --workspace --release "$@"
