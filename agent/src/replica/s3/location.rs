//! Where an S3 replica is: bucket, key prefix, region, endpoint, path style; parsed from
//! `s3://bucket/prefix?…` and turned into the keys Litestream v0.5 lays out.

use super::*;

/// Bucket, key prefix and connection settings of an S3 replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
    pub region: String,
    /// `http://127.0.0.1:9000` for a local or S3-compatible server; None for AWS.
    pub endpoint: Option<String>,
    pub force_path_style: bool,
}

impl S3Location {
    /// Parses `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1&force_path_style=true`.
    pub fn parse(url: &str) -> Result<S3Location, ReplicaError> {
        let bad = |reason: &str| ReplicaError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket/prefix"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket name is missing"));
        }
        let trimmed = prefix.trim_matches('/');
        if let Some(why) = (!trimmed.is_empty())
            .then(|| crate::replica::location_fault(trimmed))
            .flatten()
        {
            // The server would store and list another prefix than the one asked for.
            return Err(bad(&format!("the key prefix `{trimmed}` {why}")));
        }
        let mut location = S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            region: "us-east-1".to_string(),
            endpoint: None,
            force_path_style: false,
        };
        let mut path_style = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "endpoint" => location.endpoint = Some(value.to_string()),
                "region" => location.region = value.to_string(),
                "force_path_style" => {
                    path_style = Some(match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("force_path_style must be true or false")),
                    })
                }
                other => {
                    return Err(bad(&format!(
                        "unknown parameter `{other}`; expected endpoint, region or force_path_style"
                    )))
                }
            }
        }
        if let Some(endpoint) = &location.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(bad("endpoint must be an http:// or https:// URL"));
            }
        }
        // A custom endpoint (MinIO, R2, a local server) almost always wants path-style keys.
        location.force_path_style = path_style.unwrap_or(location.endpoint.is_some());
        Ok(location)
    }

    /// The key of one LTX file: `PREFIX/<level:04x>/<min:016x>-<max:016x>.ltx`.
    pub fn key(&self, level: u8, min: u64, max: u64) -> String {
        let name = crate::replica::file_name(min, max);
        if self.prefix.is_empty() {
            format!("{level:04x}/{name}")
        } else {
            format!("{}/{level:04x}/{name}", self.prefix)
        }
    }

    /// The key of the identity object, `PREFIX/multidb.json`.
    pub fn identity_key(&self) -> String {
        self.root_key(crate::replica::IDENTITY_NAME)
    }

    /// The key of the lease object, `PREFIX/multidb.lease`.
    pub fn lease_key(&self) -> String {
        self.root_key(crate::replica::lease::LEASE_NAME)
    }

    fn root_key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The key prefix of one level, `PREFIX/<level:04x>/`, which listings ask for.
    pub(super) fn level_prefix(&self, level: u8) -> String {
        if self.prefix.is_empty() {
            format!("{level:04x}/")
        } else {
            format!("{}/{level:04x}/", self.prefix)
        }
    }

    /// rust-s3's region: a custom endpoint as given, else an AWS region by name.
    pub(super) fn region(&self) -> Region {
        if let Some(endpoint) = &self.endpoint {
            return Region::Custom {
                region: self.region.clone(),
                endpoint: endpoint.trim_end_matches('/').to_string(),
            };
        }
        match self.region.parse::<Region>() {
            // rust-s3 knows no endpoint for a region newer than itself and would use the bare
            // name as host; AWS's regional endpoints all follow this form.
            Ok(Region::Custom { .. }) | Err(_) => Region::Custom {
                region: self.region.clone(),
                endpoint: format!("https://s3.{}.amazonaws.com", self.region),
            },
            Ok(known) => known,
        }
    }
}
