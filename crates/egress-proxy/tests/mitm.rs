//! TLS interception end to end: a client that trusts the conductor CA, `intercept` over an
//! in-memory pipe, and an HTTPS upstream on 127.0.0.1 with its own test CA. Nothing here leaves
//! loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conductor_egress_proxy::mitm::{
    intercept, intercept_with, CertificateAuthority, Injector, InterceptConfig, InterceptOutcome, UpstreamTrust,
    CA_NAME_PREFIX,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

const HOST: &str = "upstream.test";
const PLACEHOLDER: &str = "conductor-secret-x-abc";
const SECRET: &str = "real-value";
/// Every wait in these tests is bounded by this, so a hang fails instead of blocking.
const LIMIT: Duration = Duration::from_secs(10);

type ClientBody = BoxBody<Bytes, Infallible>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Replaces [`PLACEHOLDER`] with [`SECRET`] in any header value, for [`HOST`] only, as the
/// secret `x`; keeps the hosts it was asked about.
#[derive(Default)]
struct TestInjector {
    asked: Mutex<Vec<(String, u16)>>,
}

impl Injector for TestInjector {
    fn inject(&self, host: &str, port: u16, headers: &mut HeaderMap) -> Vec<String> {
        self.asked.lock().unwrap().push((host.to_owned(), port));
        if host != HOST {
            return Vec::new();
        }
        let mut used = false;
        for value in headers.values_mut() {
            if let Ok(text) = value.to_str() {
                if text.contains(PLACEHOLDER) {
                    *value = HeaderValue::from_str(&text.replace(PLACEHOLDER, SECRET)).unwrap();
                    used = true;
                }
            }
        }
        if used {
            vec!["x".to_owned()]
        } else {
            Vec::new()
        }
    }
}

impl TestInjector {
    fn calls(&self) -> usize {
        self.asked.lock().unwrap().len()
    }
}

/// An HTTPS server on 127.0.0.1 for [`HOST`], with a certificate from its own test CA.
struct TestUpstream {
    addr: SocketAddr,
    /// The test CA, in a PEM file for [`UpstreamTrust::load`].
    ca_file: PathBuf,
    connections: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TestUpstream {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test upstream CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![HOST.to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_file = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service_fn(upstream_service))
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_file,
            connections,
            _dir: dir,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The `Host` a client sends for this upstream.
    fn host_header(&self) -> String {
        format!("{HOST}:{}", self.addr.port())
    }

    fn trust(&self) -> UpstreamTrust {
        UpstreamTrust::load(std::slice::from_ref(&self.ca_file)).unwrap()
    }
}

/// `/redirect`: a 302 to another host; `/echo-body`: the request body back, streamed;
/// `/close`: the head echo, then the connection closes; else the request head as text.
async fn upstream_service(request: Request<Incoming>) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    let full = |text: String| Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed();
    let mut head = format!("{} {}\n", request.method(), request.uri());
    for (name, value) in request.headers() {
        head.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("<binary>")));
    }
    Ok(match request.uri().path() {
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "https://elsewhere.test/landing?from=upstream")
            .header("x-upstream", "yes")
            .body(full("moved\n".to_owned()))
            .unwrap(),
        "/echo-body" => Response::new(request.into_body().boxed()),
        "/close" => Response::builder()
            .header("connection", "close")
            .body(full(head))
            .unwrap(),
        _ => Response::new(full(head)),
    })
}

/// A TLS client for `name` that trusts only the conductor CA, over `io`.
async fn tls_client(
    ca: &CertificateAuthority,
    name: &str,
    io: DuplexStream,
) -> std::io::Result<TlsStream<DuplexStream>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_owned()).unwrap();
    timeout(LIMIT, TlsConnector::from(Arc::new(config)).connect(name, io))
        .await
        .expect("handshake ends")
}

async fn http_client(tls: TlsStream<DuplexStream>) -> SendRequest<ClientBody> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// An interception of a `CONNECT` to [`HOST`] at `upstream`, served in a task; the client's
/// end of the pipe.
fn start(
    upstream: &TestUpstream,
    ca: &Arc<CertificateAuthority>,
    trust: UpstreamTrust,
    injector: &Arc<TestInjector>,
) -> (DuplexStream, JoinHandle<InterceptOutcome>) {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let (ca, injector, addr) = (ca.clone(), injector.clone(), upstream.addr);
    let served = tokio::spawn(async move { intercept(far, HOST, addr.port(), addr, &ca, &trust, injector).await });
    (near, served)
}

