//! The egress relay: TCP on the workspace's loopback to the host's egress proxy socket.
//!
//! A workspace in the "proxy" network mode has nothing but loopback. Conductor runs an HTTP
//! allowlist proxy on the host and bind-mounts its per-workspace Unix socket read-only at
//! [`EGRESS_SOCKET_DIR`]`/`[`EGRESS_SOCKET_NAME`]. Tools expect a TCP proxy
//! (`HTTPS_PROXY=http://127.0.0.1:3128`), so with `--egress-listen ADDR` the agent listens on
//! `ADDR` and, for every connection it accepts, connects to the socket and copies bytes both
//! ways until both directions are done. It adds nothing and parses nothing: all policy is on
//! the host.
//!
//! - **Where it runs**: its own process, `conductor-agent egress`, a second child of init
//!   next to `serve`. A workload (same uid) that kills one of them leaves the other
//!   running. init does not restart the server (conductor falls back to Podman exec), but
//!   nothing replaces the relay, so init restarts it when it dies: at once, then after 1,
//!   2, 4… up to 60 s while it keeps dying within 30 s of its start (see `init.rs`). Like
//!   the server, it keeps SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 blocked (init forwards them
//!   to every process of the container; they are meant for the workload); SIGTERM and
//!   SIGINT end it (`child_signal_mask` in `main.rs`).
//! - **Copying**: each direction is one thread moving up to 64 KiB at a time with
//!   `splice(2)` through a pipe of its own (socket to pipe to socket: the bytes never pass
//!   through user space; it roughly doubled the relay's throughput over `read`/`write` in
//!   `throughput_against_a_direct_connection`), or with `read`/`write` and a 64 KiB buffer
//!   when no pipe can be made (descriptor limit) or splicing is refused.
//! - **Half-close**: when one side's reads end, the other side's writes are shut
//!   (`shutdown(Write)`), so a client that shuts its writing half still receives the
//!   answer. The connection closes when both directions are done; an error in either shuts
//!   both sockets down, which ends the other direction too.
//! - **Limits**: at most [`EGRESS_MAX_CONNECTIONS`] connections at once; beyond, a new
//!   connection is closed at once.
//! - **Host proxy gone** (the socket cannot be connected): the client gets
//!   `HTTP/1.1 502 Bad Gateway` with the body
//!   `conductor-agent: egress proxy unavailable: <error>` and the connection closes, so a
//!   client never hangs.
//! - **Bind failure** (the address is taken, e.g. by the workload): logged on stderr and
//!   retried (after 1 s, doubling up to 30 s), logged again only when the error changes.
//!   The agent's exec server is a separate process and is never affected.
//!
//! The listen address must be a loopback address: the relay must not hand the workspace's
//! egress to anything that can reach another interface.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use conductor_agent_protocol::EGRESS_MAX_CONNECTIONS;
#[cfg(doc)]
use conductor_agent_protocol::{EGRESS_SOCKET_DIR, EGRESS_SOCKET_NAME};
use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::unistd::pipe2;

/// Size of the copy buffer of each direction.
const BUF: usize = 64 << 10;
/// Stack of the relay's threads: they only move bytes (buffers are on the heap).
const STACK: usize = 128 << 10;
/// How long a refused client (host proxy gone) gets to finish sending before the close,
/// so that its unread request does not turn the close into a reset that loses the answer.
const DRAIN: Duration = Duration::from_secs(2);
/// Longest wait between two bind attempts.
const MAX_BIND_RETRY: Duration = Duration::from_secs(30);
/// Shortest interval between two log lines about the same recurring condition.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Runs the relay process: binds `listen` (retrying until it can) and relays forever.
pub fn run(listen: SocketAddr, socket: PathBuf) -> io::Result<()> {
    let mut delay = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    let (addr, accept) = loop {
        match spawn(listen, socket.clone()) {
            Ok(bound) => break bound,
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    eprintln!(
                        "conductor-agent: egress relay: cannot listen on {listen}: {msg}; retrying (no egress until then)"
                    );
                    last_error = Some(msg);
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_BIND_RETRY);
            }
        }
    };
    eprintln!(
        "conductor-agent: egress relay: listening on {addr} for {}",
        socket.display()
    );
    let _ = accept.join();
    Err(io::Error::other("the accept loop ended"))
}

