//! One client connection, end to end: head, gate, resolve, connect, relay, event.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::event::{Decision, EgressEvent};
use crate::gate::{Gate, Verdict};
use crate::head::{forward_head, host_port, parse_target, read_head, HeadError, Target};
use crate::limit::ConnectionLimiter;
use crate::mitm::{intercept_with, CertificateAuthority, Injector, InterceptConfig, Prefixed, UpstreamTrust};
use crate::relay::{relay, End, Kind, RelayError, Relayed};

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// TLS alert descriptions (RFC 8446 §6) sent when a tunnel is closed for its ClientHello, so
/// the client reports more than a reset connection.
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// After answering a refusal, how long the client's unread bytes are drained before closing:
/// closing a TCP socket with unread input resets it, and the client may lose the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// How a [`Proxy`] behaves; [`Default`] has values for production.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Bound on each DNS lookup and on each connection attempt to one address.
    pub connect_timeout: Duration,
    /// A relay without a byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on receiving the request head, and on writing the proxy's own answers.
    pub head_timeout: Duration,
    /// The largest request head accepted; a larger one is answered `431`.
    pub max_header_bytes: usize,
    /// For tests: lowercase names resolved to these addresses instead of by DNS. The gate
    /// still checks every address.
    pub resolver_override: HashMap<String, Vec<IpAddr>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            head_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            resolver_override: HashMap::new(),
        }
    }
}

/// What a proxy needs to terminate TLS for the hosts a [`Gate::intercept`] names: the CA
/// that signs the leaves shown to the client, the trust upstreams are verified against, and
/// the interception's timeouts.
#[derive(Debug)]
pub struct Interception {
    pub ca: Arc<CertificateAuthority>,
    pub trust: UpstreamTrust,
    pub config: InterceptConfig,
}

/// The egress proxy. One value serves any number of connections of any workspaces at once:
/// the per-workspace policy comes with each call as a [`Gate`].
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    config: ProxyConfig,
    /// Set: a `CONNECT` the gate wants intercepted is, else every tunnel is relayed as is.
    interception: Option<Arc<Interception>>,
}

/// What [`Proxy::open`] got: a connection, or for an interception only the checked address
/// (the interception connects to it itself, with TLS).
enum Opened {
    Stream(TcpStream),
    Intercept { addr: IpAddr, injector: Arc<dyn Injector> },
}

/// What the proxy does after reading the request and asking the gate.
enum Step {
    /// Answer the client with this and close.
    Answer(Answer),
    /// The client went away before there was anything to answer.
    Gone,
    /// Reply 200, then relay, holding back a ClientHello until its server name is checked.
    Tunnel { upstream: TcpStream, rest: Vec<u8> },
    /// Send the rewritten request (and any body bytes already read), then relay.
    Forward { upstream: TcpStream, request: Vec<u8> },
    /// Reply 200, then terminate the client's TLS and serve its requests to `addr` through
    /// the injector ([`crate::mitm::intercept_with`]).
    Intercept {
        addr: SocketAddr,
        injector: Arc<dyn Injector>,
        rest: Vec<u8>,
    },
}

/// One of the proxy's own answers: a status line and a plain-text body for the agent.
struct Answer {
    status: &'static str,
    body: String,
}

