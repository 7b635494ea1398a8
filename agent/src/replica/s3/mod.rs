//! The `s3` replica: any S3-compatible store (AWS, MinIO, R2, Ceph RGW, moto) through
//! `rust-s3`'s blocking client.
//!
//! Keys are `PREFIX/<level:04x>/<min:016x>-<max:016x>.ltx`, as Litestream v0.5 writes them.
//! Each LTX file is one object written by one PUT, or above [`SINGLE_PUT_MAX_BYTES`] by one
//! multipart upload, which S3 also makes visible only whole, when it completes: a reader never
//! sees half a file. Downloads go in ranges of [`GET_CHUNK_BYTES`], so memory stays bounded
//! and a transient failure repeats one range, not a whole snapshot.
//!
//! Every request is retried on transport errors, HTTP 5xx (503 SlowDown included) and 429 with
//! capped, jittered exponential backoff; any other 4xx fails at once. Credentials come from the
//! environment (or are given explicitly); they are never logged, `Debug` redacts them, and every
//! error message is scrubbed of them before it leaves this module.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use s3::command::Command;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::request::blocking::AttoRequest;
use s3::request::Request as _;
use s3::serde_types::{CompleteMultipartUploadData, ObjectIdentifier, Part};
use s3::{Bucket, Region};

use super::{parse_file_name, FileInfo, ReplicaClient, ReplicaError};

mod credentials;
mod fault;
mod location;
mod walk;

use credentials::scrub;
pub use credentials::S3Credentials;
use fault::{backoff, random_u64, Fault};
pub use location::S3Location;

/// Attempts per request, the first included. With the delays below the retries of one request
/// wait 0.75–1.5 s in all: enough to ride out a dropped keep-alive connection, a restarting
/// MinIO or a short SlowDown burst, short enough that a lasting outage reaches the caller, who
/// keeps the work and tries again at its next sync.
pub const MAX_ATTEMPTS: u32 = 5;
/// Backoff before the first retry; it doubles per retry. Short, because the common failure, a
/// keep-alive connection the server closed, passes at once on a new connection; the doubling
/// gives throttling (SlowDown, 429) the longer pauses it needs.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Upper bound of one backoff step, so that raising [`MAX_ATTEMPTS`] never yields minute-long
/// sleeps inside a replication worker.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Files up to this size are read into memory and sent in one PUT (one request, trivially
/// atomic); larger ones go through a multipart upload, so memory per upload stays bounded.
/// Level-0 LTX files are far smaller; snapshots of big databases are not.
pub const SINGLE_PUT_MAX_BYTES: u64 = 16 << 20;
/// Part size of multipart uploads: above S3's 5 MiB minimum, and what one retry repeats.
/// 8 MiB is also rust-s3's own choice (`s3::bucket::CHUNK_SIZE`).
pub const PART_BYTES: u64 = 8 << 20;
/// S3's limit of parts per upload; past `PART_BYTES * MAX_PARTS` (80 GiB) parts grow.
const MAX_PARTS: u64 = 10_000;
/// Every object is opaque bytes to the store.
const CONTENT_TYPE: &str = "application/octet-stream";
/// Bytes per ranged GET: the memory a download holds, and what one retry repeats. The same as
/// [`PART_BYTES`], so uploads and downloads buffer alike.
pub const GET_CHUNK_BYTES: u64 = 8 << 20;
/// Keys per DeleteObjects request: the S3 API's limit.
pub const DELETE_BATCH: usize = 1000;
/// Deadline of one HTTP request once connected (rust-s3's default is 60 s). Generous, so that a
/// 16 MiB PUT passes on a slow uplink; stalls are caught earlier by attohttpc's 30 s connect and
/// read timeouts. Downloads are ranged, so no single request has to carry a whole snapshot.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest excerpt of a non-XML error body kept in a message (a proxy's HTML page, say).
const ERROR_EXCERPT_CHARS: usize = 200;

/// HTTP requests made to S3 by this process (every attempt, retries included): the
/// benchmarks print it to show that an unwritten database costs no requests.
pub static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A client for one S3 replica root.
pub struct S3Replica {
    location: S3Location,
    // Boxed by rust-s3; holds the credentials too, so it must never be printed.
    bucket: Box<Bucket>,
    credentials: S3Credentials,
}

