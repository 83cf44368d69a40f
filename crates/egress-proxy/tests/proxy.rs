//! The proxy end to end, over a Unix socket pair as conductor hands it streams, against
//! upstream servers on 127.0.0.1 that each test starts. Nothing here leaves loopback: every
//! name is in the resolver override map, and denied targets are never connected to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conductor_egress_proxy::{ConnectionLimiter, Decision, EgressEvent, Gate, Proxy, ProxyConfig, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Every wait in these tests is bounded by this, so a hang fails instead of blocking.
const LIMIT: Duration = Duration::from_secs(10);

/// Allows the names it lists, refuses the addresses it lists, and keeps what it was told.
#[derive(Default)]
struct TestGate {
    names: Vec<String>,
    refused_addrs: Vec<IpAddr>,
    asked_names: Mutex<Vec<(String, u16)>>,
    decided: Mutex<Vec<EgressEvent>>,
}

impl TestGate {
    fn allowing(names: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            names: names.iter().map(|name| name.to_string()).collect(),
            ..Self::default()
        })
    }

    fn refusing_addr(names: &[&str], addr: IpAddr) -> Arc<Self> {
        Arc::new(Self {
            names: names.iter().map(|name| name.to_string()).collect(),
            refused_addrs: vec![addr],
            ..Self::default()
        })
    }

    fn decisions(&self) -> Vec<EgressEvent> {
        self.decided.lock().unwrap().clone()
    }
}

impl Gate for TestGate {
    fn check_name(&self, host: &str, port: u16) -> Verdict {
        self.asked_names.lock().unwrap().push((host.to_owned(), port));
        if self.names.iter().any(|name| name == host) {
            Verdict::Allow {
                rule: format!("allow {host}"),
            }
        } else {
            Verdict::Deny {
                reason: "not_allowed".into(),
                message: "not in the workspace's allow list".into(),
                rule: None,
            }
        }
    }

    fn check_addr(&self, _host: &str, addr: IpAddr, _port: u16) -> Verdict {
        if self.refused_addrs.contains(&addr) {
            Verdict::Deny {
                reason: "private_address".into(),
                message: format!("{addr} is a private address"),
                rule: Some("deny private".into()),
            }
        } else {
            Verdict::Allow {
                rule: "any public".into(),
            }
        }
    }

    fn decided(&self, event: &EgressEvent) {
        self.decided.lock().unwrap().push(event.clone());
    }
}

fn proxy_with(config: ProxyConfig) -> Arc<Proxy> {
    let mut resolver_override = HashMap::new();
    resolver_override.insert("allowed.test".to_owned(), vec![LOCALHOST]);
    resolver_override.insert("blocked.test".to_owned(), vec![LOCALHOST]);
    Arc::new(Proxy::new(ProxyConfig {
        resolver_override,
        ..config
    }))
}

fn quick() -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_secs(2),
        head_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    }
}

fn proxy() -> Arc<Proxy> {
    proxy_with(quick())
}

/// Serves one connection in a task; the test's end of the Unix socket pair.
fn start(proxy: &Arc<Proxy>, gate: &Arc<TestGate>) -> (UnixStream, JoinHandle<EgressEvent>) {
    let (client, server) = UnixStream::pair().expect("socket pair");
    let (proxy, gate) = (proxy.clone(), gate.clone());
    let served = tokio::spawn(async move { proxy.serve(server, &*gate).await });
    (client, served)
}

async fn finished(served: JoinHandle<EgressEvent>) -> EgressEvent {
    timeout(LIMIT, served)
        .await
        .expect("serve ends")
        .expect("serve does not panic")
}

/// A 127.0.0.1 server that counts its connections and the bytes it received.
struct Upstream {
    port: u16,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    /// Read to the end, then answer with the same bytes reversed, then close.
    ReverseAtEof,
    /// Echo every chunk as it comes.
    Echo,
    /// Read a request and answer with a small HTTP response, then close.
    Http,
    /// Read and say nothing.
    Silent,
}

