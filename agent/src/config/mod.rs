//! The YAML configuration, in two layers: a raw `serde` shape that refuses unknown keys, then a
//! validated [`Config`] whose every field has been checked.
//!
//! Every error names the file, the line and column, and the field path, as
//! `multidb.yml:7:3: multi_db.max_active: expected a positive integer`, so an operator can go
//! straight to the mistake. Type errors come located from the YAML parser; checks of values are
//! done on the raw layer and located by [`locate`], which follows the block structure of the
//! document to the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
mod replica;
mod yaml;

use replica::replica_template;
pub use replica::{ReplicaKind, ReplicaTemplate};
pub use yaml::parse_duration;
use yaml::{duration_value, listen_addr, locate, too_deep, yaml_error};

use crate::discover::pattern::{Pattern, Template};

/// `max_active` when the file does not say: enough hot databases for a busy host, few enough
/// that their file handles (3 each) fit the usual 4096-descriptor limit.
pub const DEFAULT_MAX_ACTIVE: u32 = 1000;

/// `scan_interval` when the file does not say, as in the seed: a rescan finds databases
/// created, deleted, or written by applications without the extension.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(30);

/// `sync_interval` when the file does not say: Litestream's sync interval. The first commit
/// after a quiet spell is shipped at once; later ones wait at most this long, batched.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// `idle_timeout` when the file does not say: a database with no commit for this long is
/// demoted (final sync, checkpoint, every descriptor closed). Long enough that a tenant in an
/// active session stays hot; short enough that a burst of tenants does not pin `max_active`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `state_dir` when the file does not say, relative to the configuration file's directory.
pub const DEFAULT_STATE_DIR: &str = "multidb-state";

/// The shortest `lease_ttl`: renewals every third of it must still fit a store's round trip.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// The deepest nesting of YAML collections a configuration may have. The file needs 3
/// (`multi_db`, `replica_template`, a value); the YAML parser's time grows faster than
/// linearly with depth (a 100,000-level file took 35 s to refuse), so depth is checked on the
/// text before the parser sees it.
const MAX_YAML_DEPTH: usize = 32;

/// The most hot databases a configuration may ask for: the ring's status table holds at most
/// 2^20 entries and keeps four per hot database, and at three descriptors each this many is
/// already near Linux's default ceiling on a process's descriptors (`fs.nr_open`, 1,048,576).
pub const MAX_ACTIVE_LIMIT: u32 = 1 << 18;

/// A configuration error, already formatted as `file:line:col: field.path: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    multi_db: RawMultiDb,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMultiDb {
    discovery_pattern: Option<String>,
    max_active: Option<Value>,
    scan_interval: Option<Value>,
    sync_interval: Option<Value>,
    idle_timeout: Option<Value>,
    snapshot_interval: Option<Value>,
    retention: Option<Value>,
    state_dir: Option<String>,
    addr: Option<String>,
    replica_template: Option<RawReplica>,
    watch: Option<Value>,
    max_watches: Option<Value>,
    lease_ttl: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    #[serde(rename = "type")]
    kind: Option<String>,
    path: Option<String>,
    bucket: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    force_path_style: Option<bool>,
    litestream_compatible: Option<bool>,
}

/// The validated `multi_db:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiDb {
    pub pattern: Pattern,
    pub max_active: u32,
    pub scan_interval: Duration,
    pub sync_interval: Duration,
    pub idle_timeout: Duration,
    /// Compaction, snapshot and retention policy.
    pub policy: crate::replicate::compaction::Policy,
    /// Where the agent keeps positions and its status socket (relative to the config file).
    pub state_dir: PathBuf,
    /// Prometheus metrics listen address, if any (a bare `:PORT` means loopback).
    pub addr: Option<std::net::SocketAddr>,
    pub replica: Option<ReplicaTemplate>,
    /// Whether leaf directories are watched with inotify (writes by applications without
    /// the extension are then seen at once instead of at the next scan).
    pub watch: bool,
    /// At most this many inotify watches (directories) for this agent; the rest are scanned.
    pub max_watches: Option<u64>,
    /// How long a replica location's lease lasts unless renewed (one owner per location
    /// across hosts).
    pub lease_ttl: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    pub multi_db: MultiDb,
}

impl Config {
    /// Where `fields`' database is replicated, as a path or URL: `None` without a replica
    /// template, the reason when the location is refused. The agent's own expansion, so what
    /// is listed is what would be replicated (or refused).
    pub fn replica_location(
        &self,
        fields: &crate::discover::pattern::Fields,
    ) -> Option<Result<String, String>> {
        let replica = self.multi_db.replica.as_ref()?;
        Some(match replica.url_for(fields) {
            Ok(crate::replica::ReplicaUrl::File(path)) => Ok(path.display().to_string()),
            Ok(crate::replica::ReplicaUrl::S3(location)) => {
                Ok(format!("s3://{}/{}", location.bucket, location.prefix))
            }
            Err(e) => Err(e.to_string()),
        })
    }

