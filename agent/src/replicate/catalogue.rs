//! The catalogue of a replica root: every replica the configuration's template can have
//! written, found by one walk rather than by asking about each database.
//!
//! A directory root is walked level by level, reading only directories whose names the
//! template's component at that level can match (no symlink is followed). An S3 root is read
//! with one ListObjectsV2 request per 1,000 keys under the template's fixed prefix, whatever
//! the number of databases: keys sharing a replica's prefix come together in key order, so
//! each replica's files are complete when the next replica's first key arrives, and only one
//! replica's files are held at a time. (A walk with a delimiter would cost a request for every
//! directory level of every project and branch, and a listing per database five.) Each
//! location found is read back into its database path through [`Inverse`]; a location that
//! reads back into none is reported, never guessed.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{Config, ReplicaKind, ReplicaTemplate};
use crate::discover::pattern::{Fields, Inverse};
use crate::replica::{FileInfo, ReplicaClient, ReplicaError};

/// Why the replica root could not be walked at all.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("the configuration has no replica_template, so there is no replica root to read")]
    NoTemplate,
    #[error("{0}")]
    NotInvertible(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("the walk of the replica root panicked")]
    Panicked,
}

/// Replicas waiting for a worker, per worker: enough that a worker never waits for the walk,
/// few enough that what is queued (a listing each) stays small.
const QUEUED_PER_JOB: usize = 4;

/// Checks that the identity object of `client`'s replica, if it has one, names the database at
/// `path` or the same tenant (`fields`) under another path: a location that reads back into
/// one path but holds another database's history is misfiled, and is never taken for this
/// database. `has_identity` false (a walk saw no
/// identity object) saves the request. Returns whether an identity was found.
pub fn check_identity(
    client: &dyn ReplicaClient,
    path: &str,
    fields: &Fields,
    has_identity: bool,
) -> Result<bool, String> {
    if !has_identity {
        return Ok(false);
    }
    let Some(bytes) = client.read_identity().map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    let holder = crate::replica::identity_database(&bytes)
        .map_err(|why| format!("{}: {why}", client.url()))?;
    // The agent names a database by its discovered path, `multidb replicate` as it was given.
    let same = holder == path
        || std::path::absolute(&holder)
            .ok()
            .zip(std::path::absolute(path).ok())
            .is_some_and(|(a, b)| a == b);
    // The same tenant under another data root (a host with another layout, a tenant moved)
    // recorded the same fields: its history is this database's, as a single restore says.
    let moved = || {
        !matches!(
            crate::replica::identity_match(&bytes, path, Some(fields)),
            crate::replica::IdentityMatch::Other { .. }
        )
    };
    if !same && !moved() {
        return Err(format!(
            "the replica {} holds the history of {holder}, not of this database",
            client.url()
        ));
    }
    Ok(true)
}

/// The files of one replica, as a walk that saw all of them found them.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Sorted as [`crate::replicate::restore::list_all`] sorts them.
    pub files: Vec<FileInfo>,
    /// Whether the replica's identity object ([`crate::replica::IDENTITY_NAME`]) exists.
    pub has_identity: bool,
}

/// One replica location under the root.
#[derive(Debug)]
pub struct Found {
    /// The template's expansion: a directory, or an S3 key prefix.
    pub location: String,
    /// The database it belongs to and its fields, or why the location names none.
    pub database: Result<(String, Fields), String>,
    /// Its files when the walk saw them (S3); a directory replica is listed when needed.
    pub listing: Option<Listing>,
}

/// A place the walk could not read: its replicas are unknown, which callers must report.
#[derive(Debug)]
pub struct Unreadable {
    pub location: String,
    pub error: String,
}

/// Walks a configuration's replica root.
pub struct Catalogue {
    template: ReplicaTemplate,
    inverse: Inverse,
}