async fn upstream(behaviour: Behaviour) -> Upstream {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind 127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (count, store) = (connections.clone(), received.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_upstream(stream, behaviour, store.clone()));
        }
    });
    Upstream {
        port,
        connections,
        received,
    }
}

async fn serve_upstream(mut stream: TcpStream, behaviour: Behaviour, store: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0; 64 * 1024];
    let mut got = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        store.lock().unwrap().extend_from_slice(&buf[..n]);
        let answer = match behaviour {
            Behaviour::Echo => &buf[..n],
            // The one HTTP test sends a request whose body is "body".
            Behaviour::Http if got.ends_with(b"body") => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            }
            Behaviour::Http | Behaviour::ReverseAtEof | Behaviour::Silent => continue,
        };
        if stream.write_all(answer).await.is_err() || matches!(behaviour, Behaviour::Http) {
            return;
        }
    }
    if let Behaviour::ReverseAtEof = behaviour {
        got.reverse();
        let _ = stream.write_all(&got).await;
    }
}

impl Upstream {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

/// A port on 127.0.0.1 that refuses connections.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Reads to the end, then closes the client's end, as a client done with an answer does.
async fn read_all(mut client: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    timeout(LIMIT, client.read_to_end(&mut out))
        .await
        .expect("answer ends")
        .expect("read");
    out
}

async fn read_answer(client: UnixStream) -> String {
    String::from_utf8(read_all(client).await).expect("a text answer")
}

/// Reads exactly the `200 Connection established` reply.
async fn expect_established(client: &mut UnixStream) {
    let mut reply = vec![0; b"HTTP/1.1 200 Connection established\r\n\r\n".len()];
    timeout(LIMIT, client.read_exact(&mut reply))
        .await
        .expect("reply")
        .expect("read");
    assert_eq!(reply, b"HTTP/1.1 200 Connection established\r\n\r\n");
}

fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut bytes = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut bytes).unwrap();
    }
    bytes
}

#[tokio::test]
async fn connect_relays_both_ways_with_half_close_and_counts_bytes() {
    let upstream = upstream(Behaviour::ReverseAtEof).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!(
        "CONNECT Allowed.Test:{} HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        upstream.port
    );
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;

    let request: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    client.write_all(&request).await.unwrap();
    client.shutdown().await.unwrap();
    let answer = read_all(client).await;
    let mut expected = request.clone();
    expected.reverse();
    assert!(
        answer == expected,
        "the upstream's answer arrives whole, after the client's EOF reached it"
    );

    let event = finished(served).await;
    assert_eq!(event.method, "CONNECT");
    assert_eq!((event.host.as_str(), event.port), ("allowed.test", upstream.port));
    assert_eq!(event.decision, Decision::Allowed);
    assert_eq!(event.rule.as_deref(), Some("allow allowed.test"));
    assert_eq!(event.reason, None);
    assert_eq!(event.resolved, Some(LOCALHOST));
    assert_eq!((event.bytes_up, event.bytes_down), (1_000_000, 1_000_000));
    assert_eq!(event.error, None);
    assert_eq!(event.sni, None);
    assert!(event.duration > Duration::ZERO);

    let decided = gate.decisions();
    assert_eq!(decided.len(), 1, "decided once");
    assert_eq!(decided[0].decision, Decision::Allowed);
    assert_eq!(decided[0].resolved, Some(LOCALHOST));
    assert_eq!(decided[0].bytes_up, 0);
}

#[tokio::test]
async fn connect_echo_is_interactive() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    // The first data comes in the same write as the head: it must not be lost.
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\nping", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;
    let mut echoed = [0; 4];
    timeout(LIMIT, client.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping");
    client.write_all(b"pong!").await.unwrap();
    let mut echoed = [0; 5];
    timeout(LIMIT, client.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"pong!");
    drop(client);
    let event = finished(served).await;
    assert_eq!((event.bytes_up, event.bytes_down), (9, 9));
    assert_eq!(event.decision, Decision::Allowed);
}

