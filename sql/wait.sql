-- Synchronous replication on request: multidb_wait(timeout_ms) returns 1 once this
-- connection's last commit is in the replica, 0 if that did not happen in time.
-- Run from the repository root after `cargo build --release`, with no agent running:
--   MULTIDB_RING=/nonexistent sqlite3 :memory: < sql/wait.sql
-- Each `-- =>` line is the output the statement before it prints; tests/ runs this file.
.load ./target/release/libmultidb

-- Nothing committed yet by this process: nothing to wait for.
SELECT multidb_wait(0);
-- => 1

-- In an application, against a WAL database the agent watches:
--   INSERT INTO orders(total) VALUES (9.5);
--   SELECT multidb_wait(5000);   -- 1 within about sync_interval; 0 if no agent is running
-- (An in-memory database has no WAL and nothing to replicate, so it never waits.)
CREATE TABLE orders(id INTEGER PRIMARY KEY, total REAL);
INSERT INTO orders(total) VALUES (9.5);
SELECT multidb_wait(100);
-- => 1
