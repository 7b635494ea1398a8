//! The multidb agent: discovery of databases by pattern, the arena that keeps them, and the
//! commands built on them. `main.rs` only parses arguments and reports errors; everything
//! else lives here so tests can run it in-process.

pub mod agent;
pub mod arena;
pub mod bench;
pub mod cli;
pub mod collisions;
pub mod compaction;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod generate;
pub mod lock;
pub mod ltx;
pub mod pattern;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod ring;
pub mod signals;
pub mod sqlfile;
pub mod state;
pub mod status;
pub mod time;
pub mod wal;
