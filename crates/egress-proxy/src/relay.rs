//! Copying bytes both ways between the client and the upstream.
//!
//! Like `tokio::io::copy_bidirectional`, one task polls both directions, each with its own
//! buffer; unlike it, this counts the bytes each way, closes after `idle` without a byte in
//! either direction, and can hold the client's first bytes back until [`sni::parse`] has
//! classified them. When one side ends its output, the other side's write half is shut down
//! and the other direction goes on, so request/response protocols over a tunnel work.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::sni::{self, FirstBytes};

/// Each direction's buffer.
const BUF_BYTES: usize = 64 * 1024;

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

/// Relays until the [`Kind`] says it is over, a direction fails, or `idle` passes without a
/// byte either way. `prefix` is sent upstream first (bytes already read from the client, or
/// a rewritten request head).
pub(crate) async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    prefix: Vec<u8>,
    kind: Kind<'_>,
    idle: Duration,
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (inspect_for, ends_with_response) = match kind {
        Kind::Tunnel { host } => (Some(host), false),
        Kind::Forward => (None, true),
    };
    let mut up = Pump::new(prefix, inspect_for, "from the client to the upstream");
    let mut down = Pump::new(Vec::new(), None, "from the upstream to the client");
    let mut timer = Box::pin(tokio::time::sleep(idle));
    let end = poll_fn(|cx| {
        let mut progress = false;
        let up_done = up.poll(cx, &mut *client, &mut *upstream, &mut progress)?.is_ready();
        let down_done = down.poll(cx, &mut *upstream, &mut *client, &mut progress)?.is_ready();
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
    }
}

/// One direction: read into the buffer, write it all out, repeat; at end of input, shut the
/// output down.
struct Pump {
    buf: Box<[u8]>,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    eof: bool,
    shut_down: bool,
    needs_flush: bool,
    bytes: u64,
    /// The `CONNECT` host, while the first bytes are still being classified.
    inspect_for: Option<String>,
    sni: Option<String>,
    direction: &'static str,
}

impl Pump {
    fn new(prefix: Vec<u8>, inspect_for: Option<&str>, direction: &'static str) -> Self {
        let mut buf = prefix;
        let cap = buf.len();
        buf.resize(cap.max(BUF_BYTES), 0);
        Self {
            buf: buf.into_boxed_slice(),
            pos: 0,
            cap,
            eof: false,
            shut_down: false,
            needs_flush: false,
            bytes: 0,
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
        reader: &mut R,
        writer: &mut W,
        progress: &mut bool,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
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
            self.pos = 0;
            self.cap = 0;
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

    /// Reads until the bytes in the buffer are classified; ready (and done inspecting) once
    /// they may be forwarded.
    fn poll_inspect<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        progress: &mut bool,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin + ?Sized,
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
                &mut proxy_client,
                &mut proxy_upstream,
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
    }

    #[tokio::test]
    async fn a_forwarded_request_ends_with_the_response() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
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
            &mut proxy_client,
            &mut proxy_upstream,
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
                &mut proxy_client,
                &mut proxy_upstream,
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
            &mut proxy_client,
            &mut proxy_upstream,
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
}
