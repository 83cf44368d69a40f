//! Copying bytes both ways between the client and the upstream.
//!
//! Like `tokio::io::copy_bidirectional`, one task polls both directions; unlike it, this
//! counts the bytes each way, closes after `idle` without a byte in either direction, and
//! can hold the client's first bytes back until [`sni::parse`] has classified them. When one
//! side ends its output, the other side's write half is shut down and the other direction
//! goes on, so request/response protocols over a tunnel work.
//!
//! **Splicing.** When both ends are tokio sockets (in production: the Unix socket from the
//! workspace's relay and the TCP connection upstream), each direction moves its bytes with
//! `splice(2)` through a pipe of its own, socket to pipe to socket, so they never pass
//! through user space: the task only waits for readiness (`poll_read_ready` /
//! `poll_write_ready`) and issues non-blocking calls (`SPLICE_F_NONBLOCK`, on non-blocking
//! sockets) through the socket's `try_io`, which clears the readiness on `EAGAIN`. Bytes the
//! relay sends or must see itself (the prefix, a ClientHello under inspection) go through a
//! buffer first, which is freed once written; the pipe is made when the first byte is there
//! to move, so an idle tunnel holds neither buffer nor pipe. Any other stream, a pipe that
//! cannot be made (descriptor limit), and a socket that refuses to be spliced from are copied
//! through a 64 KiB buffer per direction instead, as before splicing existed.

use std::any::Any;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use crate::sni::{self, FirstBytes};

