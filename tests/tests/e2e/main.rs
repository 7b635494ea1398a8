//! End-to-end tests: one binary, a module per topic.

mod cli;
mod extension;
mod scale;
