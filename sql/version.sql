-- Which build of libmultidb is loaded.
-- Run from the repository root after `cargo build --release`:
--   sqlite3 :memory: < sql/version.sql
-- Each `-- =>` line is the output the statement before it prints; tests/ runs this file and
-- compares.
.load ./target/release/libmultidb
SELECT multidb_version();
-- => v0.1.0
