#!/usr/bin/env bash
# The seed's walkthrough on an embedded default: builds multidb, creates the seed's tree of 24
# real SQLite databases under ./multidb-demo/data, and lists what the pattern discovers with
# each database's fields and its replica directory under ./multidb-demo/replica.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p multidb-agent -p multidb-ext
demo="$PWD/multidb-demo"
mkdir -p "$demo"
cat > "$demo/multidb.yml" <<YML
multi_db:
  discovery_pattern: "$demo/data/*/databases/*/branches/*/tenants/*.db"
  max_active: 10
  scan_interval: 30s
  replica_template:
    type: file
    path: "$demo/replica/{{project}}/{{database}}/{{branch}}/{{tenant}}"
YML
./target/release/multidb generate --root "$demo/data" --sqlite
./target/release/multidb --config "$demo/multidb.yml" databases
./target/release/multidb --config "$demo/multidb.yml" parse "$demo/data/project1/databases/userdb/branches/main/tenants/acme.db"
