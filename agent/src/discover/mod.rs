//! Discovery: which databases exist, what their paths say (the pattern's fields), where each
//! is replicated, and the compact arena that remembers them between scans.

pub mod arena;
pub mod collisions;
pub mod discovery;
pub mod pattern;

use crate::config::Config;

/// Discovers with a fresh arena and logs what the scan could not read, and where the pattern
/// stops matching when it matches nothing.
pub fn discover(
    config: &Config,
) -> Result<(arena::Arena, discovery::ScanReport), discovery::DiscoveryError> {
    let pattern = &config.multi_db.pattern;
    let mut arena = arena::Arena::new(pattern.root());
    let report = discovery::scan(pattern, &mut arena)?;
    for (dir, why) in &report.unreadable {
        tracing::warn!(dir = %dir, error = %why, "directory not readable; its databases keep their last state");
    }
    for (path, why) in &report.skipped {
        tracing::warn!(path = %path, reason = %why, "skipped");
    }
    if arena.is_empty() {
        if let Some(miss) = discovery::first_unmatched(pattern) {
            tracing::warn!(pattern = %pattern.as_str(), "the pattern matches no database: {miss}");
        }
    }
    Ok((arena, report))
}
