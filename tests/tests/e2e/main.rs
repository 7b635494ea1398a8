//! End-to-end tests: one binary, a module per topic.

mod agent;
mod attacks;
mod cli;
mod extension;
mod fleet;
mod follow;
mod full_disk;
mod hostile;
mod integrity;
mod lease;
mod litestream;
mod replicate;
mod ring;
mod s3;
mod scale;
mod watch;