    /// A configuration with defaults for everything but the pattern.
    pub fn with_pattern(pattern: Pattern) -> Config {
        Config {
            source: None,
            multi_db: MultiDb {
                pattern,
                max_active: DEFAULT_MAX_ACTIVE,
                scan_interval: DEFAULT_SCAN_INTERVAL,
                sync_interval: DEFAULT_SYNC_INTERVAL,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                policy: crate::replicate::compaction::Policy::default(),
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
                addr: None,
                replica: None,
                watch: true,
                max_watches: None,
                lease_ttl: crate::replica::lease::DEFAULT_LEASE_TTL,
            },
        }
    }

    /// Reads and validates a configuration file; `pattern` (from `--pattern`) replaces the
    /// file's `discovery_pattern`.
    pub fn load(path: &Path, pattern: Option<&str>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let mut config = Config::parse(&text, &path.display().to_string(), pattern)?;
        config.source = Some(path.to_path_buf());
        if config.multi_db.state_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            config.multi_db.state_dir = base.join(&config.multi_db.state_dir);
        }
        Ok(config)
    }

    /// Parses configuration text; `name` is used in error messages.
    pub fn parse(text: &str, name: &str, pattern: Option<&str>) -> Result<Config, ConfigError> {
        if let Some((line, col)) = too_deep(text, MAX_YAML_DEPTH) {
            return Err(ConfigError(format!(
                "{name}:{line}:{col}: nested deeper than {MAX_YAML_DEPTH} levels; a multidb configuration needs 3"
            )));
        }
        let raw: RawFile = serde_yaml::from_str(text).map_err(|e| yaml_error(name, &e))?;
        let at = |field: &[&str], msg: &str| {
            let dotted = field.join(".");
            match locate(text, field) {
                Some((line, col)) => ConfigError(format!("{name}:{line}:{col}: {dotted}: {msg}")),
                None => ConfigError(format!("{name}: {dotted}: {msg}")),
            }
        };
        let m = raw.multi_db;
        let pattern = match (pattern, &m.discovery_pattern) {
            (Some(text), _) => {
                Pattern::new(text).map_err(|e| ConfigError(format!("--pattern: {e}")))?
            }
            (None, Some(text)) => Pattern::new(text)
                .map_err(|e| at(&["multi_db", "discovery_pattern"], &e.to_string()))?,
            (None, None) => return Err(at(&["multi_db"], "missing field `discovery_pattern`")),
        };
        let max_active = match &m.max_active {
            None => DEFAULT_MAX_ACTIVE,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| at(&["multi_db", "max_active"], "expected a positive integer"))
                .and_then(|n| {
                    if n > MAX_ACTIVE_LIMIT {
                        Err(at(
                            &["multi_db", "max_active"],
                            &format!("{n} is more than {MAX_ACTIVE_LIMIT}, the most hot databases one agent can hold"),
                        ))
                    } else {
                        Ok(n)
                    }
                })?,
        };
        let scan_interval = match &m.scan_interval {
            None => DEFAULT_SCAN_INTERVAL,
            Some(v) => duration_value(v).map_err(|msg| at(&["multi_db", "scan_interval"], &msg))?,
        };
        let duration = |v: &Option<Value>, name: &str, default: Duration| match v {
            None => Ok(default),
            Some(v) => duration_value(v).map_err(|msg| at(&["multi_db", name], &msg)),
        };
        let sync_interval = duration(&m.sync_interval, "sync_interval", DEFAULT_SYNC_INTERVAL)?;
        let idle_timeout = duration(&m.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?;
        let defaults = crate::replicate::compaction::Policy::default();
        let policy = crate::replicate::compaction::Policy {
            snapshot_interval: duration(
                &m.snapshot_interval,
                "snapshot_interval",
                defaults.snapshot_interval,
            )?,
            retention: duration(&m.retention, "retention", defaults.retention)?,
            ..defaults
        };
        let state_dir = match &m.state_dir {
            None => PathBuf::from(DEFAULT_STATE_DIR),
            Some(dir) if dir.is_empty() => {
                return Err(at(&["multi_db", "state_dir"], "must not be empty"))
            }
            Some(dir) => PathBuf::from(dir),
        };
        let addr = match &m.addr {
            None => None,
            Some(text) => Some(listen_addr(text).map_err(|msg| at(&["multi_db", "addr"], &msg))?),
        };
        let lease_ttl = duration(
            &m.lease_ttl,
            "lease_ttl",
            crate::replica::lease::DEFAULT_LEASE_TTL,
        )?;
        if lease_ttl < MIN_LEASE_TTL {
            return Err(at(
                &["multi_db", "lease_ttl"],
                &format!(
                    "must be at least {} s: it is renewed every third of it",
                    MIN_LEASE_TTL.as_secs()
                ),
            ));
        }
        let replica = match m.replica_template {
            None => None,
            Some(r) => Some(replica_template(r, &pattern, &at)?),
        };
        let watch = match &m.watch {
            None => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| at(&["multi_db", "watch"], "expected true or false"))?,
        };
        let max_watches = match &m.max_watches {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                at(
                    &["multi_db", "max_watches"],
                    "expected a non-negative integer",
                )
            })?),
        };
        Ok(Config {
            source: None,
            multi_db: MultiDb {
                pattern,
                max_active,
                scan_interval,
                sync_interval,
                idle_timeout,
                policy,
                state_dir,
                addr,
                replica,
                watch,
                max_watches,
                lease_ttl,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
# Multi-database configuration
multi_db:
  discovery_pattern: "/data/*/databases/*/branches/*/tenants/*.db"
  max_active: 1000
  scan_interval: 30s
  replica_template:
    type: s3
    bucket: my-backup-bucket
    path: "{{project}}/{{database}}/{{branch}}/{{tenant}}"
"#;

    #[test]
    fn seed_block_loads_verbatim() {
        let c = Config::parse(SEED, "multidb.yml", None).unwrap();
        assert_eq!(c.multi_db.max_active, 1000);
        assert_eq!(c.multi_db.scan_interval, Duration::from_secs(30));
        let r = c.multi_db.replica.unwrap();
        assert_eq!(r.kind, ReplicaKind::S3);
        assert_eq!(r.bucket.as_deref(), Some("my-backup-bucket"));
        assert_eq!(
            c.multi_db.pattern.names(),
            ["project", "database", "branch", "tenant"]
        );
    }

    #[test]
    fn agent_keys_have_defaults_and_load() {
        let c = Config::parse(SEED, "multidb.yml", None).unwrap().multi_db;
        assert_eq!(c.sync_interval, DEFAULT_SYNC_INTERVAL);
        assert_eq!(c.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.policy, crate::replicate::compaction::Policy::default());
        assert_eq!(c.addr, None);
        let text = "multi_db:\n  discovery_pattern: \"/d/*.db\"\n  sync_interval: 200ms\n  idle_timeout: 5s\n  retention: 1h\n  state_dir: st\n  addr: \":9464\"\n";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.yml");
        std::fs::write(&file, text).unwrap();
        let c = Config::load(&file, None).unwrap().multi_db;
        assert_eq!(c.sync_interval, Duration::from_millis(200));
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert!(c.watch, "inotify is on by default");
        assert_eq!(c.max_watches, None);
        assert_eq!(c.lease_ttl, crate::replica::lease::DEFAULT_LEASE_TTL);
        let short = Config::parse(
            "multi_db:\n  discovery_pattern: \"/d/*.db\"\n  lease_ttl: 2s\n",
            "t",
            None,
        )
        .unwrap();
        assert_eq!(short.multi_db.lease_ttl, Duration::from_secs(2));
        assert_eq!(c.policy.retention, Duration::from_secs(3600));
        assert_eq!(c.state_dir, dir.path().join("st"));
        assert_eq!(c.addr, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn example_file_loads() {
        let text = include_str!("../../../multidb.example.yml");
        Config::parse(text, "multidb.example.yml", None).unwrap();
    }

    fn template(kind: &str, path: &str) -> ReplicaTemplate {
        let bucket = if kind == "s3" { "\n    bucket: b" } else { "" };
        let text = format!(
            "multi_db:\n  discovery_pattern: \"/d/*/databases/*/branches/*/tenants/*.db\"\n  replica_template:\n    type: {kind}{bucket}\n    path: \"{path}\"\n"
        );
        Config::parse(&text, "m.yml", None)
            .unwrap()
            .multi_db
            .replica
            .unwrap()
    }

    /// Issue 10, cases 1 and 2: values checked one by one let `..db` (tenant `.`) write
    /// outside the root beside literal text, and alias another location in an S3 key.
    #[test]
    fn regression_10_expanded_locations_are_checked_whole() {
        let pattern = Pattern::new("/d/*/databases/*/branches/*/tenants/*.db").unwrap();
        let fields = |db: &str| {
            pattern
                .parse(&format!("/d/p1/databases/d1/branches/main/tenants/{db}"))
                .unwrap()
        };
        let beside = template("file", "/r/replica/.{{tenant}}/{{project}}-{{branch}}");
        let e = beside.url_for(&fields("..db")).unwrap_err().to_string();
        assert!(e.contains("tenant value \".\" is `.`"), "{e}");
        let dotted = template("file", "/r/replica/x{{tenant}}/{{project}}");
        let e = dotted.url_for(&fields("acme.db")).map(|_| ());
        assert_eq!(e, Ok(()));
        let s3 = template("s3", "{{project}}/{{database}}/{{branch}}/{{tenant}}");
        let e = s3.url_for(&fields("..db")).unwrap_err().to_string();
        assert!(e.contains("is `.`"), "{e}");
        match s3.url_for(&fields("acme.db")).unwrap() {
            crate::replica::ReplicaUrl::S3(l) => assert_eq!(l.prefix, "p1/d1/main/acme"),
            other => panic!("{other:?}"),
        }
        // Values that are fine alone but not beside the template's literal text.
        let pattern = Pattern::new("/d/{a}x{b}.db").unwrap();
        let t = ReplicaTemplate {
            path: Template::new("/r/{{a}}/.{{b}}", pattern.names()).unwrap(),
            ..beside.clone()
        };
        let f = pattern.parse("/d/yx..db").unwrap();
        assert_eq!(f.get("b"), Some("."));
        let f2 = pattern.parse("/d/yx.a.db").unwrap();
        assert!(t.url_for(&f2).is_ok());
        let t = ReplicaTemplate {
            path: Template::new("/r/{{a}}.{{b}}/", pattern.names()).unwrap(),
            ..beside
        };
        let e = t.url_for(&f2).unwrap_err().to_string();
        assert_eq!(
            e,
            "replica location `/r/y..a/` of the database with a=y b=.a has an empty component (`//`, or a `/` at an end), which is normalised away"
        );
    }

    #[test]
    fn regression_10_templates_and_buckets_that_cannot_work_are_config_errors() {
        let base = "multi_db:\n  discovery_pattern: \"/d/*/*.db\"\n  replica_template:\n";
        for (extra, expected) in [
            (
                "    type: s3\n    bucket: \"a/b\"\n    path: \"{{1}}\"\n",
                "m.yml:5:5: multi_db.replica_template.bucket: `a/b` is not a bucket name",
            ),
            (
                "    path: \"/r/./{{1}}/{{2}}\"\n",
                "m.yml:4:5: multi_db.replica_template.path: `/r/./{{1}}/{{2}}` has a `.` component",
            ),
            (
                "    type: s3\n    bucket: b\n    path: \"{{1}}//{{2}}\"\n",
                "m.yml:6:5: multi_db.replica_template.path: `{{1}}//{{2}}` has an empty component",
            ),
            (
                "    path: \"/r/{{1/{{2}}\"\n",
                "m.yml:4:5: multi_db.replica_template.path: unclosed `{{` in `/r/{{1/{{2}}`",
            ),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), "m.yml", None)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{extra}: {e}");
        }
    }

    /// Issue 10, case 8: 100,000 levels took the parser 35 s to refuse.
    #[test]
    fn regression_10_deep_nesting_is_refused_before_parsing() {
        let depth = 100_000;
        let flow = format!(
            "multi_db:\n  discovery_pattern: {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        // Block nesting needs a line per level and its indentation: 1,000 is text enough.
        let block: String = (0..1000)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let dashes = format!("{}1\n", "- ".repeat(depth));
        for text in [flow, block, dashes] {
            let started = std::time::Instant::now();
            let e = error_of(&text);
            assert!(e.contains("nested deeper than 32 levels"), "{e}");
            // Not a timing assertion of speed, a bound on a runaway: it took 35 s.
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        // Brackets in quoted scalars and comments are not nesting.
        let quoted = format!(
            "multi_db:\n  discovery_pattern: \"/d/{}*.db\" # {}\n",
            "[".repeat(40),
            "{".repeat(40)
        );
        assert!(error_of(&quoted).contains("glob syntax `[`"));
    }

    #[test]
    fn regression_10_max_active_beyond_what_one_agent_can_hold_is_a_config_error() {
        let e = error_of("multi_db:\n  discovery_pattern: \"/d/*.db\"\n  max_active: 1000000000\n");
        assert_eq!(e, "multidb.yml:3:3: multi_db.max_active: 1000000000 is more than 262144, the most hot databases one agent can hold");
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, "multidb.yml", None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_configs_name_file_line_column_and_field() {
        let base = "multi_db:\n  discovery_pattern: \"/data/*/x/*.db\"\n";
        let cases: &[(&str, &str)] = &[
            ("  max_active: 0\n", "multidb.yml:3:3: multi_db.max_active: expected a positive integer"),
            ("  max_active: lots\n", "multidb.yml:3:3: multi_db.max_active: expected a positive integer"),
            (
                "  scan_interval: 30\n",
                "multidb.yml:3:3: multi_db.scan_interval: needs a unit, as in `30s`, `5m` or `1h`",
            ),
            (
                "  scan_interval: soon\n",
                "multidb.yml:3:3: multi_db.scan_interval: `soon` is not a duration such as `200ms`, `30s`, `5m` or `1h`",
            ),
            (
                "  max_actve: 3\n",
                "multidb.yml:3:3: multi_db: unknown field `max_actve`, expected one of `discovery_pattern`, `max_active`, `scan_interval`, `sync_interval`, `idle_timeout`, `snapshot_interval`, `retention`, `state_dir`, `addr`, `replica_template`, `watch`, `max_watches`, `lease_ttl`",
            ),
            (
                "  replica_template:\n    type: s3\n    path: \"{{project}}/{{tenant}}\"\n    bucket: b\n",
                "multidb.yml:5:5: multi_db.replica_template.path: unknown name `{{project}}`; the pattern captures 1, 2",
            ),
            ("  idle_timeout: 0ms\n", "multidb.yml:3:3: multi_db.idle_timeout: `0ms` must be longer than zero"),
            ("  sync_interval: 1\n", "multidb.yml:3:3: multi_db.sync_interval: needs a unit, as in `30s`, `5m` or `1h`"),
            (
                "  lease_ttl: 500ms\n",
                "multidb.yml:3:3: multi_db.lease_ttl: must be at least 1 s: it is renewed every third of it",
            ),
            (
                "  addr: everywhere\n",
                "multidb.yml:3:3: multi_db.addr: `everywhere` is not a listen address such as `127.0.0.1:9090` or `:9090`",
            ),
            (
                "  replica_template:\n    type: ftp\n    path: /x\n",
                "multidb.yml:4:5: multi_db.replica_template.type: unknown replica type `ftp`; expected `file` or `s3`",
            ),
            (
                "  replica_template:\n    type: s3\n    path: \"{{1}}\"\n",
                "multidb.yml:3:3: multi_db.replica_template: `type: s3` needs a `bucket`",
            ),
            (
                "  replica_template:\n    path: \"backups/{{1}}\"\n",
                "multidb.yml:4:5: multi_db.replica_template.path: a file replica needs an absolute directory template",
            ),            ("  watch: maybe\n", "multidb.yml:3:3: multi_db.watch: expected true or false"),
            ("  max_watches: -1\n", "multidb.yml:3:3: multi_db.max_watches: expected a non-negative integer"),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                &error_of(&format!("{base}{extra}")),
                expected,
                "config:\n{base}{extra}"
            );
        }
        assert_eq!(
            error_of("multi_db:\n  discovery_pattern: \"/data/**/x.db\"\n"),
            "multidb.yml:2:3: multi_db.discovery_pattern: pattern `/data/**/x.db`: recursive `**` is not supported; use `*` or `{name}` within one segment"
        );
        assert_eq!(
            error_of("multi_db:\n  max_active: 3\n"),
            "multidb.yml:1:1: multi_db: missing field `discovery_pattern`"
        );
        assert_eq!(
            error_of("other: 1\n"),
            "multidb.yml:1:1: unknown field `other`, expected `multi_db`"
        );
    }

    /// Issue 11, item 5: `litestream_compatible` is off unless asked for, and only a boolean.
    #[test]
    fn litestream_compatible_is_a_validated_boolean() {
        let base = "multi_db:\n  discovery_pattern: \"/d/*.db\"\n  replica_template:\n    path: \"/r/{{1}}\"\n";
        let load = |extra: &str| Config::parse(&format!("{base}{extra}"), "multidb.yml", None);
        let compatible = |c: Config| c.multi_db.replica.unwrap().litestream_compatible;
        assert!(!compatible(load("").unwrap()));
        assert!(compatible(
            load("    litestream_compatible: true\n").unwrap()
        ));
        assert!(!compatible(
            load("    litestream_compatible: false\n").unwrap()
        ));
        let e = load("    litestream_compatible: sometimes\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "multidb.yml:5:28: multi_db.replica_template.litestream_compatible: invalid type: \
             string \"sometimes\", expected a boolean"
        );
    }
}