async fn finished(served: JoinHandle<InterceptOutcome>) -> InterceptOutcome {
    timeout(LIMIT, served)
        .await
        .expect("intercept ends")
        .expect("intercept does not panic")
}

fn get(path: &str, host: &str) -> Request<ClientBody> {
    Request::get(path)
        .header("host", host)
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .header("x-other", "unchanged")
        .body(Empty::new().boxed())
        .unwrap()
}

async fn send(sender: &mut SendRequest<ClientBody>, request: Request<ClientBody>) -> (StatusCode, HeaderMap, String) {
    timeout(LIMIT, async {
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8(body.to_vec()).unwrap())
    })
    .await
    .expect("response")
}

fn ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::generate().unwrap())
}

#[tokio::test]
async fn injects_the_secret_on_three_requests_over_one_keep_alive_connection() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    for i in 0..3 {
        let (status, _, body) = send(&mut sender, get(&format!("/item/{i}"), &upstream.host_header())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with(&format!("GET /item/{i}\n")), "{body}");
        assert!(body.contains(&format!("authorization: Bearer {SECRET}\n")), "{body}");
        assert!(body.contains("x-other: unchanged\n"), "{body}");
        assert!(!body.contains(PLACEHOLDER), "{body}");
        assert!(body.contains(&format!("host: {}\n", upstream.host_header())), "{body}");
    }
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!(outcome.requests, 3);
    assert_eq!(outcome.refused, 0);
    assert_eq!(outcome.injected, ["x"]);
    assert_eq!(outcome.upstream_connections, 1);
    assert_eq!(upstream.connections(), 1, "three requests, one upstream connection");
    assert_eq!(outcome.sni.as_deref(), Some(HOST));
    assert_eq!(outcome.reason, None);
    assert_eq!(outcome.error, None);
    assert!(outcome.bytes_up > 0 && outcome.bytes_down > 0, "{outcome:?}");
    assert_eq!(
        injector.asked.lock().unwrap()[0],
        (HOST.to_owned(), upstream.addr.port())
    );
}

#[tokio::test]
async fn a_redirect_to_another_host_is_returned_unchanged() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    let (status, headers, body) = send(&mut sender, get("/redirect", &upstream.host_header())).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers["location"], "https://elsewhere.test/landing?from=upstream");
    assert_eq!(headers["x-upstream"], "yes");
    assert_eq!(body, "moved\n");
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!((outcome.requests, outcome.refused), (1, 0));
    assert_eq!(outcome.error, None);
    // The follow-up to elsewhere.test needs a CONNECT of its own: this injector is asked only
    // about the intercepted host.
    assert!(injector.asked.lock().unwrap().iter().all(|(host, _)| host == HOST));
}

#[tokio::test]
async fn a_request_for_another_host_is_421_and_never_injected() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let mut tls = tls_client(&ca, HOST, pipe).await.unwrap();

    // Written by hand, so the target is exactly what a client could send.
    let port = upstream.addr.port();
    let misdirected = [
        format!("GET / HTTP/1.1\r\nHost: other.test:{port}\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {HOST}:1\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        format!("GET https://other.test/ HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
        format!("GET https://{HOST}:{port}/ HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
    ];
    for request in &misdirected {
        tls.write_all(request.as_bytes()).await.unwrap();
        let answer = read_response(&mut tls).await;
        assert!(
            answer.starts_with("HTTP/1.1 421 Misdirected Request\r\n"),
            "{request:?}: {answer}"
        );
        assert!(
            answer.contains(&format!("this connection goes to {HOST}:{port} only")),
            "{answer}"
        );
        assert!(!answer.contains(SECRET));
    }
    assert_eq!(injector.calls(), 0, "the injector never saw a misdirected request");
    assert_eq!(
        upstream.connections(),
        1,
        "connected at the handshake, but sent nothing"
    );

    // The connection stays usable for the right host.
    let mut sender = http_client(tls).await;
    let (status, _, body) = send(&mut sender, get("/", &upstream.host_header())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(&format!("authorization: Bearer {SECRET}\n")), "{body}");
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!((outcome.requests, outcome.refused), (6, 5));
    assert_eq!(outcome.injected, ["x"]);
    assert!(
        outcome.error.as_deref().unwrap_or_default().contains("other.test"),
        "{outcome:?}"
    );
}

/// Reads one response with a `Content-Length` body from a raw stream.
async fn read_response(tls: &mut TlsStream<DuplexStream>) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(LIMIT, async {
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .map(|length| length.trim().parse::<usize>().unwrap())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    })
    .await
    .expect("a response")
}

