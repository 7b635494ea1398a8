#!/usr/bin/env bash
# The seed's walkthrough on an embedded default (a local directory replica, no cloud account):
# installs what a fresh machine lacks to build (not the test peers), builds multidb and libmultidb, and runs `multidb demo`,
# which creates the seed's 24 SQLite databases under ./multidb-demo/data, runs the agent
# against ./multidb-demo/replica, writes to one database with libmultidb loaded, shows it hot
# and replicated, restores it and compares, parses paths, and watches it go cold again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --build
cargo build --release -p multidb-agent -p multidb-ext
exec ./target/release/multidb demo "$@"