impl Catalogue {
    /// The catalogue of `config`'s replica root; refuses a template that cannot be read back.
    pub fn new(config: &Config) -> Result<Catalogue, CatalogueError> {
        let template = config
            .multi_db
            .replica
            .clone()
            .ok_or(CatalogueError::NoTemplate)?;
        let inverse = template
            .path
            .inverse(&config.multi_db.pattern)
            .map_err(|e| CatalogueError::NotInvertible(e.to_string()))?;
        Ok(Catalogue { template, inverse })
    }

    /// The root walked, as a path or URL, for messages.
    pub fn root(&self) -> String {
        let root = self.inverse.root();
        match self.template.kind {
            ReplicaKind::File => root,
            ReplicaKind::S3 => format!(
                "s3://{}/{root}",
                self.template.bucket.as_deref().unwrap_or_default()
            ),
        }
    }

    /// A client for the replica of the database with `fields`.
    pub fn client(&self, fields: &Fields) -> Result<Box<dyn ReplicaClient>, String> {
        let url = self.template.url_for(fields).map_err(|e| e.to_string())?;
        url.client().map_err(|e| e.to_string())
    }

    /// Calls `found` for every replica location under the root, in location order, and
    /// `unreadable` for every part of the root that could not be read. `found` returns false
    /// to stop the walk.
    pub fn walk(
        &self,
        found: &mut dyn FnMut(Found) -> bool,
        unreadable: &mut dyn FnMut(Unreadable),
    ) -> Result<(), CatalogueError> {
        match self.template.kind {
            ReplicaKind::File => {
                let root = self.inverse.root();
                let dir = PathBuf::from(if root.is_empty() { "/" } else { &root });
                let mut below = Vec::new();
                self.walk_dir(&dir, &mut below, found, unreadable);
                Ok(())
            }
            ReplicaKind::S3 => self.walk_s3(found),
        }
    }