#[tokio::test]
async fn connect_denied_by_name_is_403_naming_the_host() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!("CONNECT blocked.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    let answer = read_answer(client).await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
    let port = upstream.port;
    assert!(
        answer.ends_with(&format!(
            "\r\n\r\nconductor egress proxy: denied blocked.test:{port} (not_allowed: not in the workspace's allow list). \
             To allow it, add \"blocked.test\" to network.allow of the workspace or task.\n"
        )),
        "{answer}"
    );
    let event = finished(served).await;
    assert_eq!(event.decision, Decision::Denied);
    assert_eq!(event.reason.as_deref(), Some("not_allowed"));
    assert_eq!(event.resolved, None);
    assert_eq!(upstream.connections(), 0);
    assert_eq!(gate.decisions().len(), 1);
}

#[tokio::test]
async fn ipv6_literals_use_brackets() {
    let gate = TestGate::allowing(&[]);
    let (mut client, served) = start(&proxy(), &gate);
    client.write_all(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n").await.unwrap();
    let answer = read_answer(client).await;
    assert!(answer.contains("denied [::1]:443 (not_allowed"), "{answer}");
    assert_eq!(gate.asked_names.lock().unwrap().clone(), vec![("::1".to_owned(), 443)]);
    let event = finished(served).await;
    assert_eq!((event.host.as_str(), event.port), ("::1", 443));
}

#[tokio::test]
async fn address_denial_is_403_and_connects_nowhere() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::refusing_addr(&["allowed.test"], LOCALHOST);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    let answer = read_answer(client).await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.contains(&format!(
            "denied allowed.test:{}, which resolves to 127.0.0.1 (private_address: 127.0.0.1 is a private address)",
            upstream.port
        )),
        "{answer}"
    );
    let event = finished(served).await;
    assert_eq!(event.decision, Decision::Denied);
    assert_eq!(event.reason.as_deref(), Some("private_address"));
    assert_eq!(event.rule.as_deref(), Some("deny private"));
    assert_eq!(event.resolved, None);
    assert_eq!(upstream.connections(), 0, "a refused address is never connected to");
}

#[tokio::test]
async fn sni_for_another_host_closes_the_tunnel_before_upstream_gets_a_byte() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;
    client.write_all(&client_hello("evil.test")).await.unwrap();
    let rest = read_all(client).await;
    assert_eq!(
        rest,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112],
        "an unrecognized_name alert, then EOF"
    );

    let event = finished(served).await;
    assert_eq!(event.decision, Decision::Denied);
    assert_eq!(event.reason.as_deref(), Some("sni_mismatch"));
    assert_eq!(event.sni.as_deref(), Some("evil.test"));
    assert_eq!(event.bytes_up, 0);
    assert!(
        event.error.as_deref().unwrap_or_default().contains("\"evil.test\""),
        "{event:?}"
    );
    // The tunnel was opened (so a refused port could still be answered 502), but not one
    // byte of the ClientHello reached the upstream.
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn sni_for_the_connect_host_passes_through() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!("CONNECT allowed.test.:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;
    let hello = client_hello("ALLOWED.test");
    // In two pieces: the proxy waits for the whole ClientHello.
    client.write_all(&hello[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.write_all(&hello[20..]).await.unwrap();
    let mut echoed = vec![0; hello.len()];
    timeout(LIMIT, client.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, hello);
    assert_eq!(upstream.received(), hello);
    drop(client);
    let event = finished(served).await;
    assert_eq!(event.decision, Decision::Allowed);
    assert_eq!(event.sni.as_deref(), Some("allowed.test"));
    assert_eq!(event.bytes_up, hello.len() as u64);
}

#[tokio::test]
async fn garbage_that_looks_like_tls_is_refused() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;
    client
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0])
        .await
        .unwrap();
    let rest = read_all(client).await;
    assert_eq!(rest, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50]);
    let event = finished(served).await;
    assert_eq!(event.reason.as_deref(), Some("bad_client_hello"));
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
    let upstream = upstream(Behaviour::Http).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    let port = upstream.port;
    let request = format!(
        "POST http://allowed.test:{port}/upload?x=1 HTTP/1.1\r\nHost: evil.test\r\nProxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic dTpw\r\nContent-Length: 4\r\nUser-Agent: test\r\n\r\nbody"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(client).await;
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );

    let received = String::from_utf8(upstream.received()).unwrap();
    assert_eq!(
        received,
        format!(
            "POST /upload?x=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 4\r\nUser-Agent: test\r\n\
             Connection: close\r\n\r\nbody"
        )
    );
    let event = finished(served).await;
    assert_eq!(event.method, "POST");
    assert_eq!((event.host.as_str(), event.port), ("allowed.test", port));
    assert_eq!(event.decision, Decision::Allowed);
    assert_eq!(event.bytes_up, received.len() as u64);
    assert_eq!(event.bytes_down, answer.len() as u64);
    assert_eq!(event.error, None);
}

