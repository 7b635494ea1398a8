//! A real S3 server on loopback for the tests: `moto_server` (PyPI `moto[server]`, installed
//! by `scripts/setup.sh`) as a child process on a free 127.0.0.1 port, one per test, killed
//! when dropped. Talking to it needs no client of ours: bucket creation and readiness checks
//! are plain HTTP here, so a bug in the S3 replica cannot hide in its own test fixture.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multidb_agent::replica::s3::S3Credentials;

/// Dummy keys: moto accepts any. Distinctive, so a test can search error text for them.
pub const ACCESS_KEY_ID: &str = "AKIAMULTIDBTESTKEY0042";
pub const SECRET_ACCESS_KEY: &str = "multidbTestSecret/wJalrXUtnFEMI+K7MDENG";
pub const SESSION_TOKEN: &str = "multidbTestSessionToken0123456789abcdef";
/// The bucket every server starts with.
pub const BUCKET: &str = "multidb-test";

/// How long moto may take to import and bind; Python start-up on a busy two-core machine is
/// seconds, not milliseconds.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports tried when another process takes the free port between our probe and moto's bind.
const START_TRIES: usize = 3;

/// A running `moto_server`. It dies with the thread that started it (`PR_SET_PDEATHSIG`), so
/// start and use it within one test.
pub struct S3Server {
    child: Child,
    port: u16,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with bucket [`BUCKET`]. Panics, failing the test, when it cannot: an
    /// S3 test that silently skipped would prove nothing.
    pub fn start() -> S3Server {
        let program = std::env::var_os("MOTO_SERVER").unwrap_or_else(|| "moto_server".into());
        let mut last_error = String::new();
        for _ in 0..START_TRIES {
            match S3Server::try_start(&program) {
                Ok(server) => {
                    server.create_bucket(BUCKET);
                    return server;
                }
                Err(error) => last_error = error,
            }
        }
        panic!(
            "cannot start the S3 test server `{}`: {last_error}\n\
             install it with scripts/setup.sh (pip install \"moto[server]\"), or point \
             MOTO_SERVER at it",
            PathBuf::from(&program).display()
        );
    }

    fn try_start(program: &std::ffi::OsStr) -> Result<S3Server, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let log_dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let log_path = log_dir.path().join("moto.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
        let err_log = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut command = Command::new(program);
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group, so that drop can kill whatever it started.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe; it allocates nothing and touches no lock.
        unsafe {
            command.pre_exec(|| {
                // If the test process dies without unwinding (SIGKILL, abort), moto goes too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| format!("spawn: {e}"))?;
        let mut server = S3Server {
            child,
            port,
            log_path: log_path.clone(),
            _log_dir: log_dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("it exited with {status} on port {port}:\n{log}"));
            }
            // Ours only when our own log shows the request: another test's server may have
            // taken the port between our probe and moto's bind, and would answer too.
            if server.request("GET", "/", "").is_ok()
                && server
                    .requests()
                    .iter()
                    .any(|r| r.contains("\"GET / HTTP/1.1\""))
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "no answer on 127.0.0.1:{port} after {START_TIMEOUT:?}:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every HTTP request the server logged so far, one line each (`"PUT /key HTTP/1.1" 200`).
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" HTTP/1.1\""))
            .map(str::to_string)
            .collect()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A replica URL in [`BUCKET`] below `prefix`, path style, as `ReplicaUrl::parse` takes it.
    pub fn url(&self, prefix: &str) -> String {
        self.url_in(BUCKET, prefix)
    }

    /// A replica URL in any bucket of this server.
    pub fn url_in(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1",
            self.endpoint()
        )
    }

    /// The keys, for clients made in the test process (which must not change its own
    /// environment while other tests run).
    pub fn credentials(&self) -> S3Credentials {
        S3Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            Some(SESSION_TOKEN.to_string()),
        )
    }

    /// The environment a child process (the `multidb` binary) needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_SESSION_TOKEN", SESSION_TOKEN.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    /// Sets [`S3Server::env`] on `command`.
    pub fn apply_env<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command.envs(self.env())
    }

    /// Creates a bucket (an anonymous request, which moto allows).
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = self
            .request("PUT", &format!("/{name}"), "")
            .unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
        assert_eq!(status, 200, "creating bucket {name}: {body}");
    }

    /// Stores an object in [`BUCKET`] without our client (anonymous, which moto allows).
    pub fn put_raw(&self, key: &str, body: &str) {
        let (status, answer) = self
            .request("PUT", &format!("/{BUCKET}/{key}"), body)
            .unwrap_or_else(|e| panic!("putting {key}: {e}"));
        assert_eq!(status, 200, "putting {key}: {answer}");
    }

    /// The keys in [`BUCKET`] below `prefix`, as the server lists them (one page is plenty
    /// for a test).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .request("GET", &format!("/{BUCKET}?list-type=2&prefix={prefix}"), "")
            .unwrap_or_else(|e| panic!("listing {prefix}: {e}"));
        assert_eq!(status, 200, "listing {prefix}: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_string()))
            .collect()
    }

    /// Makes moto check signatures from now on, so that unknown keys are refused (403).
    pub fn require_auth(&self) {
        let (status, body) = self
            .request("POST", "/moto-api/reset-auth", "0")
            .unwrap_or_else(|e| panic!("enabling moto auth: {e}"));
        assert_eq!(status, 200, "enabling moto auth: {body}");
    }

    /// One HTTP/1.1 request with `Connection: close`; the status and body of the answer.
    fn request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // The group id is the child's pid (process_group(0) above).
        // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (the kernel picks it; a race with another process is
/// answered by retrying in [`S3Server::start`]).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
