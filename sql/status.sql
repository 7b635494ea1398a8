-- What libmultidb reports about this connection, and the checkpoint threshold it keeps.
-- Run from the repository root after `cargo build --release`, with no agent running:
--   MULTIDB_RING=/nonexistent sqlite3 :memory: < sql/status.sql
-- Each `-- =>` line is the output the statement before it prints; tests/ runs this file.
.load ./target/release/libmultidb

-- The functions the extension adds.
SELECT name FROM pragma_function_list WHERE name LIKE 'multidb%' ORDER BY name;
-- => multidb_autocheckpoint
-- => multidb_status
-- => multidb_version
-- => multidb_wait

-- No agent and no ring: the tier is unknown and SQLite's own checkpoint policy applies.
-- (An in-memory database has an empty path.)
SELECT multidb_status();
-- => {"agent":{"heartbeat_age_ms":null,"pid":null,"running":false},"database":{"committed_frames":null,"path":"","reason":"no agent is running (no ring file)","replicated":false,"tier":"unknown"},"ring":null}

-- Fields one by one, with SQLite's JSON functions.
SELECT json_extract(multidb_status(), '$.agent.running'), json_extract(multidb_status(), '$.database.tier');
-- => 0|unknown

-- Checkpoint this connection's WAL every 500 frames instead of 1000. Use this, not
-- PRAGMA wal_autocheckpoint, which would replace the extension's WAL hook.
SELECT multidb_autocheckpoint(500);
-- => 500
