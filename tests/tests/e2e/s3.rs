//! The S3 replica against a real S3 server on loopback (`moto_server`, one per test): the
//! Litestream layout of keys, round trips of small, 5 MB+ and multipart-sized files, and the
//! errors an operator sees for a missing file, a missing bucket, refused keys and a dead
//! endpoint, none of which may show the credentials.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use multidb_agent::replica::s3::{S3Replica, GET_CHUNK_BYTES, SINGLE_PUT_MAX_BYTES};
use multidb_agent::replica::{FileInfo, ReplicaClient, ReplicaError, ReplicaUrl};
use multidb_tests::s3server::{S3Server, ACCESS_KEY_ID, BUCKET, SECRET_ACCESS_KEY, SESSION_TOKEN};

/// A client for `url`, made as the agent makes one but with the server's keys passed in
/// (the test process must not change its own environment while other tests run).
fn client(server: &S3Server, url: &str) -> S3Replica {
    let ReplicaUrl::S3(location) = ReplicaUrl::parse(url).unwrap() else {
        panic!("{url} is not an S3 URL");
    };
    S3Replica::with_credentials(location, server.credentials()).unwrap()
}

/// Deterministic bytes that do not compress, so sizes on the wire are real.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn get(replica: &S3Replica, level: u8, min: u64, max: u64) -> Vec<u8> {
    let mut out = Vec::new();
    replica.get(level, min, max, &mut out).unwrap();
    out
}

fn ranges(files: &[FileInfo]) -> Vec<(u64, u64)> {
    files.iter().map(|f| (f.min_txid, f.max_txid)).collect()
}

#[test]
fn put_list_get_delete_round_trip_in_litestream_layout() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url("proj/db/main/acme"));
    assert_eq!(replica.url(), format!("s3://{BUCKET}/proj/db/main/acme"));

    // Put out of order: the listing sorts by min txid, not by upload order or key.
    for (level, min, max, len) in [
        (0, 6, 6, 10),
        (0, 1, 1, 100),
        (0, 2, 5, 2000),
        (9, 1, 6, 3000),
    ] {
        let src = write_file(tmp.path(), "src.ltx", &noise(len, min));
        replica.put(level, min, max, &src).unwrap();
    }
    // Keys that are not ours, around and inside the level prefix, are ignored.
    server.put_raw("proj/db/main/acme/0000/notes.txt", "x");
    server.put_raw(
        "proj/db/main/acme/0000/old/0000000000000007-0000000000000007.ltx",
        "x",
    );
    server.put_raw(
        "proj/db/main/acme/00000/0000000000000008-0000000000000008.ltx",
        "x",
    );

    let mut keys = server.keys("proj/db/main/acme/");
    keys.sort();
    assert_eq!(
        keys,
        [
            "proj/db/main/acme/0000/0000000000000001-0000000000000001.ltx",
            "proj/db/main/acme/0000/0000000000000002-0000000000000005.ltx",
            "proj/db/main/acme/0000/0000000000000006-0000000000000006.ltx",
            "proj/db/main/acme/0000/notes.txt",
            "proj/db/main/acme/0000/old/0000000000000007-0000000000000007.ltx",
            "proj/db/main/acme/00000/0000000000000008-0000000000000008.ltx",
            "proj/db/main/acme/0009/0000000000000001-0000000000000006.ltx",
        ]
    );

    let level0 = replica.list(0).unwrap();
    assert_eq!(ranges(&level0), [(1, 1), (2, 5), (6, 6)]);
    assert_eq!(
        level0.iter().map(|f| f.size).collect::<Vec<_>>(),
        [100, 2000, 10]
    );
    let recent = SystemTime::now() - Duration::from_secs(24 * 3600);
    for file in &level0 {
        assert_eq!(file.level, 0);
        assert!(
            file.created > recent,
            "LastModified not parsed: {:?}",
            file.created
        );
    }
    let snapshots = replica.list(9).unwrap();
    assert_eq!(ranges(&snapshots), [(1, 6)]);
    assert!(replica.list(1).unwrap().is_empty());

    assert_eq!(get(&replica, 0, 2, 5), noise(2000, 2));
    assert_eq!(get(&replica, 9, 1, 6), noise(3000, 1));

    // Deleting a file that is already gone is fine; the rest stay.
    let mut doomed = level0[..2].to_vec();
    doomed.push(FileInfo {
        level: 0,
        min_txid: 40,
        max_txid: 41,
        size: 0,
        created: UNIX_EPOCH,
    });
    replica.delete(&doomed).unwrap();
    replica.delete(&doomed).unwrap();
    replica.delete(&[]).unwrap();
    assert_eq!(ranges(&replica.list(0).unwrap()), [(6, 6)]);
    assert!(matches!(
        replica.get(0, 1, 1, &mut Vec::new()),
        Err(ReplicaError::NotFound { .. })
    ));

    // A put replaces an object whole.
    let src = write_file(tmp.path(), "src.ltx", b"second version");
    replica.put(0, 6, 6, &src).unwrap();
    assert_eq!(get(&replica, 0, 6, 6), b"second version");
}

#[test]
fn replica_at_the_bucket_root_and_an_empty_file() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url(""));
    let src = write_file(tmp.path(), "empty.ltx", b"");
    replica.put(3, 1, 1, &src).unwrap();
    assert_eq!(
        server.keys(""),
        ["0003/0000000000000001-0000000000000001.ltx"]
    );
    assert_eq!(ranges(&replica.list(3).unwrap()), [(1, 1)]);
    assert_eq!(get(&replica, 3, 1, 1), b"");
}