#[tokio::test]
async fn plain_http_to_a_denied_host_is_403() {
    let gate = TestGate::allowing(&["allowed.test"]);
    let (mut client, served) = start(&proxy(), &gate);
    client
        .write_all(b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(client).await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("denied blocked.test:80 (not_allowed"), "{answer}");
    let event = finished(served).await;
    assert_eq!((event.method.as_str(), event.port), ("GET", 80));
    assert_eq!(event.decision, Decision::Denied);
}

#[tokio::test]
async fn bad_requests_are_400() {
    let cases: [(&[u8], &str, &str); 4] = [
        (
            b"\x00\x01 nonsense\r\n\r\n",
            "400 Bad Request",
            "malformed request head",
        ),
        (
            b"GET /index.html HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
            "400 Bad Request",
            "not a proxy request",
        ),
        (
            b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
            "400 Bad Request",
            "a port is required",
        ),
        (
            b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
            "400 Bad Request",
            "use CONNECT",
        ),
    ];
    for (request, status, says) in cases {
        let gate = TestGate::allowing(&["allowed.test"]);
        let (mut client, served) = start(&proxy(), &gate);
        client.write_all(request).await.unwrap();
        let answer = read_answer(client).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{answer}");
        assert!(answer.contains("Content-Type: text/plain"), "{answer}");
        assert!(answer.contains(says), "{answer}");
        let event = finished(served).await;
        assert_eq!(event.decision, Decision::Denied);
        assert_eq!(event.reason.as_deref(), Some("bad_request"));
        assert!(gate.asked_names.lock().unwrap().is_empty(), "the gate is not asked");
    }
}