/// Binds `listen` and relays its connections to the Unix socket `socket` on a thread of
/// its own; returns the bound address (`listen` may have port 0) and that thread.
pub fn spawn(listen: SocketAddr, socket: PathBuf) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    spawn_limited(listen, socket, EGRESS_MAX_CONNECTIONS)
}

/// [`spawn`] with at most `max` connections at once.
fn spawn_limited(listen: SocketAddr, socket: PathBuf, max: usize) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let socket = Arc::new(socket);
    let handle = std::thread::Builder::new()
        .name("egress-accept".into())
        .stack_size(STACK)
        .spawn(move || accept_loop(listener, socket, max))?;
    Ok((addr, handle))
}

/// Logs at most once per [`LOG_EVERY`] (the first time always).
struct Throttle(AtomicU64);

impl Throttle {
    const fn new() -> Self {
        Throttle(AtomicU64::new(0))
    }

    fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1);
        let last = self.0.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_secs())
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

static ACCEPT_LOG: Throttle = Throttle::new();
static FULL_LOG: Throttle = Throttle::new();
static CONNECT_LOG: Throttle = Throttle::new();

/// Counts a connection while it lives.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: TcpListener, socket: Arc<PathBuf>, max: usize) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
            Err(e) => {
                // Out of descriptors or memory: give the connections time to finish.
                if ACCEPT_LOG.allow() {
                    eprintln!("conductor-agent: egress relay: accept failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(slot) = Slot::take(&active, max) else {
            if FULL_LOG.allow() {
                eprintln!("conductor-agent: egress relay: {max} connections already; closing new ones");
            }
            drop(client);
            continue;
        };
        let socket = socket.clone();
        let spawned = std::thread::Builder::new()
            .name("egress-conn".into())
            .stack_size(STACK)
            .spawn(move || {
                handle(client, &socket);
                drop(slot);
            });
        if let Err(e) = spawned {
            if ACCEPT_LOG.allow() {
                eprintln!("conductor-agent: egress relay: cannot start a connection thread: {e}");
            }
        }
    }
}

fn handle(client: TcpStream, socket: &Path) {
    let _ = client.set_nodelay(true);
    match UnixStream::connect(socket) {
        Ok(upstream) => relay(&client, &upstream),
        Err(e) => {
            if CONNECT_LOG.allow() {
                eprintln!(
                    "conductor-agent: egress relay: cannot connect to {}: {e}",
                    socket.display()
                );
            }
            refuse(client, &e);
        }
    }
}

/// The answer to a client when the host proxy cannot be reached.
fn bad_gateway(error: &io::Error) -> Vec<u8> {
    let body = format!("conductor-agent: egress proxy unavailable: {error}\n");
    let mut answer = format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body.as_bytes());
    answer
}

/// Answers 502 and closes, after reading what the client still sends (for up to
/// [`DRAIN`]), so that the close does not reset the connection before it reads the answer.
fn refuse(mut client: TcpStream, error: &io::Error) {
    if client.write_all(&bad_gateway(error)).is_err() {
        return;
    }
    let _ = client.shutdown(Shutdown::Write);
    let deadline = Instant::now() + DRAIN;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Copies both ways until both directions are done: this thread client to host, a scoped
/// one host to client.
fn relay(client: &TcpStream, upstream: &UnixStream) {
    std::thread::scope(|scope| {
        let back = std::thread::Builder::new()
            .name("egress-back".into())
            .stack_size(STACK)
            .spawn_scoped(scope, || {
                direction(upstream, client, || client.shutdown(Shutdown::Write), client, upstream)
            });
        if back.is_err() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        }
        direction(
            client,
            upstream,
            || upstream.shutdown(Shutdown::Write),
            client,
            upstream,
        );
    });
}

