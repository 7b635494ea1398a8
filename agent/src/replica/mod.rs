//! Replica clients: where LTX files go and come back from, behind one small trait.
//!
//! Layout below a database's replica root, as Litestream v0.5 lays it out:
//! - `file`: `ROOT/ltx/<level>/<min:016x>-<max:016x>.ltx` (level in decimal)
//! - `s3`: `PREFIX/<level:04x>/<min:016x>-<max:016x>.ltx`
//!
//! Writes are atomic from a reader's view: a file replica writes a temporary name, fsyncs and
//! renames; an S3 replica makes one PUT per file. A replica is untrusted on the way back: the
//! restore path verifies every file it reads.

pub mod file;
pub mod lease;
pub mod s3;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Level of snapshots (whole databases), as in Litestream.
pub const SNAPSHOT_LEVEL: u8 = 9;

/// Why an expanded location is not a canonical path below its root, or `None` when it is:
/// a file system resolves `.` and `..` and folds `//`, and S3 servers normalise keys the same
/// way, so a location that is not already in that form may land in another database's place
/// (hazard 15). Checked on the whole expanded text, since a value that is safe alone (`.`)
/// is not safe beside literal text (`.{{tenant}}` gives `..`).
pub fn location_fault(location: &str) -> Option<String> {
    let body = location.strip_prefix('/').unwrap_or(location);
    for component in body.split('/') {
        let why = match component {
            "" => "has an empty component (`//`, or a `/` at an end), which is normalised away",
            "." => "has a `.` component, which is normalised away",
            ".." => "has a `..` component, which leaves the replica root",
            _ => continue,
        };
        return Some(why.to_string());
    }
    None
}

/// The identity object naming `db` as the database whose history a location holds, and the
/// fields the pattern captured from its path (`None` for `multidb replicate`, which has no
/// pattern): the same fields on another host, or under another data root, are the same
/// tenant moved, whose history goes on.
pub fn identity_json(db: &str, fields: Option<&crate::discover::pattern::Fields>) -> Vec<u8> {
    let mut body = serde_json::json!({
        "database": db,
        "created_by": {"host": lease::hostname(), "pid": std::process::id()},
        "created_ms": crate::ltx::unix_millis(SystemTime::now()),
    });
    if let Some(fields) = fields {
        body["fields"] = fields_json(fields);
    }
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// The database an identity object names, or why it names none.
pub fn identity_database(bytes: &[u8]) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("{IDENTITY_NAME} is not JSON: {e}"))?;
    value["database"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{IDENTITY_NAME} has no \"database\" string"))
}

fn fields_json(fields: &crate::discover::pattern::Fields) -> serde_json::Value {
    fields
        .0
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Whose history an identity object says a location holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMatch {
    /// It names this database's path.
    Same,
    /// It names another path with the same fields: the tenant moved (another host, another
    /// data root); its history continues here.
    Moved { from: String },
    /// Another database, or an unreadable identity (the message says which).
    Other { holder: String },
}

/// Compares an identity object with the database at `db` whose pattern fields are `fields`.
pub fn identity_match(
    bytes: &[u8],
    db: &str,
    fields: Option<&crate::discover::pattern::Fields>,
) -> IdentityMatch {
    let holder = match identity_database(bytes) {
        Ok(holder) => holder,
        Err(why) => {
            return IdentityMatch::Other {
                holder: format!("an unreadable identity ({why})"),
            }
        }
    };
    if holder == db {
        return IdentityMatch::Same;
    }
    let value = serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_default();
    if value["released"] == true {
        // Handed over on purpose (`multidb release`): whoever writes next goes on.
        return IdentityMatch::Moved { from: holder };
    }
    match (value.get("fields").cloned(), fields) {
        (Some(recorded), Some(fields)) if recorded == fields_json(fields) => {
            IdentityMatch::Moved { from: holder }
        }
        _ => IdentityMatch::Other { holder },
    }
}

/// Marks a location's identity object handed over (`multidb release`): the next database
/// written there continues its history instead of being refused. The database it named, or
/// `None` when there was none or it was handed over already.
pub fn release_identity(client: &dyn ReplicaClient) -> Result<Option<String>, ReplicaError> {
    let Some(bytes) = client.read_identity()? else {
        return Ok(None);
    };
    let mut value = serde_json::from_slice::<serde_json::Value>(&bytes)
        .unwrap_or_else(|_| serde_json::json!({"database": "an unreadable identity"}));
    if !value.is_object() || value["released"] == true {
        return Ok(None);
    }
    let holder = value["database"]
        .as_str()
        .unwrap_or("an unknown database")
        .to_string();
    value["released"] = true.into();
    let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    body.push(b'\n');
    client.replace_identity(&body)?;
    Ok(Some(holder))
}

/// The name of a replica's identity object, at its root: which database's history the
/// location holds (hazard 11 in DESIGN.md). Litestream ignores it: it lists only levels.
pub const IDENTITY_NAME: &str = "multidb.json";

/// One LTX file in a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    pub size: u64,
    /// When the replica stored it (file mtime, S3 LastModified).
    pub created: SystemTime,
}

