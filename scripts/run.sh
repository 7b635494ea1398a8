#!/usr/bin/env bash
# The seed's walkthrough on an embedded default (a local directory replica, no cloud account):
# builds multidb and libmultidb, creates the seed's tree of 24 real SQLite databases under
# ./multidb-demo/data, lists what the pattern discovers, then writes to one database with
# libmultidb loaded, replicates it, restores it and checks the restore equals the source.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p multidb-agent -p multidb-ext
multidb=./target/release/multidb
demo="$PWD/multidb-demo"
rm -rf "$demo"
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
export MULTIDB_RING="$demo/multidb.ring" MULTIDB_LOG=warn
step() { printf '\n== %s\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "create the seed's 24 databases" $multidb generate --root "$demo/data" --sqlite
step "discover them" $multidb --config "$demo/multidb.yml" databases
db="$demo/data/project1/databases/userdb/branches/main/tenants/acme.db"
step "parse one path" $multidb --config "$demo/multidb.yml" parse "$db"

replica="file://$demo/replica/project1/userdb/main/acme"
"$multidb" ring tail --idle-exit 3s > "$demo/ring.log" 2>&1 &
tail_pid=$!
sleep 0.5
step "write with libmultidb loaded (the ring tells the agent)" sqlite3 "$db" \
  ".load ./target/release/libmultidb" \
  "INSERT INTO items(name) VALUES ('written by the demo');" \
  "SELECT json_extract(multidb_status(), '$.agent.running') AS agent_running;"
wait "$tail_pid" || true
step "the commit signal the agent received" cat "$demo/ring.log"
step "replicate it" $multidb replicate --once "$db" "$replica"
step "the replica's LTX files" $multidb --config "$demo/multidb.yml" ltx "$db"
step "restore it" $multidb restore -o "$demo/restored.db" "$replica"
if diff <(sqlite3 "$db" .dump) <(sqlite3 "$demo/restored.db" .dump) >/dev/null; then
  echo "restored database equals the source"
else
  echo "restored database differs from the source" >&2
  exit 1
fi
