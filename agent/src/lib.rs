//! The multidb agent as a library, in folders by stage so the tree shows the data's way
//! (each arrow points down; nothing below `cli` imports it):
//!
//! - [`cli`]: the commands, printing, signals, the demo, benchmarks and `generate` (top);
//! - [`agent`]: the sidecar: threads and locks, the tier policy, workers, recovery, the ring's
//!   consumer end, status and metrics;
//! - [`discover`]: the pattern, the discovery walk, the arena of cold records, collisions;
//! - [`replicate`]: WAL reading, the replicator and its cycle, checkpoints, compaction and
//!   retention, saved positions, restore;
//! - [`ltx`]: the LTX v3 codec (no I/O beyond `Read`/`Write`);
//! - [`replica`]: the file and S3 clients behind one trait.
//!
//! [`config`] and [`time`] are shared by all. `main.rs` only parses arguments and reports
//! errors; everything else lives here so tests can run it in-process.

pub mod agent;
pub mod cli;
pub mod config;
pub mod discover;
pub mod ltx;
pub mod replica;
pub mod replicate;
pub mod time;