impl fmt::Debug for S3Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Replica")
            .field("location", &self.location)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl S3Replica {
    /// A client with credentials from the environment (see [`S3Credentials::from_env`]).
    pub fn new(location: S3Location) -> Result<S3Replica, ReplicaError> {
        let credentials = S3Credentials::from_env().map_err(|reason| ReplicaError::Url {
            url: replica_url(&location),
            reason,
        })?;
        S3Replica::with_credentials(location, credentials)
    }

    /// A client with explicit credentials.
    pub fn with_credentials(
        location: S3Location,
        credentials: S3Credentials,
    ) -> Result<S3Replica, ReplicaError> {
        // rust-s3 retries on its own (once by default, sleeping whole seconds, and only what it
        // deems replay-safe); this module's loop is the one policy, so the crate's is turned
        // off. The setting is process-wide; nothing else in the process uses rust-s3.
        static CRATE_RETRIES_OFF: Once = Once::new();
        CRATE_RETRIES_OFF.call_once(|| s3::set_retries(0));

        let fail = |message: String| ReplicaError::S3 {
            bucket: location.bucket.clone(),
            key: location.prefix.clone(),
            op: "open",
            message,
        };
        let keys = Credentials::new(
            Some(&credentials.access_key_id),
            Some(&credentials.secret_access_key),
            None,
            credentials.session_token.as_deref(),
            None,
        )
        .map_err(|e| fail(scrub(&credentials, &e.to_string())))?;
        let mut bucket = Bucket::new(&location.bucket, location.region(), keys)
            .map_err(|e| fail(scrub(&credentials, &e.to_string())))?;
        if location.force_path_style {
            bucket = bucket.with_path_style();
        }
        bucket.request_timeout = Some(REQUEST_TIMEOUT);
        Ok(S3Replica {
            location,
            bucket,
            credentials,
        })
    }

    /// Runs `request` until it succeeds, fails for good, or [`MAX_ATTEMPTS`] are spent.
    /// Every attempt counts in [`REQUESTS`].
    fn retrying<T>(
        &self,
        op: &'static str,
        key: &str,
        mut request: impl FnMut() -> Result<T, S3Error>,
    ) -> Result<T, Fault> {
        let mut attempt = 1;
        loop {
            REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let error = match request() {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let mut fault = Fault::of(&error);
            fault.attempts = attempt;
            if !fault.retryable || attempt >= MAX_ATTEMPTS {
                return Err(fault);
            }
            let delay = backoff(attempt, random_u64());
            tracing::warn!(
                bucket = %self.location.bucket,
                key,
                op,
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %scrub(&self.credentials, &fault.describe()),
                "s3 request failed; retrying"
            );
            std::thread::sleep(delay);
            attempt += 1;
        }
    }

    /// Uploads a large file in parts, one part in memory at a time, each part retried on its
    /// own. The object appears whole when the upload completes, or not at all.
    fn put_multipart(&self, key: &str, src: &Path, size: u64) -> Result<(), ReplicaError> {
        let mut file = fs::File::open(src).map_err(read_error(src))?;
        let upload = self
            .retrying("put", key, || {
                self.bucket.initiate_multipart_upload(key, CONTENT_TYPE)
            })
            .map_err(|fault| self.fail("put", key, &fault))?;
        let part_bytes = PART_BYTES.max(size.div_ceil(MAX_PARTS));
        let uploaded = (|| {
            let mut parts: Vec<Part> = Vec::new();
            let mut chunk = Vec::new();
            loop {
                chunk.clear();
                (&mut file)
                    .take(part_bytes)
                    .read_to_end(&mut chunk)
                    .map_err(read_error(src))?;
                if chunk.is_empty() && !parts.is_empty() {
                    break;
                }
                let number = parts.len() as u32 + 1;
                let part = self
                    .retrying("put", key, || {
                        let id = &upload.upload_id;
                        self.bucket
                            .put_multipart_chunk(&chunk, key, number, id, CONTENT_TYPE)
                    })
                    .map_err(|fault| self.fail("put", key, &fault))?;
                parts.push(part);
                if (chunk.len() as u64) < part_bytes {
                    break;
                }
            }
            self.retrying("put", key, || {
                complete_upload(&self.bucket, key, &upload.upload_id, parts.clone())
            })
            .map_err(|fault| self.fail("put", key, &fault))
        })();
        if uploaded.is_err() {
            // Best effort: parts of an abandoned upload are billed until aborted (or until a
            // bucket lifecycle rule does it).
            let _ = self.bucket.abort_upload(key, &upload.upload_id);
        }
        uploaded
    }

    fn fail(&self, op: &'static str, key: &str, fault: &Fault) -> ReplicaError {
        ReplicaError::S3 {
            bucket: self.location.bucket.clone(),
            key: key.to_string(),
            op,
            message: scrub(&self.credentials, &fault.describe()),
        }
    }
}

impl S3Replica {
    /// A PUT of a small JSON object only if there is none (`expected` is `None`:
    /// `If-None-Match: *`) or only if its ETag is `expected` (`If-Match`). The new ETag, or
    /// `None` when the condition failed.
    fn conditional_put(
        &self,
        key: &str,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>, ReplicaError> {
        let fail = |message: String| ReplicaError::S3 {
            bucket: self.location.bucket.clone(),
            key: key.to_string(),
            op: "put",
            message,
        };
        let mut headers = http::HeaderMap::new();
        match expected {
            None => headers.insert(
                http::header::IF_NONE_MATCH,
                http::HeaderValue::from_static("*"),
            ),
            Some(tag) => headers.insert(
                http::header::IF_MATCH,
                http::HeaderValue::from_str(tag)
                    .map_err(|_| fail(format!("ETag `{tag}` is not a header value")))?,
            ),
        };
        let conditional = self
            .bucket
            .with_extra_headers(headers)
            .map_err(|e| fail(scrub(&self.credentials, &e.to_string())))?;
        match self.retrying("put", key, || {
            conditional.put_object_with_content_type(key, body, "application/json")
        }) {
            Ok(response) => {
                let tag = response
                    .headers()
                    .get("etag")
                    .cloned()
                    .unwrap_or_else(|| response.as_str().unwrap_or_default().to_string());
                if tag.is_empty() {
                    return Err(fail("no ETag in the answer".into()));
                }
                Ok(Some(tag))
            }
            // 412: the condition failed. 409: a concurrent conditional write won. 404: there
            // is no object to match (S3 answers `If-Match` on a missing key so).
            Err(fault)
                if matches!(fault.status, Some(412) | Some(409))
                    || (expected.is_some()
                        && fault.status == Some(404)
                        && fault.code.as_deref() != Some("NoSuchBucket")) =>
            {
                Ok(None)
            }
            Err(fault) => Err(self.fail("put", key, &fault)),
        }
    }
}

fn read_error(src: &Path) -> impl Fn(std::io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io {
        location: src.display().to_string(),
        op: "read",
        error: source,
    }
}

/// CompleteMultipartUpload. Not rust-s3's `complete_multipart_upload`: that one insists on the
/// root element `CompleteMultipartUploadResult`, which moto (and so LocalStack) names
/// `CompleteMultipartUploadResponse`. What matters is the other check it makes: S3 may answer
/// 200 and still have failed, with an `<Error>` document as the body.
fn complete_upload(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    parts: Vec<Part>,
) -> Result<(), S3Error> {
    let data = CompleteMultipartUploadData { parts };
    let command = Command::CompleteMultipartUpload { upload_id, data };
    let response = AttoRequest::new(bucket, key, command)?.response_data(false)?;
    let body = String::from_utf8_lossy(response.as_slice());
    if body.contains("<Error>") {
        return Err(S3Error::HttpFailWithBody(
            response.status_code(),
            body.into_owned(),
        ));
    }
    Ok(())
}

fn replica_url(location: &S3Location) -> String {
    format!("s3://{}/{}", location.bucket, location.prefix)
}

impl ReplicaClient for S3Replica {
    fn url(&self) -> String {
        replica_url(&self.location)
    }

    fn location(&self, level: u8, min: u64, max: u64) -> String {
        format!(
            "s3://{}/{}",
            self.location.bucket,
            self.location.key(level, min, max)
        )
    }

    fn read_identity(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        let key = self.location.identity_key();
        match self.retrying("get", &key, || self.bucket.get_object(&key)) {
            Ok(response) => Ok(Some(response.bytes().to_vec())),
            Err(fault)
                if fault.status == Some(404) && fault.code.as_deref() != Some("NoSuchBucket") =>
            {
                Ok(None)
            }
            Err(fault) => Err(self.fail("get", &key, &fault)),
        }
    }

    fn create_identity(&self, body: &[u8]) -> Result<bool, ReplicaError> {
        let key = self.location.identity_key();
        Ok(self.conditional_put(&key, body, None)?.is_some())
    }

    fn replace_identity(&self, body: &[u8]) -> Result<(), ReplicaError> {
        let key = self.location.identity_key();
        self.retrying("put", &key, || {
            self.bucket
                .put_object_with_content_type(&key, body, "application/json")
                .map(drop)
        })
        .map_err(|fault| self.fail("put", &key, &fault))
    }

    fn read_lease(&self) -> Result<Option<crate::replica::lease::Stored>, ReplicaError> {
        let key = self.location.lease_key();
        match self.retrying("get", &key, || self.bucket.get_object(&key)) {
            Ok(response) => {
                let tag = response.headers().get("etag").cloned().ok_or_else(|| {
                    self.fail("get", &key, &Fault::message("no ETag in the answer".into()))
                })?;
                Ok(Some(crate::replica::lease::Stored {
                    body: response.bytes().to_vec(),
                    tag,
                }))
            }
            Err(fault)
                if fault.status == Some(404) && fault.code.as_deref() != Some("NoSuchBucket") =>
            {
                Ok(None)
            }
            Err(fault) => Err(self.fail("get", &key, &fault)),
        }
    }

    fn write_lease(
        &self,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>, ReplicaError> {
        let key = self.location.lease_key();
        self.conditional_put(&key, body, expected)
    }

    fn list(&self, level: u8) -> Result<Vec<FileInfo>, ReplicaError> {
        let prefix = self.location.level_prefix(level);
        let mut files = Vec::new();
        self.each_object(&prefix, &mut |name, size, created| {
            if let Some((min, max)) = parse_file_name(name) {
                files.push(FileInfo {
                    level,
                    min_txid: min,
                    max_txid: max,
                    size,
                    created,
                });
            }
            true
        })?;
        files.sort_by_key(|f| (f.min_txid, f.max_txid));
        Ok(files)
    }

    fn put(&self, level: u8, min: u64, max: u64, src: &Path) -> Result<(), ReplicaError> {
        let key = self.location.key(level, min, max);
        let size = fs::metadata(src).map_err(read_error(src))?.len();
        if size > SINGLE_PUT_MAX_BYTES {
            return self.put_multipart(&key, src, size);
        }
        let body = fs::read(src).map_err(read_error(src))?;
        self.retrying("put", &key, || {
            self.bucket
                .put_object_with_content_type(&key, &body, CONTENT_TYPE)
                .map(drop)
        })
        .map_err(|fault| self.fail("put", &key, &fault))
    }

    fn get(&self, level: u8, min: u64, max: u64, dst: &mut dyn Write) -> Result<(), ReplicaError> {
        let key = self.location.key(level, min, max);
        let mut bucket = self.bucket.clone();
        let mut offset = 0u64;
        loop {
            let end = offset + GET_CHUNK_BYTES - 1;
            let response = match self.retrying("get", &key, || {
                bucket.get_object_range(&key, offset, Some(end))
            }) {
                Ok(response) => response,
                // A missing bucket is a configuration error, not a missing file.
                Err(fault)
                    if fault.status == Some(404)
                        && fault.code.as_deref() != Some("NoSuchBucket") =>
                {
                    return Err(ReplicaError::NotFound {
                        location: self.location(level, min, max),
                    })
                }
                // Only an empty object has no byte 0.
                Err(fault) if fault.status == Some(416) && offset == 0 => return Ok(()),
                Err(fault) => return Err(self.fail("get", &key, &fault)),
            };
            let body = response.as_slice();
            dst.write_all(body).map_err(|source| ReplicaError::Io {
                location: self.location(level, min, max),
                op: "write the downloaded file",
                error: source,
            })?;
            let headers = response.headers();
            // `bytes FIRST-LAST/TOTAL`; absent when the server sent the whole object (200).
            let total = headers
                .get("content-range")
                .and_then(|range| range.rsplit_once('/'))
                .and_then(|(_, total)| total.parse::<u64>().ok());
            let first_chunk = offset == 0;
            offset += body.len() as u64;
            match total {
                Some(total) if offset < total => {
                    if body.is_empty() {
                        let fault =
                            Fault::message(format!("empty range at byte {offset} of {total}"));
                        return Err(self.fail("get", &key, &fault));
                    }
                }
                _ => return Ok(()),
            }
            // Pin the object: should it be replaced mid-download, the next range fails with
            // 412 instead of splicing two versions together.
            if first_chunk {
                if let Some(Ok(etag)) = headers.get("etag").map(|etag| etag.parse()) {
                    bucket.extra_headers.insert("if-match", etag);
                }
            }
        }
    }

    fn delete(&self, files: &[FileInfo]) -> Result<(), ReplicaError> {
        for batch in files.chunks(DELETE_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|f| self.location.key(f.level, f.min_txid, f.max_txid))
                .collect();
            let first = keys.first().map(String::as_str).unwrap_or_default();
            let result = self
                .retrying("delete", first, || {
                    let objects: Vec<ObjectIdentifier> =
                        keys.iter().map(ObjectIdentifier::new).collect();
                    self.bucket.delete_objects(objects)
                })
                .map_err(|fault| self.fail("delete", first, &fault))?;
            // S3 reports a missing key as deleted; some compatible stores say NoSuchKey.
            if let Some(error) = result.errors.iter().find(|e| e.code != "NoSuchKey") {
                return Err(ReplicaError::S3 {
                    bucket: self.location.bucket.clone(),
                    key: error.key.clone(),
                    op: "delete",
                    message: scrub(
                        &self.credentials,
                        &format!("{}: {}", error.code, error.message),
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    fn location(url: &str) -> S3Location {
        S3Location::parse(url).unwrap()
    }

    #[test]
    fn regression_10_prefixes_a_server_would_normalise_are_refused() {
        for url in ["s3://b/p1/./acme", "s3://b/p1/../p2", "s3://b/p1//acme"] {
            assert!(S3Location::parse(url).is_err(), "{url}");
        }
        assert!(reason("s3://b/p1/./acme").contains("has a `.` component"));
        assert_eq!(location("s3://b/p1/.acme/").prefix, "p1/.acme");
    }

    fn reason(url: &str) -> String {
        match S3Location::parse(url) {
            Err(ReplicaError::Url { reason, .. }) => reason,
            other => panic!("{url}: expected a URL error, got {other:?}"),
        }
    }

    #[test]
    fn location_parse_errors_say_what_is_wrong() {
        assert!(reason("http://bucket/x").contains("expected s3://bucket/prefix"));
        assert!(reason("s3:///prefix").contains("bucket name is missing"));
        assert!(reason("s3://").contains("bucket name is missing"));
        assert!(reason("s3://b/p?color=red").contains("unknown parameter `color`"));
        assert!(reason("s3://b/p?force_path_style=yes").contains("true or false"));
        assert!(reason("s3://b/p?endpoint=127.0.0.1:9000").contains("http:// or https://"));
    }

    #[test]
    fn location_defaults_and_path_style() {
        let aws = location("s3://bucket/a/b/");
        assert_eq!(aws.bucket, "bucket");
        assert_eq!(aws.prefix, "a/b");
        assert_eq!(aws.region, "us-east-1");
        assert_eq!(aws.endpoint, None);
        assert!(
            !aws.force_path_style,
            "AWS defaults to virtual-hosted style"
        );

        let local = location("s3://bucket/p?endpoint=http://127.0.0.1:9000&region=eu-west-3");
        assert_eq!(local.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(local.region, "eu-west-3");
        assert!(
            local.force_path_style,
            "a custom endpoint defaults to path style"
        );

        let hosted = location("s3://b?endpoint=https://minio.example&force_path_style=false");
        assert!(!hosted.force_path_style);
        assert_eq!(hosted.prefix, "");
        assert!(location("s3://b/p?force_path_style=1").force_path_style);
    }

    #[test]
    fn keys_follow_litestream_layout() {
        let with_prefix = location("s3://b//tenants/acme//");
        assert_eq!(
            with_prefix.key(0, 1, 0x2a),
            "tenants/acme/0000/0000000000000001-000000000000002a.ltx"
        );
        assert_eq!(
            with_prefix.key(9, 3, 3),
            "tenants/acme/0009/0000000000000003-0000000000000003.ltx"
        );
        assert_eq!(with_prefix.level_prefix(10), "tenants/acme/000a/");
        let bare = location("s3://b");
        assert_eq!(
            bare.key(1, 1, 2),
            "0001/0000000000000001-0000000000000002.ltx"
        );
        assert_eq!(bare.level_prefix(1), "0001/");
    }

    #[test]
    fn regions_for_aws_and_custom_endpoints() {
        assert_eq!(location("s3://b").region(), Region::UsEast1);
        assert_eq!(
            location("s3://b?region=xx-new-9").region(),
            Region::Custom {
                region: "xx-new-9".into(),
                endpoint: "https://s3.xx-new-9.amazonaws.com".into()
            }
        );
        assert_eq!(
            location("s3://b?endpoint=http://127.0.0.1:9000/&region=local").region(),
            Region::Custom {
                region: "local".into(),
                endpoint: "http://127.0.0.1:9000".into()
            }
        );
    }

    #[test]
    fn credentials_come_from_the_environment_and_never_print() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let missing = S3Credentials::from_lookup(env(&[("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")]))
            .unwrap_err();
        assert!(missing.contains("AWS_SECRET_ACCESS_KEY"), "{missing}");
        assert!(!missing.contains("AWS_ACCESS_KEY_ID"), "{missing}");
        assert!(!missing.contains("AKIDSECRETVALUE"), "{missing}");
        let none = S3Credentials::from_lookup(env(&[("AWS_ACCESS_KEY_ID", "")])).unwrap_err();
        assert!(
            none.contains("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
            "{none}"
        );

        let creds = S3Credentials::from_lookup(env(&[
            ("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE"),
            ("AWS_SECRET_ACCESS_KEY", "sekrit/sekrit"),
            ("AWS_SESSION_TOKEN", "tokentokentoken"),
        ]))
        .unwrap();
        assert_eq!(creds.session_token.as_deref(), Some("tokentokentoken"));
        let replica =
            S3Replica::with_credentials(location("s3://b/p?endpoint=http://127.0.0.1:1"), creds)
                .unwrap();
        let printed = format!("{replica:?} {:#?}", replica.credentials);
        for secret in ["AKIDSECRETVALUE", "sekrit", "tokentokentoken"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("[redacted]"));
        let scrubbed = scrub(
            &replica.credentials,
            "key AKIDSECRETVALUE sig sekrit/sekrit",
        );
        assert_eq!(scrubbed, "key [redacted] sig [redacted]");
        assert_eq!(replica.url(), "s3://b/p");
        assert_eq!(
            replica.location(0, 1, 1),
            "s3://b/p/0000/0000000000000001-0000000000000001.ltx"
        );
    }

    #[test]
    fn faults_retry_on_5xx_429_and_transport_only() {
        let http = |status, body: &str| Fault::of(&S3Error::HttpFailWithBody(status, body.into()));
        let slow = http(
            503,
            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
        );
        assert!(slow.retryable);
        assert_eq!(slow.code.as_deref(), Some("SlowDown"));
        assert_eq!(
            slow.describe(),
            "HTTP 503 SlowDown: Please reduce your request rate."
        );
        for status in [500, 502, 504, 429, 200] {
            assert!(http(status, "").retryable, "{status}");
        }
        for status in [400, 403, 404, 409, 412, 416] {
            assert!(!http(status, "").retryable, "{status}");
        }
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(Fault::of(&S3Error::Io(io)).retryable);

        let denied = http(
            403,
            "<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message>\
             <AWSAccessKeyId>AKIDSECRETVALUE</AWSAccessKeyId><StringToSign>x</StringToSign></Error>",
        );
        assert_eq!(denied.describe(), "HTTP 403 SignatureDoesNotMatch: no");
        let mut proxy = http(502, &format!("<html>{}</html>", "bad gateway ".repeat(100)));
        proxy.attempts = 5;
        let text = proxy.describe();
        assert!(text.starts_with("HTTP 502: <html>bad gateway"), "{text}");
        assert!(text.ends_with("… (after 5 attempts)"), "{text}");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stays_capped() {
        for retry in 1..=12 {
            let step = (BACKOFF_BASE * 2u32.pow(retry.min(10) - 1)).min(BACKOFF_CAP);
            for random in [0, 1, u64::MAX, random_u64()] {
                let delay = backoff(retry, random);
                assert!(delay >= step / 2 && delay <= step, "{retry}: {delay:?}");
            }
        }
        assert_eq!(backoff(1, 0), BACKOFF_BASE / 2);
        assert!(backoff(40, u64::MAX) <= BACKOFF_CAP);
    }

    #[test]
    fn last_modified_parses_as_rfc3339() {
        let at = |s: &str| {
            crate::time::parse_rfc3339(s)
                .ok()
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap())
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            at("2024-02-29T12:00:00.500Z"),
            Some(Duration::new(1_709_208_000, 500_000_000))
        );
        for same in ["2024-02-29T14:30:00+02:30", "2024-02-29T09:30:00-02:30"] {
            assert_eq!(at(same), Some(Duration::new(1_709_208_000, 0)), "{same}");
        }
        assert_eq!(
            at("2000-03-01t00:00:00.123456789123z"),
            Some(Duration::new(951_868_800, 123_456_789))
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:00:00",
            "2024-02-29T12:00:00.Z",
            "1969-12-31T23:59:59Z",
            "2024-02-29T12:00:00+0200",
            "2024-02-29T12:00:00+0x:00",
            "2024-02-29T12:00:00-02:3",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    /// Fault injection the real S3 server cannot do on demand: a loopback HTTP server that
    /// answers each request with the next canned response (the last one repeats) and counts
    /// the requests. The client under test is the real one, over real sockets.
    struct Scripted {
        endpoint: String,
        requests: Arc<AtomicUsize>,
    }

    fn scripted(responses: Vec<(u16, &'static str, &'static str)>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let (status, reason, body) = responses[n.min(responses.len() - 1)];
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut request_body = vec![0; length];
                let _ = reader.read_exact(&mut request_body);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Scripted { endpoint, requests }
    }

    fn scripted_replica(server: &Scripted) -> S3Replica {
        let url = format!("s3://bucket/db?endpoint={}", server.endpoint);
        S3Replica::with_credentials(
            location(&url),
            S3Credentials::new("AKIDSECRETVALUE", "sekrit/sekrit", None),
        )
        .unwrap()
    }

    const SLOW_DOWN: &str =
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

    #[test]
    fn slow_down_is_retried_until_it_passes() {
        let server = scripted(vec![
            (503, "Slow Down", SLOW_DOWN),
            (503, "Slow Down", SLOW_DOWN),
            (200, "OK", "hello"),
        ]);
        let mut out = Vec::new();
        scripted_replica(&server).get(0, 1, 1, &mut out).unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(server.requests.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn server_errors_give_up_after_max_attempts_naming_bucket_and_key() {
        let server = scripted(vec![(
            500,
            "Internal Server Error",
            "<Error><Code>InternalError</Code><Message>oops</Message></Error>",
        )]);
        let error = scripted_replica(&server)
            .get(0, 1, 1, &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            MAX_ATTEMPTS as usize
        );
        assert_eq!(
            error.to_string(),
            "s3 bucket bucket key db/0000/0000000000000001-0000000000000001.ltx: get: \
             HTTP 500 InternalError: oops (after 5 attempts)"
        );
    }

    #[test]
    fn client_errors_are_not_retried() {
        let server = scripted(vec![(403, "Forbidden", "<Error><Code>AccessDenied</Code><Message>Access Denied</Message><AWSAccessKeyId>AKIDSECRETVALUE</AWSAccessKeyId></Error>")]);
        let replica = scripted_replica(&server);
        let error = replica.list(0).unwrap_err().to_string();
        assert_eq!(server.requests.load(Ordering::SeqCst), 1);
        assert_eq!(
            error,
            "s3 bucket bucket key db/0000/: list: HTTP 403 AccessDenied: Access Denied"
        );

        let server = scripted(vec![(404, "Not Found", "<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>")]);
        let error = scripted_replica(&server)
            .get(0, 1, 2, &mut Vec::new())
            .unwrap_err();
        assert_eq!(server.requests.load(Ordering::SeqCst), 1);
        assert!(
            matches!(&error, ReplicaError::NotFound { location } if location == "s3://bucket/db/0000/0000000000000001-0000000000000002.ltx"),
            "{error:?}"
        );
    }
}