#[tokio::test]
async fn an_oversized_head_is_431() {
    let gate = TestGate::allowing(&["allowed.test"]);
    let proxy = proxy_with(ProxyConfig {
        max_header_bytes: 1024,
        ..quick()
    });
    let (mut client, served) = start(&proxy, &gate);
    let request = format!(
        "GET http://allowed.test/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(client).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(finished(served).await.reason.as_deref(), Some("bad_request"));
}

#[tokio::test]
async fn a_silent_client_gets_408() {
    let gate = TestGate::allowing(&["allowed.test"]);
    let proxy = proxy_with(ProxyConfig {
        head_timeout: Duration::from_millis(200),
        ..quick()
    });
    let (mut client, served) = start(&proxy, &gate);
    client
        .write_all(b"GET http://allowed.test/ HTTP/1.1\r\n")
        .await
        .unwrap();
    let answer = read_answer(client).await;
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
    let event = finished(served).await;
    assert_eq!(event.reason.as_deref(), Some("request_timeout"));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed() {
    let upstream = upstream(Behaviour::Silent).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let proxy = proxy_with(ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        ..quick()
    });
    let (mut client, served) = start(&proxy, &gate);
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    client.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut client).await;
    let started = std::time::Instant::now();
    let rest = read_all(client).await;
    assert!(rest.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let event = finished(served).await;
    assert_eq!(event.decision, Decision::Allowed);
    assert!(
        event.error.as_deref().unwrap_or_default().contains("without a byte"),
        "{event:?}"
    );
}

#[tokio::test]
async fn refused_upstream_is_502_for_connect_and_plain_http() {
    let port = closed_port().await;
    for request in [
        format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n"),
        format!("GET http://allowed.test:{port}/ HTTP/1.1\r\n\r\n"),
    ] {
        let gate = TestGate::allowing(&["allowed.test"]);
        let (mut client, served) = start(&proxy(), &gate);
        client.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(client).await;
        assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{answer}");
        assert!(
            answer.contains(&format!(
                "could not connect to allowed.test:{port}: connecting to 127.0.0.1:{port}"
            )),
            "{answer}"
        );
        let event = finished(served).await;
        assert_eq!(event.decision, Decision::Allowed);
        assert_eq!(event.resolved, None);
        assert!(
            event.error.as_deref().unwrap_or_default().contains("refused"),
            "{event:?}"
        );
    }
}

#[tokio::test]
async fn the_connection_limit_refuses_with_the_host_named() {
    let upstream = upstream(Behaviour::Echo).await;
    let gate = TestGate::allowing(&["allowed.test"]);
    let proxy = proxy();
    let limiter = ConnectionLimiter::new(1);

    // The one place is taken by a live tunnel.
    let (mut first, first_served) = {
        let (client, server) = UnixStream::pair().unwrap();
        let (proxy, gate, limiter) = (proxy.clone(), gate.clone(), limiter.clone());
        (
            client,
            tokio::spawn(async move { proxy.serve_limited(server, &*gate, &limiter).await }),
        )
    };
    let connect = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", upstream.port);
    first.write_all(connect.as_bytes()).await.unwrap();
    expect_established(&mut first).await;
    assert_eq!(limiter.in_use(), 1);

    let (mut second, server) = UnixStream::pair().unwrap();
    second.write_all(connect.as_bytes()).await.unwrap();
    let refused = timeout(LIMIT, proxy.serve_limited(server, &*gate, &limiter))
        .await
        .unwrap();
    let answer = read_answer(second).await;
    assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{answer}");
    assert!(
        answer.contains(&format!(
            "refused allowed.test:{} (connection_limit: the workspace already has 1 connections",
            upstream.port
        )),
        "{answer}"
    );
    assert_eq!(refused.decision, Decision::Denied);
    assert_eq!(refused.reason.as_deref(), Some("connection_limit"));
    assert_eq!(
        (refused.method.as_str(), refused.host.as_str()),
        ("CONNECT", "allowed.test")
    );
    assert_eq!(
        upstream.connections(),
        1,
        "only the first connection reached the upstream"
    );

    drop(first);
    finished(first_served).await;
    assert_eq!(limiter.in_use(), 0, "the permit is released when the connection ends");
    assert!(limiter.try_acquire().is_some());
}

#[tokio::test]
async fn a_client_that_leaves_at_once_is_recorded() {
    let gate = TestGate::allowing(&["allowed.test"]);
    let (client, served) = start(&proxy(), &gate);
    drop(client);
    let event = finished(served).await;
    assert_eq!(event.reason.as_deref(), Some("bad_request"));
    assert!(
        event.error.as_deref().unwrap_or_default().contains("closed"),
        "{event:?}"
    );
}

#[test]
fn serve_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let proxy = Proxy::default();
    let gate = TestGate::default();
    let (stream, _) = std::os::unix::net::UnixStream::pair().unwrap();
    let future = async {
        let stream = UnixStream::from_std(stream).unwrap();
        proxy.serve(stream, &gate).await
    };
    assert_send(&future);
}
