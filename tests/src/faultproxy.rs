//! A TCP proxy on loopback that injects network faults between a client (the agent) and a
//! server (the S3 test server), switchable while connections are open:
//!
//! - [`Mode::Pass`]: bytes flow both ways as they come.
//! - [`Mode::Refuse`]: a new connection is closed at once, and switching to it closes every
//!   open connection (the server went away).
//! - [`Mode::Blackhole`]: connections are accepted but nothing is forwarded or answered; bytes
//!   wait in the proxy (and the kernel) as they would behind a dead link that retransmits.
//!   A client that gives up sees a timeout; when the link comes back, whatever a client still
//!   waits for flows again.
//! - [`Mode::Slow`]: every chunk forwarded (either way) is delayed by the given time.
//!
//! Plain std threads: one to accept, one per connection direction. No dependency.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does with traffic now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Blackhole,
    Slow(Duration),
}

/// Counters a test can assert on (so a fault that was never exercised does not pass silently).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections accepted and forwarded (or held).
    pub accepted: u64,
    /// Connections closed at once in refuse mode.
    pub refused: u64,
    /// Bytes forwarded, both directions.
    pub bytes: u64,
}

struct Shared {
    mode: Mutex<Mode>,
    changed: Condvar,
    stop: AtomicBool,
    /// Open connections (client side, upstream side) by id, so refuse can close them.
    open: Mutex<HashMap<u64, Vec<TcpStream>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    bytes: AtomicU64,
}

impl Shared {
    fn mode(&self) -> MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Vec<TcpStream>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks while the mode holds traffic; `false` when the connection must close instead.
    fn gate(&self) -> bool {
        let mut mode = self.mode();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            match *mode {
                Mode::Pass => return true,
                Mode::Refuse => return false,
                Mode::Slow(delay) => {
                    drop(mode);
                    std::thread::sleep(delay);
                    return !self.stop.load(Ordering::Relaxed);
                }
                Mode::Blackhole => {
                    mode = self
                        .changed
                        .wait_timeout(mode, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

/// A running proxy; stops (and closes every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`, starting in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("faultproxy-accept".into())
                .spawn(move || accept_loop(listener, upstream, shared))
                .expect("spawning the proxy thread")
        };
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, for an S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode; open connections follow it from their next chunk on.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode() = mode;
        self.shared.changed.notify_all();
        if mode == Mode::Refuse {
            close_all(&self.shared);
        }
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode()
    }

    pub fn counts(&self) -> Counts {
        Counts {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        close_all(&self.shared);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn close_all(shared: &Shared) {
    for streams in shared.open().values() {
        for stream in streams {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        if *shared.mode() == Mode::Refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("faultproxy-conn".into())
            .spawn(move || connection(client, upstream, shared));
    }
}

fn connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    if let Ok(c) = client.try_clone() {
        shared.open().insert(id, vec![c]);
    }
    // A connection that arrives in a blackhole waits, unanswered, for the link to return.
    if shared.gate() {
        if let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
            let _ = server.set_nodelay(true);
            let mut registered = false;
            if let (Ok(s), Some(streams)) = (server.try_clone(), shared.open().get_mut(&id)) {
                streams.push(s);
                registered = true;
            }
            // Refuse may have closed the client while we connected: then close the server too.
            if !registered || *shared.mode() == Mode::Refuse {
                let _ = server.shutdown(Shutdown::Both);
            }
            pump_both(&client, &server, &shared);
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    shared.open().remove(&id);
}

fn pump_both(client: &TcpStream, server: &TcpStream, shared: &Arc<Shared>) {
    let (Ok(c_read), Ok(s_write), Ok(s_read), Ok(c_write)) = (
        client.try_clone(),
        server.try_clone(),
        server.try_clone(),
        client.try_clone(),
    ) else {
        return;
    };
    let up = {
        let shared = Arc::clone(shared);
        std::thread::spawn(move || pump(c_read, s_write, &shared))
    };
    pump(s_read, c_write, shared);
    let _ = up.join();
    let _ = server.shutdown(Shutdown::Both);
}

/// Copies `from` to `to` chunk by chunk, each chunk through [`Shared::gate`].
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !shared.gate() || to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        shared.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An upstream that echoes every connection's bytes back.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text)?;
        let mut got = vec![0u8; text.len()];
        stream.read_exact(&mut got)?;
        Ok(got)
    }

    fn connect(proxy: &FaultProxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    #[test]
    fn pass_refuse_blackhole_slow() {
        let proxy = FaultProxy::start(echo_server());

        // Pass-through.
        let mut a = connect(&proxy);
        assert_eq!(round_trip(&mut a, b"hello").unwrap(), b"hello");

        // Refuse: the open connection is closed, and so is a new one, at once.
        proxy.set_mode(Mode::Refuse);
        let started = Instant::now();
        assert!(round_trip(&mut a, b"x").is_err(), "open connection closed");
        let mut b = connect(&proxy);
        assert!(round_trip(&mut b, b"x").is_err(), "new connection closed");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(proxy.counts().refused >= 1);

        // Blackhole: accepted, unanswered; the held bytes flow once the link is back.
        proxy.set_mode(Mode::Blackhole);
        let mut c = connect(&proxy);
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.write_all(b"held").unwrap();
        let mut buf = [0u8; 4];
        let err = c.read_exact(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err:?}"
        );
        proxy.set_mode(Mode::Pass);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"held");

        // Slow: each chunk waits, both ways.
        proxy.set_mode(Mode::Slow(Duration::from_millis(200)));
        let mut d = connect(&proxy);
        let started = Instant::now();
        assert_eq!(round_trip(&mut d, b"slow").unwrap(), b"slow");
        assert!(started.elapsed() >= Duration::from_millis(400));
        proxy.set_mode(Mode::Pass);
        assert_eq!(round_trip(&mut d, b"fast").unwrap(), b"fast");
        assert!(proxy.counts().accepted >= 3);
        assert!(proxy.counts().bytes > 0);
    }
}
