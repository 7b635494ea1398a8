//! Where replicas go: the validated `replica_template` (a file directory or an S3 bucket and
//! prefix, with the pattern's fields in it) and the checks that refuse a template or bucket
//! that could not work, before the agent writes anything.

use super::*;

/// Where replicas go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaKind {
    File,
    S3,
}

/// The replica of each database: the template expanded with its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaTemplate {
    pub kind: ReplicaKind,
    /// `file`: absolute directory; `s3`: key prefix.
    pub path: Template,
    pub bucket: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    /// Write LTX files as Litestream 0.5.17 does, without database checksums, so its restore
    /// accepts them (its issue #1427); restores of such files verify less (see the README).
    pub litestream_compatible: bool,
}

impl ReplicaTemplate {
    /// The replica of the database whose pattern fields are `fields`.
    pub fn url_for(
        &self,
        fields: &crate::discover::pattern::Fields,
    ) -> Result<crate::replica::ReplicaUrl, crate::discover::pattern::TemplateError> {
        let path = self.path.expand(fields)?;
        // The whole location, not its parts: values that are each harmless can still meet
        // literal text in a `..`, or leave a `.` or an empty component that a file system or
        // an S3 server folds into another database's location.
        if let Some(why) = crate::replica::location_fault(&path) {
            return Err(crate::discover::pattern::TemplateError::new(format!(
                "replica location `{path}` of the database with {fields} {why}"
            )));
        }
        Ok(match self.kind {
            ReplicaKind::File => crate::replica::ReplicaUrl::File(PathBuf::from(path)),
            ReplicaKind::S3 => crate::replica::ReplicaUrl::S3(crate::replica::s3::S3Location {
                bucket: self.bucket.clone().unwrap_or_default(),
                prefix: path,
                region: self
                    .region
                    .clone()
                    .unwrap_or_else(|| "us-east-1".to_string()),
                endpoint: self.endpoint.clone(),
                force_path_style: self.force_path_style,
            }),
        })
    }
}

pub(super) fn replica_template(
    r: RawReplica,
    pattern: &Pattern,
    at: &dyn Fn(&[&str], &str) -> ConfigError,
) -> Result<ReplicaTemplate, ConfigError> {
    let field = |name: &'static str| ["multi_db", "replica_template", name];
    let kind = match r.kind.as_deref() {
        None | Some("file") => ReplicaKind::File,
        Some("s3") => ReplicaKind::S3,
        Some(other) => {
            return Err(at(
                &field("type"),
                &format!("unknown replica type `{other}`; expected `file` or `s3`"),
            ))
        }
    };
    let Some(path_text) = r.path else {
        return Err(at(
            &["multi_db", "replica_template"],
            "missing field `path`",
        ));
    };
    let path = Template::new(&path_text, pattern.names())
        .map_err(|e| at(&field("path"), &e.to_string()))?;
    // A template whose literal text is not canonical would refuse every database: say so now.
    let sample = crate::discover::pattern::Fields(
        pattern
            .names()
            .iter()
            .map(|n| (n.clone(), "x".to_string()))
            .collect(),
    );
    if let Some(why) = path
        .expand(&sample)
        .ok()
        .and_then(|p| crate::replica::location_fault(&p))
    {
        return Err(at(&field("path"), &format!("`{path_text}` {why}")));
    }
    match kind {
        ReplicaKind::File => {
            if !path_text.starts_with('/') {
                return Err(at(
                    &field("path"),
                    "a file replica needs an absolute directory template",
                ));
            }
            if let Some(extra) = [
                ("bucket", &r.bucket),
                ("region", &r.region),
                ("endpoint", &r.endpoint),
            ]
            .into_iter()
            .find(|(_, v)| v.is_some())
            {
                return Err(at(&field(extra.0), "only valid for `type: s3`"));
            }
        }
        ReplicaKind::S3 => {
            if r.bucket.as_deref().is_none_or(str::is_empty) {
                return Err(at(
                    &["multi_db", "replica_template"],
                    "`type: s3` needs a `bucket`",
                ));
            }
            if let Some(bucket) = r.bucket.as_deref().filter(|b| !is_bucket_name(b)) {
                return Err(at(
                    &field("bucket"),
                    &format!("`{}` is not a bucket name: letters, digits, `.`, `-` and `_` only (a key prefix belongs in `path`)", bucket.escape_debug()),
                ));
            }
            if path_text.starts_with('/') {
                return Err(at(
                    &field("path"),
                    "an s3 key prefix must not start with `/`",
                ));
            }
            if let Some(endpoint) = &r.endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(at(
                        &field("endpoint"),
                        "expected an http:// or https:// URL",
                    ));
                }
            }
        }
    }
    Ok(ReplicaTemplate {
        kind,
        path,
        bucket: r.bucket,
        region: r.region,
        // A custom endpoint (MinIO, R2, a local server) almost always wants path-style keys.
        force_path_style: r.force_path_style.unwrap_or(r.endpoint.is_some()),
        endpoint: r.endpoint,
        litestream_compatible: r.litestream_compatible.unwrap_or(false),
    })
}

/// S3 bucket names are 3 to 63 of lowercase letters, digits, `.` and `-`; S3-compatible
/// stores and legacy buckets also take uppercase and `_`. Anything else (a `/` above all)
/// would change which bucket or key a request names.
fn is_bucket_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !matches!(name, "." | "..")
}