#[tokio::test]
async fn an_untrusted_upstream_is_502_naming_the_host_and_gets_no_secret() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    // The host's roots only: the test upstream's CA is not among them.
    let (pipe, served) = start(&upstream, &ca, UpstreamTrust::load(&[]).unwrap(), &injector);
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    let (status, headers, body) = send(&mut sender, get("/", &upstream.host_header())).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(headers["connection"], "close");
    let port = upstream.addr.port();
    assert!(
        body.starts_with(&format!(
            "conductor egress proxy: the TLS certificate of {HOST}:{port} could not be verified: invalid peer certificate: UnknownIssuer."
        )),
        "{body}"
    );
    assert!(body.contains(&format!("if {HOST} uses a private CA")), "{body}");
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!((outcome.requests, outcome.refused), (1, 1));
    assert!(outcome.injected.is_empty(), "nothing was sent upstream");
    assert_eq!(outcome.upstream_connections, 0);
    let error = outcome.error.unwrap_or_default();
    assert!(
        error.contains(&format!("verifying the TLS certificate of {HOST}:{port}")),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn a_client_hello_for_another_name_is_refused_before_connecting_upstream() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let error = tls_client(&ca, "evil.test", pipe).await.expect_err("refused");
    assert!(error.to_string().contains("AccessDenied"), "{error}");
    let outcome = finished(served).await;
    assert_eq!(outcome.reason.as_deref(), Some("sni_mismatch"));
    assert_eq!(outcome.sni.as_deref(), Some("evil.test"));
    assert!(outcome.error.unwrap_or_default().contains("\"evil.test\""));
    assert_eq!(outcome.requests, 0);
    assert_eq!(upstream.connections(), 0, "the upstream is never connected to");
    assert_eq!(injector.calls(), 0);
}

#[tokio::test]
async fn a_streamed_post_of_1_mib_passes_intact_both_ways() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = payload
        .chunks(64 * 1024)
        .map(|chunk| Ok(Frame::data(Bytes::copy_from_slice(chunk))))
        .collect();
    // No Content-Length: the body goes chunked, as a stream of unknown length.
    let request = Request::post("/echo-body")
        .header("host", upstream.host_header())
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        .unwrap();
    let echoed = timeout(LIMIT, async {
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap().to_bytes()
    })
    .await
    .expect("response");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "the body came back intact");
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!(outcome.injected, ["x"]);
    assert_eq!(outcome.error, None);
    assert!(
        outcome.bytes_up > 1024 * 1024 && outcome.bytes_down > 1024 * 1024,
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_closed_upstream_connection_is_reopened_to_the_same_address() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, served) = start(&upstream, &ca, upstream.trust(), &injector);
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    let (status, headers, _) = send(&mut sender, get("/close", &upstream.host_header())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get("connection").is_none(),
        "hop-by-hop headers are not passed on"
    );
    for _ in 0..2 {
        let (status, _, body) = send(&mut sender, get("/", &upstream.host_header())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(SECRET), "{body}");
    }
    drop(sender);
    let outcome = finished(served).await;
    assert_eq!(outcome.requests, 3);
    assert_eq!(outcome.upstream_connections, 2);
    assert_eq!(upstream.connections(), 2);
    assert_eq!(outcome.error, None);
}