    /// [`Catalogue::walk`] with `jobs` threads doing `work` on the replicas found, and
    /// `report` receiving their results on the calling thread as they come. The walk feeds the
    /// workers through a bounded queue and waits while they are busy, so memory follows
    /// `jobs`, not the number of replicas. An unreadable part of the root becomes a result
    /// through `unreadable`.
    pub fn walk_parallel<R: Send>(
        &self,
        jobs: usize,
        work: &(dyn Fn(Found) -> R + Sync),
        unreadable: &(dyn Fn(Unreadable) -> R + Sync),
        report: &mut dyn FnMut(R),
    ) -> Result<(), CatalogueError> {
        let jobs = jobs.max(1);
        let (work_tx, work_rx) = crossbeam_channel::bounded::<Found>(jobs * QUEUED_PER_JOB);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<R>(jobs * QUEUED_PER_JOB);
        std::thread::scope(|scope| {
            let walker = {
                let done_tx = done_tx.clone();
                scope.spawn(move || {
                    self.walk(&mut |found| work_tx.send(found).is_ok(), &mut |u| {
                        let _ = done_tx.send(unreadable(u));
                    })
                })
            };
            for _ in 0..jobs {
                let work_rx = work_rx.clone();
                let done_tx = done_tx.clone();
                scope.spawn(move || {
                    for found in work_rx {
                        if done_tx.send(work(found)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            drop(work_rx);
            for result in done_rx {
                report(result);
            }
            walker.join().unwrap_or(Err(CatalogueError::Panicked))
        })
    }

    /// The location of the components `below` the root.
    fn location(&self, below: &[String]) -> String {
        let root = self.inverse.root();
        let joined = below.join("/");
        match (root.as_str(), self.template.kind) {
            ("", ReplicaKind::S3) => joined,
            ("", ReplicaKind::File) => format!("/{joined}"),
            (root, _) => format!("{root}/{joined}"),
        }
    }

    /// Depth-first in name order; returns false when `found` asked to stop.
    fn walk_dir(
        &self,
        dir: &Path,
        below: &mut Vec<String>,
        found: &mut dyn FnMut(Found) -> bool,
        unreadable: &mut dyn FnMut(Unreadable),
    ) -> bool {
        if below.len() == self.inverse.depth() {
            // A directory in a replica's place that holds neither an identity nor a level
            // directory is not a replica (an empty one left by a deleted database, say).
            let is_replica =
                dir.join(crate::replica::IDENTITY_NAME).exists() || dir.join("ltx").is_dir();
            if !is_replica {
                return true;
            }
            let location = self.location(below);
            let database = self.inverse.database(&location);
            return found(Found {
                location,
                database,
                listing: None,
            });
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && below.is_empty() => {
                return true; // no replica root yet: nothing was ever replicated
            }
            Err(e) => {
                unreadable(Unreadable {
                    location: dir.display().to_string(),
                    error: e.to_string(),
                });
                return true;
            }
        };
        let level = below.len();
        let mut names = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    unreadable(Unreadable {
                        location: dir.display().to_string(),
                        error: e.to_string(),
                    });
                    break;
                }
            };
            // `file_type` does not follow links: a symlinked directory is not walked.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue; // a template expansion is text: no location has this name
            };
            if self.inverse.matches(level, &name) {
                names.push(name);
            }
        }
        names.sort_unstable();
        for name in names {
            let path = dir.join(&name);
            below.push(name);
            let go_on = self.walk_dir(&path, below, found, unreadable);
            below.pop();
            if !go_on {
                return false;
            }
        }
        true
    }

    fn walk_s3(&self, found: &mut dyn FnMut(Found) -> bool) -> Result<(), CatalogueError> {
        let client = crate::replica::s3::S3Replica::new(self.s3_location())?;
        let depth = self.inverse.depth();
        let mut current: Option<(String, Listing)> = None;
        let mut stopped = false;
        let mut flush = |group: Option<(String, Listing)>| -> bool {
            let Some((below, mut listing)) = group else {
                return true;
            };
            listing.files.sort_by_key(|f| (f.max_txid, f.level));
            let components: Vec<String> = below.split('/').map(str::to_string).collect();
            let location = self.location(&components);
            let database = self.inverse.database(&location);
            found(Found {
                location,
                database,
                listing: Some(listing),
            })
        };
        client.walk_keys(&mut |key, size, created| {
            let mut parts = key.splitn(depth + 1, '/');
            let mut end = 0;
            for level in 0..depth {
                match parts.next() {
                    Some(name) if self.inverse.matches(level, name) => end += name.len() + 1,
                    _ => return true, // not below a replica location of this template
                }
            }
            let Some(tail) = parts.next() else {
                return true;
            };
            let below = &key[..end - 1];
            if current.as_ref().is_none_or(|(b, _)| b != below) {
                if !flush(current.take()) {
                    stopped = true;
                    return false;
                }
                current = Some((below.to_string(), Listing::default()));
            }
            let Some((_, listing)) = current.as_mut() else {
                return true;
            };
            if tail == crate::replica::IDENTITY_NAME {
                listing.has_identity = true;
            } else if let Some(file) = s3_file(tail, size, created) {
                listing.files.push(file);
            }
            true
        })?;
        if !stopped {
            flush(current.take());
        }
        Ok(())
    }

    /// The S3 location of the template's fixed root.
    fn s3_location(&self) -> crate::replica::s3::S3Location {
        crate::replica::s3::S3Location {
            bucket: self.template.bucket.clone().unwrap_or_default(),
            prefix: self.inverse.root(),
            region: self
                .template
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_string()),
            endpoint: self.template.endpoint.clone(),
            force_path_style: self.template.force_path_style,
        }
    }
}

