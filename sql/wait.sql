-- Synchronous replication on request: multidb_wait(timeout_ms) returns 1 once this
-- connection's last commit is in the replica; 0 at once when nothing will replicate it (no
-- agent, a database the agent refuses or that is not in WAL mode), and 0 after the timeout
-- when the replica did not acknowledge in time. 1 is a promise: never said for what the
-- replica does not hold.
-- Run from the repository root after `cargo build --release`, with no agent running:
--   MULTIDB_RING=/nonexistent sqlite3 :memory: < sql/wait.sql
-- Each `-- =>` line is the output the statement before it prints; tests/ runs this file.
.load ./target/release/libmultidb

-- No agent runs here: nothing can be acknowledged, and the answer comes at once.
SELECT multidb_wait(0);
-- => 0

-- In an application, against a WAL database the agent watches:
--   INSERT INTO orders(total) VALUES (9.5);
--   SELECT multidb_wait(5000);   -- 1 within about sync_interval; 0 if no agent is running
-- An in-memory database has no WAL and is never replicated: 0, at once.
CREATE TABLE orders(id INTEGER PRIMARY KEY, total REAL);
INSERT INTO orders(total) VALUES (9.5);
SELECT multidb_wait(100);
-- => 0
SELECT json_extract(multidb_status(), '$.database.replicated'), json_extract(multidb_status(), '$.database.reason');
-- => 0|no agent is running (no ring file)