#[tokio::test]
async fn a_silent_connection_is_closed_when_idle() {
    let upstream = TestUpstream::start().await;
    let (ca, injector) = (ca(), Arc::new(TestInjector::default()));
    let (pipe, far) = tokio::io::duplex(64 * 1024);
    let config = InterceptConfig {
        idle_timeout: Duration::from_millis(300),
        ..InterceptConfig::default()
    };
    let (ca2, trust, addr) = (ca.clone(), upstream.trust(), upstream.addr);
    let started = std::time::Instant::now();
    let served =
        tokio::spawn(
            async move { intercept_with(far, HOST, addr.port(), addr, &ca2, &trust, injector, &config).await },
        );
    let mut tls = tls_client(&ca, HOST, pipe).await.unwrap();
    let mut rest = Vec::new();
    timeout(LIMIT, tls.read_to_end(&mut rest)).await.unwrap().ok();
    let outcome = finished(served).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        outcome.error.as_deref().unwrap_or_default().contains("without a byte"),
        "{outcome:?}"
    );
}

#[test]
fn the_ca_is_created_once_with_a_private_key_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("ca/ca.pem"), dir.path().join("ca/ca.key"));
    let ca = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap();
    let mode = |path: &PathBuf| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&cert_path), 0o644);
    assert_eq!(mode(&dir.path().join("ca")), 0o700);
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), ca.cert_pem());
    assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    let suffix = ca
        .common_name()
        .strip_prefix(&format!("{CA_NAME_PREFIX} "))
        .unwrap_or_else(|| panic!("{:?}", ca.common_name()));
    assert!(
        suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
        "{suffix:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ca")).unwrap().collect();
    assert_eq!(leftovers.len(), 2, "no temporary files are left behind");

    let again = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap();
    assert_eq!(again.cert_pem(), ca.cert_pem(), "the same CA the second time");
    assert_eq!(again.common_name(), ca.common_name());
    // A leaf of the reloaded CA verifies against the first one's certificate.
    verify(&ca, &again.leaf_for(HOST).unwrap().cert[0], HOST);

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap_err();
    assert!(error.to_string().contains("chmod 600"), "{error}");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A key whose certificate was lost gets a new certificate; a certificate without its key
    // is an error.
    std::fs::remove_file(&cert_path).unwrap();
    let renewed = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap();
    assert_ne!(renewed.cert_pem(), ca.cert_pem());
    std::fs::remove_file(&key_path).unwrap();
    let error = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap_err();
    assert!(error.to_string().contains("its key"), "{error}");

    // A key that does not belong to the certificate is found at load.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, other_key) = (other.path().join("ca.pem"), other.path().join("ca.key"));
    CertificateAuthority::load_or_create(&other_cert, &other_key).unwrap();
    std::fs::copy(&other_key, &key_path).unwrap();
    let error = CertificateAuthority::load_or_create(&cert_path, &key_path).unwrap_err();
    assert!(error.to_string().contains("remove both files"), "{error}");
}

/// Verifies `leaf` for `name` as a client trusting only `ca` would.
fn verify(ca: &CertificateAuthority, leaf: &CertificateDer<'static>, name: &str) {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
        .unwrap_or_else(|e| panic!("{name:?}: {e}"));
}

#[test]
fn leaves_are_cached_per_host_and_name_the_host() {
    let ca = CertificateAuthority::generate().unwrap();
    let first = ca.leaf_for("Upstream.Test.").unwrap();
    let second = ca.leaf_for(HOST).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "the same leaf for the same host");
    assert!(Arc::ptr_eq(
        &ca.server_config_for(HOST).unwrap(),
        &ca.server_config_for(HOST).unwrap()
    ));
    let other = ca.leaf_for("other.test").unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    verify(&ca, &first.cert[0], HOST);
    verify(&ca, &other.cert[0], "other.test");

    // An IP literal gets an IP address as its alternative name.
    let ip = ca.leaf_for("127.0.0.1").unwrap();
    verify(&ca, &ip.cert[0], "127.0.0.1");
    let v6 = ca.leaf_for("[::1]").unwrap();
    verify(&ca, &v6.cert[0], "::1");
    assert!(Arc::ptr_eq(&v6, &ca.leaf_for("::1").unwrap()));

    // Valid for a week, not for ten years.
    let (_, parsed) = x509_parser::parse_x509_certificate(&first.cert[0]).unwrap();
    let validity = parsed.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
    assert!((7..=8).contains(&days), "{days} days");
}