impl Answer {
    fn new(status: &'static str, body: String) -> Self {
        Self { status, body }
    }
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            config,
            interception: None,
        }
    }

    /// A proxy that terminates TLS for the `CONNECT`s its gate names in
    /// [`Gate::intercept`]; every other tunnel stays untouched.
    pub fn with_interception(config: ProxyConfig, interception: Arc<Interception>) -> Self {
        Self {
            config,
            interception: Some(interception),
        }
    }

    /// Whether this proxy may intercept.
    pub fn intercepts(&self) -> bool {
        self.interception.is_some()
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Handles one client connection end to end and returns its audit record when it has
    /// ended. [`Gate::decided`] is called once in between, when the decision is made.
    ///
    /// Nothing waits longer than the configured timeouts: a silent client gets `408` after
    /// `head_timeout`, a silent relay is closed after `idle_timeout`.
    ///
    /// When `client` is a tokio `UnixStream` or `TcpStream`, the bytes of a tunnel or a
    /// forwarded request (after the first ones, which the proxy reads) are moved by the
    /// kernel with `splice(2)`; any other stream is copied through user space.
    pub async fn serve<S>(&self, mut client: S, gate: &dyn Gate) -> EgressEvent
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let started = Instant::now();
        let mut event = EgressEvent::begin();
        let step = self.decide(&mut client, gate, &mut event).await;
        event.duration = started.elapsed();
        gate.decided(&event);
        match step {
            Step::Gone => {}
            Step::Answer(answer) => self.answer(&mut client, &answer).await,
            Step::Tunnel { mut upstream, rest } => match self.write_bounded(&mut client, ESTABLISHED).await {
                Ok(()) => {
                    let relayed = relay(
                        End::new(&mut client),
                        End::new(&mut upstream),
                        rest,
                        Kind::Tunnel { host: &event.host },
                        self.config.idle_timeout,
                    )
                    .await;
                    if let Some(alert) = record(&mut event, relayed) {
                        // The client is speaking TLS by now: end it with an alert it can show.
                        let _ = self
                            .write_bounded(&mut client, &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, alert])
                            .await;
                    }
                }
                Err(error) => event.error = Some(format!("answering the client: {error}")),
            },
            Step::Forward { mut upstream, request } => {
                let relayed = relay(
                    End::new(&mut client),
                    End::new(&mut upstream),
                    request,
                    Kind::Forward,
                    self.config.idle_timeout,
                )
                .await;
                record(&mut event, relayed);
            }
            Step::Intercept { addr, injector, rest } => match self.write_bounded(&mut client, ESTABLISHED).await {
                Ok(()) => {
                    // Set whenever a step is `Intercept`.
                    let Some(interception) = &self.interception else {
                        return event;
                    };
                    let outcome = intercept_with(
                        Prefixed::new(rest, client),
                        &event.host.clone(),
                        event.port,
                        addr,
                        &interception.ca,
                        &interception.trust,
                        injector,
                        &interception.config,
                    )
                    .await;
                    event.bytes_up = outcome.bytes_up;
                    event.bytes_down = outcome.bytes_down;
                    event.sni = outcome.sni;
                    event.injected = outcome.injected;
                    if let Some(reason) = outcome.reason {
                        event.deny(&reason, None);
                    }
                    event.error = outcome.error;
                }
                Err(error) => event.error = Some(format!("answering the client: {error}")),
            },
        }
        event.duration = started.elapsed();
        event
    }

    /// [`serve`](Self::serve) under `limiter`: holds a permit while the connection lives,
    /// or, when `limiter` is full, answers [`refuse_over_limit`](Self::refuse_over_limit).
    pub async fn serve_limited<S>(&self, client: S, gate: &dyn Gate, limiter: &ConnectionLimiter) -> EgressEvent
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match limiter.try_acquire() {
            Some(permit) => {
                let event = self.serve(client, gate).await;
                drop(permit);
                event
            }
            None => self.refuse_over_limit(client, gate, limiter).await,
        }
    }

    /// Refuses a connection because its workspace has `limiter.limit()` open already.
    ///
    /// The request head is read first (within `head_timeout`) so the answer, a `429 Too Many
    /// Requests`, and the event can name the host. The event is denied with reason
    /// `connection_limit`; [`Gate::decided`] is called with it before the answer. For callers
    /// that take permits themselves; [`serve_limited`](Self::serve_limited) does both.
    pub async fn refuse_over_limit<S>(&self, mut client: S, gate: &dyn Gate, limiter: &ConnectionLimiter) -> EgressEvent
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let started = Instant::now();
        let mut event = EgressEvent::begin();
        let limit = limiter.limit();
        event.deny("connection_limit", None);
        event.error = Some(format!(
            "the workspace already has {limit} connections open through the proxy"
        ));
        let mut target = String::new();
        if let Ok(Ok(head)) = timeout(
            self.config.head_timeout,
            read_head(&mut client, self.config.max_header_bytes),
        )
        .await
        {
            if let Ok(parsed) = parse_target(&head.method, &head.target) {
                event.host = parsed.host().to_owned();
                event.port = parsed.port();
                target = format!(" {}", host_port(&event.host, event.port));
            }
            event.method = head.method;
        }
        event.duration = started.elapsed();
        gate.decided(&event);
        let body = format!(
            "conductor egress proxy: refused{target} (connection_limit: the workspace already has {limit} connections \
             open through the proxy). Close some and try again.\n"
        );
        self.answer(&mut client, &Answer::new("429 Too Many Requests", body))
            .await;
        event.duration = started.elapsed();
        event
    }

    /// Reads the request, asks the gate and connects; fills the event's decision fields.
    async fn decide<S>(&self, client: &mut S, gate: &dyn Gate, event: &mut EgressEvent) -> Step
    where
        S: AsyncRead + Unpin,
    {
        let head_timeout = self.config.head_timeout;
        let head = match timeout(head_timeout, read_head(client, self.config.max_header_bytes)).await {
            Ok(Ok(head)) => head,
            Ok(Err(error @ (HeadError::Closed | HeadError::Io(_)))) => {
                event.deny("bad_request", None);
                event.error = Some(error.to_string());
                return Step::Gone;
            }
            Ok(Err(error @ HeadError::TooLarge(_))) => {
                return bad_request(event, "431 Request Header Fields Too Large", error.to_string());
            }
            Ok(Err(error @ HeadError::Malformed(_))) => {
                return bad_request(event, "400 Bad Request", error.to_string());
            }
            Err(_) => {
                let error = format!("no complete request head within {head_timeout:?}");
                let body = format!("conductor egress proxy: {error}.\n");
                event.deny("request_timeout", None);
                event.error = Some(error);
                return Step::Answer(Answer::new("408 Request Timeout", body));
            }
        };
        event.method = head.method.clone();
        let target = match parse_target(&head.method, &head.target) {
            Ok(target) => target,
            Err(error) => return bad_request(event, "400 Bad Request", error.to_string()),
        };
        event.host = target.host().to_owned();
        event.port = target.port();
        let tunnel = matches!(target, Target::Tunnel { .. });
        let upstream = match self.open(gate, event, tunnel).await {
            Ok(Opened::Stream(upstream)) => upstream,
            Ok(Opened::Intercept { addr, injector }) => {
                return Step::Intercept {
                    addr: SocketAddr::new(addr, event.port),
                    injector,
                    rest: head.rest,
                }
            }
            Err(answer) => return Step::Answer(answer),
        };
        match target {
            Target::Tunnel { .. } => Step::Tunnel {
                upstream,
                rest: head.rest,
            },
            Target::Forward { host, port, path } => {
                let mut request = forward_head(&head, &host, port, &path);
                request.extend_from_slice(&head.rest);
                Step::Forward { upstream, request }
            }
        }
    }

    /// Checks the name, resolves it, checks each address and connects to the first allowed
    /// one that answers; or the answer to give instead. For a `tunnel` the gate wants
    /// intercepted (and a proxy that can), nothing is connected: the first allowed address
    /// is returned, for the interception to connect to with TLS.
    async fn open(&self, gate: &dyn Gate, event: &mut EgressEvent, tunnel: bool) -> Result<Opened, Answer> {
        let (host, port) = (event.host.clone(), event.port);
        let target = host_port(&host, port);
        match gate.check_name(&host, port) {
            Verdict::Allow { rule } => {
                event.decision = Decision::Allowed;
                event.rule = Some(rule);
            }
            Verdict::Deny { reason, message, rule } => {
                event.deny(&reason, rule);
                return Err(Answer::new(
                    "403 Forbidden",
                    format!(
                        "conductor egress proxy: denied {target} ({reason}: {message}). To allow it, add \"{host}\" to \
                         network.allow of the workspace or task.\n"
                    ),
                ));
            }
        }
        let bad_gateway = |error: &str| {
            Answer::new(
                "502 Bad Gateway",
                format!("conductor egress proxy: could not connect to {target}: {error}.\n"),
            )
        };
        // Asked only once the name is allowed, and only about a CONNECT.
        let mut injector = match (&self.interception, tunnel) {
            (Some(_), true) => gate.intercept(&host, port),
            _ => None,
        };
        let addrs = match self.resolve(&host, port).await {
            Ok(addrs) => addrs,
            Err(error) => {
                let answer = bad_gateway(&error);
                event.error = Some(error);
                return Err(answer);
            }
        };
        let mut denial = None;
        let mut failure = None;
        for addr in addrs.iter().copied() {
            if let Verdict::Deny { reason, message, rule } = gate.check_addr(&host, addr, port) {
                denial.get_or_insert((addr, reason, message, rule));
                continue;
            }
            if let Some(injector) = injector.take() {
                event.resolved = Some(addr);
                return Ok(Opened::Intercept { addr, injector });
            }
            let socket = SocketAddr::new(addr, port);
            match timeout(self.config.connect_timeout, TcpStream::connect(socket)).await {
                Ok(Ok(stream)) => {
                    // The relay writes whole buffers; don't let small replies wait for more.
                    let _ = stream.set_nodelay(true);
                    event.resolved = Some(addr);
                    return Ok(Opened::Stream(stream));
                }
                Ok(Err(error)) => failure = Some(format!("connecting to {socket}: {error}")),
                Err(_) => {
                    failure = Some(format!(
                        "connecting to {socket}: no answer within {:?}",
                        self.config.connect_timeout
                    ));
                }
            }
        }
        let error = match (failure, denial) {
            (Some(error), _) => error,
            (None, Some((addr, reason, message, rule))) => {
                // Naming the address tells the agent why an allowed name is still refused.
                event.deny(&reason, rule);
                return Err(Answer::new(
                    "403 Forbidden",
                    format!(
                        "conductor egress proxy: denied {target}, which resolves to {addr} ({reason}: {message}).\n"
                    ),
                ));
            }
            (None, None) => format!("{host} has no address"),
        };
        let answer = bad_gateway(&error);
        event.error = Some(error);
        Err(answer)
    }

    /// The addresses of `host`, canonical and without repeats: an IP literal as is, a name
    /// from the override map or else from DNS.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        let found: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if let Some(ips) = self.config.resolver_override.get(host) {
            ips.clone()
        } else {
            let limit = self.config.connect_timeout;
            match timeout(limit, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(addrs)) => addrs.map(|addr| addr.ip()).collect(),
                Ok(Err(error)) => return Err(format!("could not resolve {host}: {error}")),
                Err(_) => return Err(format!("could not resolve {host} within {limit:?}")),
            }
        };
        let mut addrs = Vec::with_capacity(found.len());
        for ip in found.into_iter().map(|ip| ip.to_canonical()) {
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        Ok(addrs)
    }

    /// Writes one of the proxy's own answers, closes the write side, and drains what the
    /// client still sends for a moment so that closing does not reset the connection.
    async fn answer<S>(&self, client: &mut S, answer: &Answer)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let message = format!(
            "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            answer.status,
            answer.body.len(),
            answer.body
        );
        if self.write_bounded(client, message.as_bytes()).await.is_err() {
            return;
        }
        if !matches!(timeout(self.config.head_timeout, client.shutdown()).await, Ok(Ok(()))) {
            return;
        }
        let _ = timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < LINGER_BYTES {
                match client.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }

    /// Writes all of `bytes` and flushes, within `head_timeout`.
    async fn write_bounded<S>(&self, client: &mut S, bytes: &[u8]) -> io::Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let write = async {
            client.write_all(bytes).await?;
            client.flush().await
        };
        match timeout(self.config.head_timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

fn bad_request(event: &mut EgressEvent, status: &'static str, error: String) -> Step {
    let body = format!("conductor egress proxy: bad request: {error}.\n");
    event.deny("bad_request", None);
    event.error = Some(error);
    Step::Answer(Answer::new(status, body))
}

/// Puts a relay's outcome into the event; the TLS alert to end the tunnel with, if any.
fn record(event: &mut EgressEvent, relayed: Relayed) -> Option<u8> {
    event.bytes_up = relayed.up;
    event.bytes_down = relayed.down;
    event.sni = relayed.sni;
    let error = relayed.end.err()?;
    let alert = match &error {
        RelayError::SniMismatch { sni, .. } => {
            event.sni = Some(sni.clone());
            event.deny("sni_mismatch", None);
            Some(ALERT_UNRECOGNIZED_NAME)
        }
        RelayError::BadClientHello(_) => {
            event.deny("bad_client_hello", None);
            Some(ALERT_DECODE_ERROR)
        }
        RelayError::Idle(_) | RelayError::Io { .. } => None,
    };
    event.error = Some(error.to_string());
    alert
}