/// `<level:04x>/<min:016x>-<max:016x>.ltx` below a replica's prefix, as Litestream lays
/// S3 replicas out.
fn s3_file(tail: &str, size: u64, created: SystemTime) -> Option<FileInfo> {
    let (level, name) = tail.split_once('/')?;
    if level.len() != 4 {
        return None;
    }
    let level = u8::from_str_radix(level, 16).ok()?;
    let (min, max) = crate::replica::parse_file_name(name)?;
    Some(FileInfo {
        level,
        min_txid: min,
        max_txid: max,
        size,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, template: &str) -> Config {
        let text = format!(
            "multi_db:\n  discovery_pattern: \"{}/data/{{tenant}}/x.db\"\n  replica_template:\n    type: file\n    path: \"{}\"\n",
            dir.display(),
            template
        );
        Config::parse(&text, "test.yml", None).unwrap()
    }

    #[test]
    fn a_directory_root_is_walked_in_order_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        for (name, what) in [
            ("b", "multidb.json"),
            ("a", "ltx/0"),
            ("c", ""),
            ("d.x", "ltx/0"),
        ] {
            std::fs::create_dir_all(root.join(name).join(what).parent().unwrap()).unwrap();
            if what == "multidb.json" {
                std::fs::write(root.join(name).join(what), "{}").unwrap();
            } else if !what.is_empty() {
                std::fs::create_dir_all(root.join(name).join(what)).unwrap();
            }
        }
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();
        let catalogue = Catalogue::new(&config(
            tmp.path(),
            &format!("{}/r/{{{{tenant}}}}", tmp.path().display()),
        ))
        .unwrap();
        assert_eq!(catalogue.root(), root.display().to_string());
        let mut seen = Vec::new();
        catalogue
            .walk(
                &mut |f| {
                    let path = f.database.map(|(p, _)| p).unwrap_or_else(|e| e);
                    seen.push((f.location, path));
                    true
                },
                &mut |u| panic!("{u:?}"),
            )
            .unwrap();
        let d = tmp.path().display();
        assert_eq!(
            seen,
            [
                (format!("{d}/r/a"), format!("{d}/data/a/x.db")),
                (format!("{d}/r/b"), format!("{d}/data/b/x.db")),
                (format!("{d}/r/d.x"), format!("{d}/data/d.x/x.db")),
            ],
            "c holds no replica and the symlink is not followed"
        );
    }

    #[test]
    fn s3_keys_name_their_level_and_txids() {
        let at = SystemTime::UNIX_EPOCH;
        let f = s3_file("0009/0000000000000001-0000000000000003.ltx", 7, at).unwrap();
        assert_eq!((f.level, f.min_txid, f.max_txid, f.size), (9, 1, 3, 7));
        for other in [
            "9/0000000000000001-0000000000000003.ltx",
            "0000/notes.txt",
            "0000/old/0000000000000001-0000000000000001.ltx",
            "multidb.json",
        ] {
            assert!(s3_file(other, 1, at).is_none(), "{other}");
        }
    }

    #[test]
    fn an_identity_names_this_path_or_this_tenant_under_another_root() {
        let tmp = tempfile::tempdir().unwrap();
        let fields = |tenant: &str| Fields(vec![("tenant".into(), tenant.into())]);
        let replica = |name: &str, db: &str, recorded: Option<&Fields>| {
            let client = crate::replica::file::FileReplica::new(tmp.path().join(name));
            let body = crate::replica::identity_json(db, recorded);
            assert!(client.create_identity(&body).unwrap());
            client
        };
        let here = "/data/acme/x.db";
        let same = replica("same", here, Some(&fields("acme")));
        assert!(check_identity(&same, here, &fields("acme"), true).unwrap());
        // Written by an agent whose data root was elsewhere: the same tenant.
        let moved = replica("moved", "/old-host/acme/x.db", Some(&fields("acme")));
        assert!(check_identity(&moved, here, &fields("acme"), true).unwrap());
        // Another tenant's history, or one without fields under another path: misfiled.
        let other = replica("other", "/data/globex/x.db", Some(&fields("globex")));
        let e = check_identity(&other, here, &fields("acme"), true).unwrap_err();
        assert!(e.contains("holds the history of /data/globex/x.db"), "{e}");
        let bare = replica("bare", "/elsewhere/x.db", None);
        assert!(check_identity(&bare, here, &fields("acme"), true).is_err());
        // No identity object (Litestream's replicas, older ones): nothing to check.
        let none = crate::replica::file::FileReplica::new(tmp.path().join("none"));
        assert!(!check_identity(&none, here, &fields("acme"), true).unwrap());
    }
}