/// Allows everything (loopback included) and asks for interception of [`HOST`] only.
struct InterceptingGate {
    injector: Arc<TestInjector>,
}

impl conductor_egress_proxy::Gate for InterceptingGate {
    fn check_name(&self, _host: &str, _port: u16) -> conductor_egress_proxy::Verdict {
        conductor_egress_proxy::Verdict::Allow { rule: "test".into() }
    }

    fn check_addr(&self, _host: &str, _addr: std::net::IpAddr, _port: u16) -> conductor_egress_proxy::Verdict {
        conductor_egress_proxy::Verdict::Allow { rule: "test".into() }
    }

    fn intercept(&self, host: &str, _port: u16) -> Option<Arc<dyn Injector>> {
        (host == HOST).then(|| self.injector.clone() as Arc<dyn Injector>)
    }
}

/// Sends `CONNECT host:port` over a fresh pipe to `proxy` and reads the reply's status line.
async fn connect_through(
    proxy: &Arc<conductor_egress_proxy::Proxy>,
    gate: &Arc<InterceptingGate>,
    host: &str,
    port: u16,
) -> (DuplexStream, JoinHandle<conductor_egress_proxy::EgressEvent>) {
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let (proxy, gate) = (proxy.clone(), gate.clone());
    let served = tokio::spawn(async move { proxy.serve(far, &*gate).await });
    near.write_all(format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        timeout(LIMIT, near.read_exact(&mut byte)).await.unwrap().unwrap();
        reply.push(byte[0]);
    }
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    (near, served)
}

#[tokio::test]
async fn a_proxy_with_interception_intercepts_what_the_gate_names_and_tunnels_the_rest() {
    let upstream = TestUpstream::start().await;
    let ca = ca();
    let injector = Arc::new(TestInjector::default());
    let gate = Arc::new(InterceptingGate {
        injector: injector.clone(),
    });
    let mut config = conductor_egress_proxy::ProxyConfig::default();
    config.resolver_override.insert(HOST.into(), vec![upstream.addr.ip()]);
    config
        .resolver_override
        .insert("plain.test".into(), vec![upstream.addr.ip()]);
    let proxy = Arc::new(conductor_egress_proxy::Proxy::with_interception(
        config,
        Arc::new(conductor_egress_proxy::Interception {
            ca: ca.clone(),
            trust: upstream.trust(),
            config: InterceptConfig::default(),
        }),
    ));
    assert!(proxy.intercepts());

    // The gate's host: TLS terminated with the conductor CA, the secret injected.
    let (pipe, served) = connect_through(&proxy, &gate, HOST, upstream.addr.port()).await;
    let mut sender = http_client(tls_client(&ca, HOST, pipe).await.unwrap()).await;
    let (status, _, body) = send(&mut sender, get("/via-proxy", &upstream.host_header())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("authorization: Bearer {SECRET}\n")), "{body}");
    drop(sender);
    let event = timeout(LIMIT, served).await.unwrap().unwrap();
    assert_eq!(event.decision, conductor_egress_proxy::Decision::Allowed);
    assert_eq!(event.injected, ["x"]);
    assert_eq!(event.resolved, Some(upstream.addr.ip()));
    assert_eq!(event.sni.as_deref(), Some(HOST));
    assert_eq!(event.error, None);
    assert!(event.bytes_up > 0 && event.bytes_down > 0, "{event:?}");

    // Another name: an untouched tunnel, so the conductor CA's client fails against the
    // upstream's own certificate, and nothing is injected.
    let calls = injector.calls();
    let (pipe, served) = connect_through(&proxy, &gate, "plain.test", upstream.addr.port()).await;
    assert!(tls_client(&ca, "plain.test", pipe).await.is_err());
    let event = timeout(LIMIT, served).await.unwrap().unwrap();
    assert!(event.injected.is_empty(), "{event:?}");
    assert_eq!(event.sni.as_deref(), Some("plain.test"));
    assert_eq!(injector.calls(), calls, "the injector is not asked about a tunnel");
}
