//! End-to-end tests: one binary, a module per topic.

mod checkpoint;
mod cli;
mod extension;
mod ring;
mod scale;