impl FileInfo {
    /// `<min:016x>-<max:016x>.ltx`.
    pub fn name(&self) -> String {
        file_name(self.min_txid, self.max_txid)
    }
}

/// The file name of an LTX file covering `min..=max`.
pub fn file_name(min: u64, max: u64) -> String {
    format!("{min:016x}-{max:016x}.ltx")
}

/// Parses `<min:016x>-<max:016x>.ltx`; other names are not LTX files of ours.
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".ltx")?;
    let (min, max) = stem.split_once('-')?;
    if min.len() != 16 || max.len() != 16 {
        return None;
    }
    let min = u64::from_str_radix(min, 16).ok()?;
    let max = u64::from_str_radix(max, 16).ok()?;
    (min >= 1 && min <= max).then_some((min, max))
}

/// The mode of copies whose source's mode is unknown: owner only.
pub const PRIVATE_MODE: u32 = 0o600;

/// The mode a copy of `source` gets: the source's read and write bits for group and others
/// (never execute, set-id or sticky bits) and read-write for the owner, who is the agent. A
/// copy is then never more readable than what it copies (issue 10: a 0600 database was
/// replicated 0644). [`PRIVATE_MODE`] when the source cannot be looked at.
pub fn copy_mode(source: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(source).map_or(PRIVATE_MODE, |m| {
        (m.permissions().mode() & 0o066) | PRIVATE_MODE
    })
}

/// Creates `path` with `mode` (narrowed by the umask, never widened), failing if anything is
/// there already, a symlink included: the agent never writes through a name it did not make.
pub fn create_new(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A replica operation that failed, naming where.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{location}: {op}: {error}")]
    Io {
        location: String,
        op: &'static str,
        error: std::io::Error,
    },
    #[error("{location}: not found")]
    NotFound { location: String },
    #[error("s3 bucket {bucket} key {key}: {op}: {message}")]
    S3 {
        bucket: String,
        key: String,
        op: &'static str,
        message: String,
    },
    #[error("replica URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    /// The writer's lease on the location was lost, or not renewed for too long: it must not
    /// write, since another host may own the location now.
    #[error("{location}: not written: this writer's lease there was lost or not renewed for {age_ms} ms (another host may own it now)")]
    LeaseLost { location: String, age_ms: u64 },
}

/// Where one database's LTX files live.
pub trait ReplicaClient: Send + Sync {
    /// The replica root as a URL, for messages and listings.
    fn url(&self) -> String;
    /// The location of one file, for messages (a path or `s3://bucket/key`).
    fn location(&self, level: u8, min: u64, max: u64) -> String;
    /// LTX files at `level`, sorted by `min_txid`.
    fn list(&self, level: u8) -> Result<Vec<FileInfo>, ReplicaError>;
    /// Stores the LTX file at local path `src` as (`level`, `min`, `max`), atomically. `src`
    /// must be synced to disk already; the client may move it instead of copying it.
    fn put(&self, level: u8, min: u64, max: u64, src: &Path) -> Result<(), ReplicaError>;
    /// The file's path when the replica is a local directory, so readers can use it in place
    /// instead of copying it first.
    fn local_path(&self, _level: u8, _min: u64, _max: u64) -> Option<PathBuf> {
        None
    }
    /// Streams the file (`level`, `min`, `max`) into `dst`.
    fn get(&self, level: u8, min: u64, max: u64, dst: &mut dyn Write) -> Result<(), ReplicaError>;
    /// Deletes files; a file already gone is not an error.
    fn delete(&self, files: &[FileInfo]) -> Result<(), ReplicaError>;

    /// The identity object ([`IDENTITY_NAME`]) at the replica's root, if there is one.
    fn read_identity(&self) -> Result<Option<Vec<u8>>, ReplicaError>;

    /// Whether anything was ever written at this replica's root, for a message about an empty
    /// one: an object store has no directories, so there the identity object answers.
    fn exists(&self) -> Result<bool, ReplicaError> {
        Ok(self.read_identity()?.is_some())
    }

    /// Creates the identity object unless one exists (an exclusive create: a link for a
    /// directory, `If-None-Match: *` for S3). Returns false if one already existed.
    fn create_identity(&self, body: &[u8]) -> Result<bool, ReplicaError>;

    /// Replaces the identity object (a moved database's history goes on under its new path).
    /// Only a lease holder calls it.
    fn replace_identity(&self, body: &[u8]) -> Result<(), ReplicaError>;

