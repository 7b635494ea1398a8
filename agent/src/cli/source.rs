//! What a command acts on: the configuration (`--config`, `./multidb.yml` or `--pattern`),
//! and the replica a `SOURCE` argument names (a URL, or a database path expanded through the
//! configuration's `replica_template`), checked to hold that database's history.

use std::path::PathBuf;

use super::{Cli, Failure};
use crate::config::Config;
use crate::replica::ReplicaUrl;

/// The configuration file used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "multidb.yml";

/// The configuration: `--config FILE`, else `./multidb.yml` if it exists, else `--pattern` alone.
pub fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let pattern = cli.pattern.as_deref();
    let path = match &cli.config {
        Some(path) => path.clone(),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() || pattern.is_none() => {
            PathBuf::from(DEFAULT_CONFIG)
        }
        None => {
            let pattern = crate::discover::pattern::Pattern::new(pattern.unwrap_or_default())
                .map_err(|e| Failure::Usage(anyhow::anyhow!("--pattern: {e}")))?;
            return Ok(Config::with_pattern(pattern));
        }
    };
    if cli.config.is_none() && !path.exists() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "no configuration: ./{DEFAULT_CONFIG} does not exist; pass --config FILE or --pattern PATTERN"
        )));
    }
    Config::load(&path, pattern).map_err(|e| Failure::Usage(e.into()))
}

/// A relative database path as the pattern spells paths: against the working directory
/// when the pattern is absolute, so `restore -o x.db tenants/acme.db` works from inside the
/// tree as it does from anywhere else.
pub(super) fn absolute_for(pattern: &crate::discover::pattern::Pattern, path: &str) -> String {
    if path.starts_with('/') || !pattern.root().starts_with('/') {
        return path.to_string();
    }
    match std::env::current_dir() {
        Ok(cwd) => {
            let joined = cwd.join(path.trim_start_matches("./"));
            joined
                .to_str()
                .map_or_else(|| path.to_string(), str::to_string)
        }
        Err(_) => path.to_string(),
    }
}

pub(super) fn is_url(source: &str) -> bool {
    source.starts_with("file://") || source.starts_with("s3://")
}

/// Restoring a database by its path: the replica its template names must hold that
/// database's history (its identity object says whose), never another's.
pub(super) fn check_replica_identity(
    client: &dyn crate::replica::ReplicaClient,
    source: &str,
    fields: Option<&crate::discover::pattern::Fields>,
) -> Result<(), Failure> {
    if source.starts_with("file://") || source.starts_with("s3://") {
        return Ok(()); // a URL names the replica itself
    }
    let Some(bytes) = client.read_identity().map_err(anyhow::Error::from)? else {
        return Ok(()); // written before identities, or by Litestream
    };
    let holder = crate::replica::identity_database(&bytes)
        .map_err(|why| anyhow::anyhow!("{}: {why}", client.url()))?;
    let absolute = std::path::absolute(source)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| source.to_string());
    if holder == source
        || crate::replica::identity_match(&bytes, &absolute, fields)
            != (crate::replica::IdentityMatch::Other {
                holder: holder.clone(),
            })
    {
        // The same database, or the same tenant's history under another path (moved).
        return Ok(());
    }
    Err(Failure::Runtime(anyhow::anyhow!(
        "{source}: the replica {} holds the history of {holder}, not of this database; refusing to restore another database's data (restore it by its URL if that is what you want)",
        client.url()
    )))
}

/// The pattern fields of a database named by its path, when the configuration has them.
pub(super) fn source_fields(cli: &Cli, source: &str) -> Option<crate::discover::pattern::Fields> {
    if is_url(source) {
        return None;
    }
    let config = load_config(cli).ok()?;
    let pattern = &config.multi_db.pattern;
    pattern.parse(&absolute_for(pattern, source)).ok()
}

/// The replica named by `source`: a URL, or a database path expanded through the
/// configuration's `replica_template`.
pub(super) fn replica_for(cli: &Cli, source: &str) -> Result<ReplicaUrl, Failure> {
    if is_url(source) {
        return ReplicaUrl::parse(source).map_err(|e| Failure::Usage(e.into()));
    }
    // A database is a file: a directory given here is a replica named without its scheme.
    if std::path::Path::new(source).is_dir() {
        let absolute = std::path::absolute(source)
            .map_or_else(|_| source.to_string(), |p| p.display().to_string());
        return Err(Failure::Usage(anyhow::anyhow!(
            "{source} is a directory, not a database; to read it as a replica, pass file://{absolute}"
        )));
    }
    let config = load_config(cli)?;
    let pattern = &config.multi_db.pattern;
    let source = &absolute_for(pattern, source);
    let fields = pattern.parse(source).map_err(|why| {
        Failure::Usage(anyhow::anyhow!(
            "{source} is not a replica URL and does not match {}: it {why}",
            pattern.as_str()
        ))
    })?;
    let template = config.multi_db.replica.as_ref().ok_or_else(|| {
        Failure::Usage(anyhow::anyhow!(
            "{source}: the configuration has no replica_template"
        ))
    })?;
    template
        .url_for(&fields)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("{source}: {e}")))
}