#[test]
fn five_megabyte_file_round_trips() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url("big"));
    let bytes = noise(5 * 1024 * 1024 + 123, 5);
    let src = write_file(tmp.path(), "src.ltx", &bytes);
    replica.put(0, 1, 9, &src).unwrap();
    let listed = replica.list(0).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, bytes.len() as u64);
    assert!(get(&replica, 0, 1, 9) == bytes, "5 MB file differs");
}

#[test]
fn file_above_single_put_limit_goes_multipart_and_reads_back_in_ranges() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url("snapshots"));
    // Above the single-PUT limit (multipart upload) and over two 8 MiB GET ranges.
    let bytes = noise(SINGLE_PUT_MAX_BYTES as usize + 1_234_567, 9);
    let src = write_file(tmp.path(), "snapshot.ltx", &bytes);
    replica.put(9, 1, 100, &src).unwrap();
    assert_eq!(replica.list(9).unwrap()[0].size, bytes.len() as u64);
    assert!(get(&replica, 9, 1, 100) == bytes, "multipart file differs");
}

#[test]
fn missing_key_is_not_found_naming_the_key() {
    let server = S3Server::start();
    let replica = client(&server, &server.url("db"));
    let error = replica.get(0, 1, 2, &mut Vec::new()).unwrap_err();
    let location = format!("s3://{BUCKET}/db/0000/0000000000000001-0000000000000002.ltx");
    assert!(
        matches!(&error, ReplicaError::NotFound { location: l } if *l == location),
        "{error:?}"
    );
    assert_eq!(error.to_string(), format!("{location}: not found"));
}

#[test]
fn missing_bucket_fails_naming_the_bucket() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url_in("no-such-bucket", "db"));
    let src = write_file(tmp.path(), "src.ltx", b"data");

    let list = replica.list(0).unwrap_err().to_string();
    assert_eq!(
        list,
        "s3 bucket no-such-bucket key db/0000/: list: \
         HTTP 404 NoSuchBucket: The specified bucket does not exist"
    );
    // Not `NotFound`: a restore must not take a wrong bucket for a missing file.
    let get = replica.get(0, 1, 1, &mut Vec::new()).unwrap_err();
    assert!(matches!(get, ReplicaError::S3 { .. }), "{get:?}");
    let get = get.to_string();
    assert!(
        get.starts_with("s3 bucket no-such-bucket key db/0000/0000000000000001-0000000000000001.ltx: get: HTTP 404 NoSuchBucket"),
        "{get}"
    );
    let put = replica.put(0, 1, 1, &src).unwrap_err().to_string();
    assert!(
        put.starts_with("s3 bucket no-such-bucket key db/0000/0000000000000001-0000000000000001.ltx: put: HTTP 404 NoSuchBucket"),
        "{put}"
    );
}

#[test]
fn credentials_never_appear_in_errors_or_debug_output() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = write_file(tmp.path(), "src.ltx", b"data");
    let mut seen = Vec::new();

    let replica = client(&server, &server.url("db"));
    seen.push(format!("{replica:?} {:?}", server.credentials()));
    let errors = [
        replica.get(0, 1, 1, &mut Vec::new()).unwrap_err(),
        client(&server, &server.url_in("no-such-bucket", "db"))
            .list(0)
            .unwrap_err(),
    ];
    seen.extend(errors.iter().map(|e| format!("{e} {e:?}")));

    // A dead endpoint: transport errors, retried, then reported.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = client(
        &server,
        &format!("s3://{BUCKET}/db?endpoint=http://127.0.0.1:{dead_port}"),
    );
    let refused = dead.put(0, 1, 1, &src).unwrap_err();
    let text = refused.to_string();
    assert!(
        text.starts_with(&format!(
            "s3 bucket {BUCKET} key db/0000/0000000000000001-0000000000000001.ltx: put: "
        )) && text.ends_with("(after 5 attempts)"),
        "{text}"
    );
    seen.push(format!("{refused} {refused:?}"));

    // Keys the server does not know: refused at once (403), not retried into a lockout.
    server.require_auth();
    let denied = replica.list(0).unwrap_err();
    let text = denied.to_string();
    assert!(
        text.contains("HTTP 403 InvalidAccessKeyId") && !text.contains("attempts"),
        "{text}"
    );
    seen.push(format!("{denied} {denied:?}"));
    let denied = replica.put(0, 1, 1, &src).unwrap_err();
    seen.push(format!("{denied} {denied:?}"));

    for text in &seen {
        for secret in [ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN] {
            assert!(!text.contains(secret), "credential in {text}");
        }
    }
}

/// A writer that replaces the object being downloaded as soon as the first range arrives.
struct ReplacingWriter<'a> {
    replica: &'a S3Replica,
    replacement: std::path::PathBuf,
    received: usize,
}

impl std::io::Write for ReplacingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.received == 0 {
            self.replica.put(0, 1, 1, &self.replacement).unwrap();
        }
        self.received += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn object_replaced_mid_download_fails_instead_of_splicing_versions() {
    let server = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let replica = client(&server, &server.url("db"));
    // Over one GET range, so the download takes two requests.
    let len = GET_CHUNK_BYTES as usize + 1000;
    replica
        .put(0, 1, 1, &write_file(tmp.path(), "v1.ltx", &noise(len, 1)))
        .unwrap();
    let mut writer = ReplacingWriter {
        replica: &replica,
        replacement: write_file(tmp.path(), "v2.ltx", &noise(len, 2)),
        received: 0,
    };
    let error = replica.get(0, 1, 1, &mut writer).unwrap_err().to_string();
    assert!(error.contains("get: HTTP 412"), "{error}");
    assert_eq!(writer.received, GET_CHUNK_BYTES as usize);
    assert!(
        get(&replica, 0, 1, 1) == noise(len, 2),
        "replacement differs"
    );
}