/// Copies `from` to `to` until `from` ends, then runs `shut` (shuts `to`'s writing half).
/// On an error either way both sockets are shut down, which also ends the other direction.
fn direction(
    mut from: impl Read + AsFd,
    mut to: impl Write + AsFd,
    shut: impl FnOnce() -> io::Result<()>,
    client: &TcpStream,
    upstream: &UnixStream,
) {
    match pump(&mut from, &mut to) {
        Ok(()) => {
            // ENOTCONN when the peer has already gone: nothing left to tell it.
            let _ = shut();
        }
        Err(_) => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until `from` ends: with `splice(2)` through a pipe of its own, so
/// the bytes never pass through user space; with `read`/`write` and a 64 KiB buffer where
/// no pipe can be made or splicing is refused.
fn pump<F, T>(from: &mut F, to: &mut T) -> io::Result<()>
where
    F: Read + AsFd,
    T: Write + AsFd,
{
    let Ok((pipe_r, pipe_w)) = pipe2(OFlag::O_CLOEXEC) else {
        return copy(from, to);
    };
    loop {
        // The pipe is empty here, so falling back loses nothing.
        let n = match splice(&*from, None, &pipe_w, None, BUF, SpliceFFlags::SPLICE_F_MOVE) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EPERM | Errno::EOPNOTSUPP) => return copy(from, to),
            Err(e) => return Err(e.into()),
        };
        let mut left = n;
        while left > 0 {
            match splice(&pipe_r, None, &*to, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// [`pump`] through user space.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A Unix-socket server in a temporary directory running `serve` on every connection.
    fn upstream(serve: impl Fn(UnixStream) + Send + Sync + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let s = s.unwrap();
                let serve = serve.clone();
                std::thread::spawn(move || serve(s));
            }
        });
        (dir, path)
    }

    /// Echoes until end of stream, then says "bye" and closes.
    fn echo(mut s: UnixStream) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.write_all(b"bye");
    }

    fn relay_to(socket: PathBuf) -> SocketAddr {
        spawn("127.0.0.1:0".parse().unwrap(), socket).unwrap().0
    }

    fn read_all(mut s: impl Read) -> Vec<u8> {
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn bytes_round_trip_and_half_close_still_gets_the_answer() {
        let (_dir, sock) = upstream(echo);
        let addr = relay_to(sock);
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        c.write_all(b" again").unwrap();
        // Shutting our writing half reaches the server as end of stream; its reply (after
        // it saw the end) still comes back, then the end of the connection.
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&c), b" againbye");
    }

    #[test]
    fn the_server_closing_first_reaches_the_client_which_can_still_send() {
        // Greets, shuts its writing half, then reads what the client sends until its end.
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let (_dir, sock) = upstream(move |mut s| {
            s.write_all(b"220 hi\r\n").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            tx.lock().unwrap().send(read_all(&s)).unwrap();
        });
        let addr = relay_to(sock);
        let mut c = TcpStream::connect(addr).unwrap();
        assert_eq!(read_all(&c), b"220 hi\r\n", "the server's end of stream is relayed");
        c.write_all(b"abc").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"abc");
    }

    #[test]
    fn a_large_transfer_is_intact() {
        const SIZE: usize = 64 << 20;
        let (_dir, sock) = upstream(echo);
        let addr = relay_to(sock);
        let c = TcpStream::connect(addr).unwrap();
        let data: Arc<Vec<u8>> = Arc::new(
            (0..SIZE as u64)
                .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect(),
        );
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(100_003) {
                w.write_all(chunk).unwrap();
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = read_all(&c);
        writer.join().unwrap();
        assert_eq!(got.len(), SIZE + 3);
        assert!(got[..SIZE] == data[..], "the echoed bytes differ");
        assert_eq!(&got[SIZE..], b"bye");
    }

    #[test]
    fn a_missing_socket_answers_502() {
        let dir = tempfile::tempdir().unwrap();
        let addr = relay_to(dir.path().join("egress.sock"));
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .unwrap();
        let answer = String::from_utf8(read_all(&c)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            body.starts_with("conductor-agent: egress proxy unavailable: "),
            "{body}"
        );
        assert!(body.contains("No such file or directory"), "{body}");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        // Holds every connection open until the client closes.
        let (_dir, sock) = upstream(|s| {
            let _ = (&s).read_to_end(&mut Vec::new());
        });
        let (addr, _) = spawn_limited("127.0.0.1:0".parse().unwrap(), sock, 2).unwrap();
        let a = TcpStream::connect(addr).unwrap();
        let b = TcpStream::connect(addr).unwrap();
        // Both are being relayed (the server holds them) before the third arrives.
        std::thread::sleep(Duration::from_millis(100));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert!(
            matches!(c.read(&mut buf), Ok(0) | Err(_)),
            "the third connection must be closed"
        );
        // Once one ends, there is room again.
        drop(a);
        let ok = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let mut d = TcpStream::connect(addr).unwrap();
            d.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            // A relayed connection stays open: the read times out instead of ending.
            matches!(d.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        });
        assert!(ok, "a slot must free up when a connection ends");
        drop(b);
    }

    #[test]
    fn the_fallback_without_splice_copies_the_same() {
        let (a, b) = UnixStream::pair().unwrap();
        let (c, d) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..(3 << 20) as u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            (&a).write_all(&sent).unwrap();
        });
        let relay = std::thread::spawn(move || {
            copy(&mut &b, &mut &c).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        });
        assert_eq!(read_all(&d), data);
        writer.join().unwrap();
        relay.join().unwrap();
    }

    #[test]
    fn a_taken_address_is_an_error_not_a_panic() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = spawn(taken.local_addr().unwrap(), PathBuf::from("/nonexistent")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    /// Throughput through the relay against a direct connection (`cargo test --release
    /// -p conductor-agent -- --ignored --nocapture throughput`).
    #[test]
    #[ignore]
    fn throughput_against_a_direct_connection() {
        const SIZE: u64 = 1 << 30;
        fn sink(s: impl Read) -> u64 {
            let mut s = s;
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return n,
                    Ok(k) => n += k as u64,
                }
            }
        }
        fn send(mut c: TcpStream) -> Duration {
            let buf = vec![7u8; 64 << 10];
            let t = Instant::now();
            let mut left = SIZE;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                c.write_all(&buf[..k]).unwrap();
                left -= k as u64;
            }
            c.shutdown(Shutdown::Write).unwrap();
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
            t.elapsed()
        }
        // Direct: TCP to a TCP sink. Relayed: TCP to the relay to a Unix sink. Best of 3.
        let direct = TcpListener::bind("127.0.0.1:0").unwrap();
        let daddr = direct.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in direct.incoming() {
                let s = s.unwrap();
                std::thread::spawn(move || assert_eq!(sink(&s), SIZE));
            }
        });
        let (_dir, sock) = upstream(|s| assert_eq!(sink(&s), SIZE));
        let raddr = relay_to(sock);
        let (mut d, mut r) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            d = d.min(send(TcpStream::connect(daddr).unwrap()));
            r = r.min(send(TcpStream::connect(raddr).unwrap()));
        }
        let mib = |t: Duration| (SIZE >> 20) as f64 / t.as_secs_f64();
        eprintln!(
            "direct {:.0} MiB/s, relayed {:.0} MiB/s ({:.0} %)",
            mib(d),
            mib(r),
            100.0 * d.as_secs_f64() / r.as_secs_f64()
        );
    }
}