    /// The lease object ([`lease::LEASE_NAME`]) with its version, if there is one.
    fn read_lease(&self) -> Result<Option<lease::Stored>, ReplicaError>;

    /// Writes the lease object only if there is none (`expected` is `None`) or only if the
    /// current one has the version `expected`: a compare-and-swap. The new version, or `None`
    /// when the condition failed.
    fn write_lease(
        &self,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>, ReplicaError>;

    /// Whether writes through this client are fenced by a lease.
    fn leased(&self) -> bool {
        false
    }
}

/// A parsed replica URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// `file:///abs/dir` or an absolute path.
    File(PathBuf),
    /// `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`.
    S3(s3::S3Location),
}

impl ReplicaUrl {
    pub fn parse(url: &str) -> Result<ReplicaUrl, ReplicaError> {
        let bad = |reason: &str| ReplicaError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file URL needs an absolute path, as in file:///backups/app",
                ));
            }
            return Ok(ReplicaUrl::File(PathBuf::from(path)));
        }
        if url.starts_with('/') {
            return Ok(ReplicaUrl::File(PathBuf::from(url)));
        }
        if url.starts_with("s3://") {
            return s3::S3Location::parse(url).map(ReplicaUrl::S3);
        }
        Err(bad("expected file:///abs/dir or s3://bucket/prefix"))
    }

    /// Opens a client for this location.
    pub fn client(&self) -> Result<Box<dyn ReplicaClient>, ReplicaError> {
        Ok(match self {
            ReplicaUrl::File(root) => Box::new(file::FileReplica::new(root.clone())),
            ReplicaUrl::S3(location) => Box::new(s3::S3Replica::new(location.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_reject_others() {
        assert_eq!(file_name(1, 0x2a), "0000000000000001-000000000000002a.ltx");
        assert_eq!(
            parse_file_name("0000000000000001-000000000000002a.ltx"),
            Some((1, 42))
        );
        for bad in [
            "1-2.ltx",
            "0000000000000002-0000000000000001.ltx",
            "0000000000000000-0000000000000001.ltx",
            "x.ltx",
            "0000000000000001-000000000000002a.ltx.tmp",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_moved_tenant_is_recognised_by_its_fields_and_another_database_is_not() {
        let fields = |tenant: &str| {
            crate::discover::pattern::Fields(vec![
                ("project".into(), "p1".into()),
                ("tenant".into(), tenant.into()),
            ])
        };
        let identity = identity_json("/host-a/p1/acme.db", Some(&fields("acme")));
        let acme = fields("acme");
        assert_eq!(
            identity_match(&identity, "/host-a/p1/acme.db", Some(&acme)),
            IdentityMatch::Same
        );
        assert_eq!(
            identity_match(&identity, "/host-b/p1/acme.db", Some(&acme)),
            IdentityMatch::Moved {
                from: "/host-a/p1/acme.db".into()
            }
        );
        for (db, fields) in [
            ("/host-b/p1/globex.db", Some(fields("globex"))),
            ("/host-b/p1/acme.db", None),
        ] {
            assert!(
                matches!(
                    identity_match(&identity, db, fields.as_ref()),
                    IdentityMatch::Other { .. }
                ),
                "{db}"
            );
        }
        // An identity without fields (issue 9's, or `multidb replicate`'s) names a path only.
        let bare = identity_json("/host-a/p1/acme.db", None);
        assert!(matches!(
            identity_match(&bare, "/host-b/p1/acme.db", Some(&acme)),
            IdentityMatch::Other { .. }
        ));
    }

    #[test]
    fn a_released_identity_is_taken_over_by_any_database() {
        let tmp = tempfile::tempdir().unwrap();
        let replica = file::FileReplica::new(tmp.path().join("r"));
        assert_eq!(release_identity(&replica).unwrap(), None);
        assert!(replica
            .create_identity(&identity_json("/a/acme.db", None))
            .unwrap());
        assert_eq!(
            release_identity(&replica).unwrap().as_deref(),
            Some("/a/acme.db")
        );
        assert_eq!(release_identity(&replica).unwrap(), None, "once");
        let bytes = replica.read_identity().unwrap().unwrap();
        assert!(matches!(
            identity_match(&bytes, "/b/other.db", None),
            IdentityMatch::Moved { .. }
        ));
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            ReplicaUrl::parse("file:///b/app").unwrap(),
            ReplicaUrl::File("/b/app".into())
        );
        assert_eq!(
            ReplicaUrl::parse("/b/app").unwrap(),
            ReplicaUrl::File("/b/app".into())
        );
        assert!(ReplicaUrl::parse("file://relative")
            .unwrap_err()
            .to_string()
            .contains("absolute path"));
        assert!(ReplicaUrl::parse("ftp://x").is_err());
    }
}