/// Each direction's buffer when copying through user space.
const BUF_BYTES: usize = 64 * 1024;
/// What each pipe is made to hold, and so the most one splice moves: four times a pipe's
/// default. Fewer, larger splices cost less CPU per byte, but with 1 MiB the loopback
/// transfers measured for docs/performance.md ("Egress proxy") were slower again.
const PIPE_BYTES: usize = 256 * 1024;
const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// How a relay went.
#[derive(Debug)]
pub(crate) struct Relayed {
    /// Bytes written to the upstream.
    pub up: u64,
    /// Bytes written to the client.
    pub down: u64,
    /// The server name of the client's ClientHello, if its first bytes were one.
    pub sni: Option<String>,
    pub end: Result<(), RelayError>,
    /// Of `up + down`, the bytes moved by `splice(2)`.
    #[cfg(test)]
    pub spliced: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("closed after {0:?} without a byte in either direction")]
    Idle(Duration),
    #[error("{direction}: {source}")]
    Io { direction: &'static str, source: io::Error },
    #[error("the TLS server name {sni:?} is not the CONNECT host {host:?}")]
    SniMismatch { sni: String, host: String },
    #[error("unreadable TLS ClientHello: {0}")]
    BadClientHello(&'static str),
}

/// What is relayed, which decides when the relay ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind<'a> {
    /// A `CONNECT` tunnel to `host`: the client's first bytes go upstream only once they are
    /// known not to be a TLS ClientHello, or to be one naming `host`. It ends when both
    /// directions have ended.
    Tunnel { host: &'a str },
    /// A forwarded plain HTTP request, sent with `Connection: close`: the response ends with
    /// the upstream's output, and so does the relay.
    Forward,
}

/// One end of a relay: a tokio socket, whose bytes `splice(2)` can move, or any other
/// stream, copied through user space.
pub(crate) enum End<'a, S> {
    Tcp(&'a mut TcpStream),
    Unix(&'a mut UnixStream),
    Other(&'a mut S),
}

impl<'a, S: Any> End<'a, S> {
    /// `stream` as the socket it is, if it is one.
    pub(crate) fn new(stream: &'a mut S) -> Self {
        let any: &dyn Any = &*stream;
        if any.is::<TcpStream>() {
            let any: &mut dyn Any = stream;
            return End::Tcp(any.downcast_mut().expect("checked to be a TcpStream"));
        }
        if any.is::<UnixStream>() {
            let any: &mut dyn Any = stream;
            return End::Unix(any.downcast_mut().expect("checked to be a UnixStream"));
        }
        End::Other(stream)
    }
}

impl<S> End<'_, S> {
    fn socket(&self) -> Option<Socket<'_>> {
        match self {
            End::Tcp(s) => Some(Socket::Tcp(s)),
            End::Unix(s) => Some(Socket::Unix(s)),
            End::Other(_) => None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for End<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            End::Tcp(s) => Pin::new(&mut **s).poll_read(cx, buf),
            End::Unix(s) => Pin::new(&mut **s).poll_read(cx, buf),
            End::Other(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for End<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            End::Tcp(s) => Pin::new(&mut **s).poll_write(cx, buf),
            End::Unix(s) => Pin::new(&mut **s).poll_write(cx, buf),
            End::Other(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            End::Tcp(s) => Pin::new(&mut **s).poll_flush(cx),
            End::Unix(s) => Pin::new(&mut **s).poll_flush(cx),
            End::Other(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            End::Tcp(s) => Pin::new(&mut **s).poll_shutdown(cx),
            End::Unix(s) => Pin::new(&mut **s).poll_shutdown(cx),
            End::Other(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A socket end, seen for splicing.
#[derive(Clone, Copy)]
enum Socket<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
}

impl Socket<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }

    fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>> {
        match (self, interest.is_readable()) {
            (Socket::Tcp(s), true) => s.poll_read_ready(cx),
            (Socket::Tcp(s), false) => s.poll_write_ready(cx),
            (Socket::Unix(s), true) => s.poll_read_ready(cx),
            (Socket::Unix(s), false) => s.poll_write_ready(cx),
        }
    }

    /// One splice call once the socket is ready for `interest`; pending (and woken when it
    /// is) while it is not. `EAGAIN` clears the readiness and waits again.
    fn poll_splice(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        mut call: impl FnMut() -> nix::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_ready(cx, interest))?;
            let mut attempt = || call().map_err(io::Error::from);
            let done = match self {
                Socket::Tcp(s) => s.try_io(interest, &mut attempt),
                Socket::Unix(s) => s.try_io(interest, &mut attempt),
            };
            match done {
                Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

/// A direction's pipe and how many bytes are in it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
}

/// How a direction moves the bytes after its buffer.
enum Mode {
    /// With `splice(2)`; the pipe is made when the first byte is there to move.
    Splice(Option<Pipe>),
    /// Through the buffer.
    Copy,
}

/// Relays until the [`Kind`] says it is over, a direction fails, or `idle` passes without a
/// byte either way. `prefix` is sent upstream first (bytes already read from the client, or
/// a rewritten request head).
pub(crate) async fn relay<C, U>(
    mut client: End<'_, C>,
    mut upstream: End<'_, U>,
    prefix: Vec<u8>,
    kind: Kind<'_>,
    idle: Duration,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (inspect_for, ends_with_response) = match kind {
        Kind::Tunnel { host } => (Some(host), false),
        Kind::Forward => (None, true),
    };
    let splice = client.socket().is_some() && upstream.socket().is_some();
    let mut up = Pump::new(prefix, inspect_for, splice, "from the client to the upstream");
    let mut down = Pump::new(Vec::new(), None, splice, "from the upstream to the client");
    let mut timer = Box::pin(tokio::time::sleep(idle));
    let end = poll_fn(|cx| {
        let mut progress = false;
        let up_done = up.poll(cx, &mut client, &mut upstream, &mut progress)?.is_ready();
        let down_done = down.poll(cx, &mut upstream, &mut client, &mut progress)?.is_ready();
        if down_done && (up_done || ends_with_response) {
            return Poll::Ready(Ok(()));
        }
        if progress {
            timer.as_mut().reset(Instant::now() + idle);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(RelayError::Idle(idle))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    Relayed {
        up: up.bytes,
        down: down.bytes,
        sni: up.sni,
        end,
        #[cfg(test)]
        spliced: up.spliced + down.spliced,
    }
}

/// One direction: write out what the buffer holds, then move the input to the output (by
/// splicing or through the buffer), and at end of input shut the output down.
struct Pump {
    /// `buf[pos..cap]` is read and not yet written.
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    mode: Mode,
    eof: bool,
    shut_down: bool,
    needs_flush: bool,
    bytes: u64,
    #[cfg(test)]
    spliced: u64,
    /// The `CONNECT` host, while the first bytes are still being classified.
    inspect_for: Option<String>,
    sni: Option<String>,
    direction: &'static str,
}

impl Pump {
    fn new(prefix: Vec<u8>, inspect_for: Option<&str>, splice: bool, direction: &'static str) -> Self {
        Self {
            cap: prefix.len(),
            buf: prefix,
            pos: 0,
            mode: if splice { Mode::Splice(None) } else { Mode::Copy },
            eof: false,
            shut_down: false,
            needs_flush: false,
            bytes: 0,
            #[cfg(test)]
            spliced: 0,
            inspect_for: inspect_for.map(str::to_owned),
            sni: None,
            direction,
        }
    }

    fn io(&self, source: io::Error) -> RelayError {
        RelayError::Io {
            direction: self.direction,
            source,
        }
    }

    /// Ready once the input ended and the output is shut down; sets `progress` when it
    /// moved bytes.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut End<'_, R>,
        writer: &mut End<'_, W>,
        progress: &mut bool,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.inspect_for.is_some() {
                ready!(self.poll_inspect(cx, reader, progress))?;
                continue;
            }
            if self.pos < self.cap {
                let written = match Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.cap]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(self.io(io::ErrorKind::WriteZero.into()))),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(self.io(error))),
                    Poll::Pending => return Poll::Pending,
                };
                self.pos += written;
                self.bytes += written as u64;
                self.needs_flush = true;
                *progress = true;
                continue;
            }
            if self.eof {
                if !self.shut_down {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|error| self.io(error))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(()));
            }
            if let (Mode::Splice(_), Some(from), Some(to)) = (&self.mode, reader.socket(), writer.socket()) {
                // What the buffer held is out: the rest goes through the pipe.
                self.buf = Vec::new();
                (self.pos, self.cap) = (0, 0);
                ready!(self.poll_splice(cx, from, to, progress))?;
                continue;
            }
            self.pos = 0;
            self.cap = 0;
            if self.buf.len() < BUF_BYTES {
                self.buf.resize(BUF_BYTES, 0);
            }
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.cap = n;
                    self.eof = n == 0;
                    *progress |= n > 0;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(self.io(error))),
                Poll::Pending => {
                    // Nothing to read for now: push out what the writer may be holding.
                    if self.needs_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|error| self.io(error))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Splices `from` into the pipe and the pipe into `to` until `from` ends (`eof` is set)
    /// or refuses to be spliced (the mode becomes [`Mode::Copy`]); pending while the socket
    /// it waits on is not ready.
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        from: Socket<'_>,
        to: Socket<'_>,
        progress: &mut bool,
    ) -> Poll<Result<(), RelayError>> {
        let direction = self.direction;
        let fail = |source: io::Error| RelayError::Io { direction, source };
        loop {
            let Mode::Splice(slot) = &mut self.mode else {
                return Poll::Ready(Ok(()));
            };
            if let Some(pipe) = slot.as_mut().filter(|pipe| pipe.len > 0) {
                let len = pipe.len;
                let call = || splice(&pipe.read, None, to.fd(), None, len, SPLICE_FLAGS);
                match ready!(to.poll_splice(cx, Interest::WRITABLE, call)) {
                    Ok(0) => return Poll::Ready(Err(fail(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        pipe.len -= n;
                        self.bytes += n as u64;
                        #[cfg(test)]
                        {
                            self.spliced += n as u64;
                        }
                        *progress = true;
                    }
                    Err(error) => return Poll::Ready(Err(fail(error))),
                }
                continue;
            }
            // The pipe is empty, or not made yet: wait for input before making one.
            ready!(from.poll_ready(cx, Interest::READABLE)).map_err(fail)?;
            let pipe = match slot {
                Some(pipe) => pipe,
                None => match new_pipe() {
                    Ok(pipe) => slot.insert(pipe),
                    Err(_) => {
                        self.mode = Mode::Copy;
                        return Poll::Ready(Ok(()));
                    }
                },
            };
            let call = || splice(from.fd(), None, &pipe.write, None, PIPE_BYTES, SPLICE_FLAGS);
            match ready!(from.poll_splice(cx, Interest::READABLE, call)) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    pipe.len = n;
                    *progress = true;
                }
                Err(error) if refused(&error) => {
                    // The pipe is empty: copying from here on loses nothing.
                    self.mode = Mode::Copy;
                    return Poll::Ready(Ok(()));
                }
                Err(error) => return Poll::Ready(Err(fail(error))),
            }
        }
    }

    /// Reads until the bytes in the buffer are classified; ready (and done inspecting) once
    /// they may be forwarded.
    fn poll_inspect<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut End<'_, R>,
        progress: &mut bool,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin,
    {
        let Some(host) = self.inspect_for.take() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            match sni::parse(&self.buf[..self.cap]) {
                FirstBytes::NotTls => return Poll::Ready(Ok(())),
                FirstBytes::ClientHello { sni } => {
                    if let Some(sni) = &sni {
                        if !sni::same_host(sni, &host) {
                            return Poll::Ready(Err(RelayError::SniMismatch { sni: sni.clone(), host }));
                        }
                    }
                    self.sni = sni;
                    return Poll::Ready(Ok(()));
                }
                FirstBytes::Malformed(why) => return Poll::Ready(Err(RelayError::BadClientHello(why))),
                FirstBytes::Incomplete if self.eof => {
                    return match self.cap {
                        0 => Poll::Ready(Ok(())),
                        _ => Poll::Ready(Err(RelayError::BadClientHello("the client closed in the middle of it"))),
                    };
                }
                FirstBytes::Incomplete if self.cap >= sni::MAX_HELLO_BYTES => {
                    return Poll::Ready(Err(RelayError::BadClientHello("a ClientHello larger than 16 KiB")));
                }
                FirstBytes::Incomplete => {}
            }
            if self.buf.len() < sni::MAX_HELLO_BYTES {
                // A socket's tunnel gets its buffer with its first byte: an idle one holds none.
                if let Some(socket) = reader.socket() {
                    match socket.poll_ready(cx, Interest::READABLE) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(self.io(error))),
                        Poll::Pending => {
                            self.inspect_for = Some(host);
                            return Poll::Pending;
                        }
                    }
                }
                self.buf.resize(sni::MAX_HELLO_BYTES, 0);
            }
            let mut read = ReadBuf::new(&mut self.buf[self.cap..sni::MAX_HELLO_BYTES]);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    self.cap += n;
                    self.eof = n == 0;
                    *progress |= n > 0;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(self.io(error))),
                Poll::Pending => {
                    self.inspect_for = Some(host);
                    return Poll::Pending;
                }
            }
        }
    }
}

fn new_pipe() -> nix::Result<Pipe> {
    let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // Refused (an unprivileged user past its pipe allowance), the pipe keeps its 64 KiB and
    // each splice moves what fits.
    let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
    Ok(Pipe { read, write, len: 0 })
}

/// Whether a splice failed because these descriptors cannot be spliced, rather than for the
/// connection's sake.
fn refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EPERM)
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                b"pre".to_vec(),
                Kind::Tunnel { host: "a.test" },
                Duration::from_secs(5),
            )
            .await
        });
        let request = vec![b'x'; 300_000];
        let upstream_side = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&got[..1000]).await.unwrap();
            upstream.shutdown().await.unwrap();
            got.len()
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(upstream_side.await.unwrap(), 300_003);
        assert_eq!(&answer[..3], b"pre");
        assert_eq!(answer.len(), 1000);
        let relayed = relay.await.unwrap();
        assert!(relayed.end.is_ok(), "{:?}", relayed.end);
        assert_eq!((relayed.up, relayed.down), (300_003, 1000));
        assert_eq!(relayed.spliced, 0, "streams that are not sockets are copied");
    }

    #[tokio::test]
    async fn a_forwarded_request_ends_with_the_response() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                Kind::Forward,
                Duration::from_secs(5),
            )
            .await
        });
        let mut request = [0; 18];
        upstream.read_exact(&mut request).await.unwrap();
        upstream.write_all(b"response").await.unwrap();
        drop(upstream);
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response");
        // The client keeps its side open, as a keep-alive client might: the relay ends anyway.
        let relayed = tokio::time::timeout(Duration::from_secs(2), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(relayed.end.is_ok(), "{:?}", relayed.end);
        assert_eq!((relayed.up, relayed.down), (18, 8));
        drop(client);
    }

    #[tokio::test]
    async fn closes_when_idle() {
        let (_client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, _upstream) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let relayed = relay(
            End::new(&mut proxy_client),
            End::new(&mut proxy_upstream),
            Vec::new(),
            Kind::Forward,
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(relayed.end, Err(RelayError::Idle(_))), "{:?}", relayed.end);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn holds_a_client_hello_until_it_is_complete() {
        let hello = crate::sni::tests::client_hello("allowed.test");
        let (mut client, mut proxy_client) = tokio::io::duplex(64 * 1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(64 * 1024);
        let prefix = hello[..10].to_vec();
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                prefix,
                Kind::Tunnel { host: "allowed.test" },
                Duration::from_secs(5),
            )
            .await
        });
        let last = hello.len() - 1;
        for piece in hello[10..last].chunks(40) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut early = [0; 1];
        let nothing = tokio::time::timeout(Duration::from_millis(50), upstream.read(&mut early)).await;
        assert!(
            nothing.is_err(),
            "nothing goes upstream before the ClientHello is complete"
        );
        client.write_all(&hello[last..]).await.unwrap();
        let mut got = vec![0; hello.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hello);
        drop(client);
        drop(upstream);
        let relayed = relay.await.unwrap();
        assert_eq!(relayed.sni.as_deref(), Some("allowed.test"));
    }

    #[tokio::test]
    async fn refuses_a_client_hello_for_another_host() {
        let (mut client, mut proxy_client) = tokio::io::duplex(64 * 1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(64 * 1024);
        client
            .write_all(&crate::sni::tests::client_hello("evil.test"))
            .await
            .unwrap();
        let relayed = relay(
            End::new(&mut proxy_client),
            End::new(&mut proxy_upstream),
            Vec::new(),
            Kind::Tunnel { host: "allowed.test" },
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&relayed.end, Err(RelayError::SniMismatch { sni, host }) if sni == "evil.test" && host == "allowed.test"),
            "{:?}",
            relayed.end
        );
        assert_eq!(relayed.up, 0);
        drop(proxy_upstream);
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    /// A connected TCP pair on loopback: (the proxy's end, the upstream's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    /// Bytes that show a shifted or lost chunk.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    #[tokio::test]
    async fn splices_between_sockets_both_ways_with_half_close_and_counts() {
        let (mut client, mut proxy_client) = UnixStream::pair().unwrap();
        let (mut proxy_upstream, mut upstream) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                b"pre".to_vec(),
                Kind::Tunnel { host: "a.test" },
                Duration::from_secs(5),
            )
            .await
        });
        let request = pattern(8 << 20, 1);
        let response = pattern(3 << 20, 2);
        let answer = response.clone();
        let upstream_side = tokio::spawn(async move {
            // Speaks first: its bytes flow while the client's are still being classified.
            upstream.write_all(b"220 hi\r\n").await.unwrap();
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&answer).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        });
        let mut greeting = [0; 8];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hi\r\n");
        let (mut read, mut write) = client.split();
        let sent = async {
            write.write_all(&request).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut answer = Vec::new();
        tokio::join!(sent, async { read.read_to_end(&mut answer).await.unwrap() });
        let got = upstream_side.await.unwrap();
        assert_eq!(got.len(), request.len() + 3);
        assert!(
            got.starts_with(b"pre") && got[3..] == request[..],
            "the request arrived changed"
        );
        assert!(answer == response, "the response arrived changed");
        let relayed = relay.await.unwrap();
        assert!(relayed.end.is_ok(), "{:?}", relayed.end);
        assert_eq!((relayed.up, relayed.down), ((8 << 20) + 3, 8 + (3 << 20)));
        // Only the prefix and what came with it while classifying went through the buffer.
        let buffered = relayed.up + relayed.down - relayed.spliced;
        assert!(
            buffered <= 3 + sni::MAX_HELLO_BYTES as u64,
            "{buffered} bytes went through user space"
        );
    }

    #[tokio::test]
    async fn splices_after_a_client_hello_is_checked() {
        let hello = crate::sni::tests::client_hello("allowed.test");
        let (mut client, mut proxy_client) = UnixStream::pair().unwrap();
        let (mut proxy_upstream, mut upstream) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                hello[..10].to_vec(),
                Kind::Tunnel { host: "allowed.test" },
                Duration::from_secs(5),
            )
            .await
        });
        let hello = crate::sni::tests::client_hello("allowed.test");
        client.write_all(&hello[10..]).await.unwrap();
        let mut got = vec![0; hello.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, hello);
        let records = pattern(1 << 20, 3);
        client.write_all(&records).await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        upstream.read_to_end(&mut rest).await.unwrap();
        assert!(rest == records, "the bytes after the ClientHello arrived changed");
        drop(upstream);
        let relayed = relay.await.unwrap();
        assert!(relayed.end.is_ok(), "{:?}", relayed.end);
        assert_eq!(relayed.sni.as_deref(), Some("allowed.test"));
        assert_eq!(relayed.up, (hello.len() + records.len()) as u64);
        assert_eq!(relayed.spliced, records.len() as u64);
    }

    #[tokio::test]
    async fn a_spliced_tunnel_closes_when_idle() {
        let (_client, mut proxy_client) = UnixStream::pair().unwrap();
        let (mut proxy_upstream, _upstream) = tcp_pair().await;
        let started = std::time::Instant::now();
        let relayed = relay(
            End::new(&mut proxy_client),
            End::new(&mut proxy_upstream),
            Vec::new(),
            Kind::Tunnel { host: "a.test" },
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(relayed.end, Err(RelayError::Idle(_))), "{:?}", relayed.end);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_client_gone_mid_download_is_an_error_of_that_direction() {
        let (client, mut proxy_client) = UnixStream::pair().unwrap();
        let (mut proxy_upstream, mut upstream) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                Vec::new(),
                Kind::Forward,
                Duration::from_secs(5),
            )
            .await
        });
        let chunk = vec![0u8; 64 << 10];
        upstream.write_all(&chunk).await.unwrap();
        drop(client);
        // Keeps sending until the relay gives up and closes its end.
        while upstream.write_all(&chunk).await.is_ok() {}
        let relayed = relay.await.unwrap();
        assert!(
            matches!(&relayed.end, Err(RelayError::Io { direction, .. }) if *direction == "from the upstream to the client"),
            "{:?}",
            relayed.end
        );
    }

    #[tokio::test]
    async fn the_fallback_without_splice_copies_the_same() {
        // A socket on one side and another stream on the other: copied through the buffer.
        let (mut client, mut proxy_client) = UnixStream::pair().unwrap();
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(64 << 10);
        let relay = tokio::spawn(async move {
            relay(
                End::new(&mut proxy_client),
                End::new(&mut proxy_upstream),
                Vec::new(),
                Kind::Tunnel { host: "a.test" },
                Duration::from_secs(5),
            )
            .await
        });
        let request = pattern(3 << 20, 4);
        let sent = request.clone();
        let upstream_side = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&got).await.unwrap();
            got
        });
        let (mut read, mut write) = client.split();
        let writing = async {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        tokio::join!(writing, async { read.read_to_end(&mut echoed).await.unwrap() });
        assert!(upstream_side.await.unwrap() == request);
        assert!(echoed == request, "the echo arrived changed");
        let relayed = relay.await.unwrap();
        assert!(relayed.end.is_ok(), "{:?}", relayed.end);
        assert_eq!((relayed.up, relayed.down), (3 << 20, 3 << 20));
        assert_eq!(relayed.spliced, 0);
    }
}
