//! TLS interception for the hosts that have a secret-injection rule.
//!
//! A workspace must be able to use a token (a git remote's, a package index's, an API's)
//! without the token ever entering the workspace. The workspace holds a placeholder; the proxy,
//! on the host, puts the real value into the request on its way out. Over HTTPS that needs the
//! proxy to read and rewrite the request, so for the hosts that have an injection rule (and
//! only for those: every other host stays an untouched `CONNECT` tunnel) the proxy terminates
//! the workspace's TLS itself and speaks TLS again to the upstream:
//!
//! ```text
//! workspace ──TLS (leaf for host, signed by the conductor CA)──▶ proxy ──TLS (verified)──▶ host
//!                     HTTP/1.1 requests, headers passed to the Injector ─┘
//! ```
//!
//! The pieces:
//!
//! - [`CertificateAuthority`]: a per-instance CA, made at first use with rcgen and kept in two
//!   files (the key `0600`, the certificate `0644`, each published atomically). Its certificate
//!   ([`CertificateAuthority::cert_pem`]) goes into the workspaces' trust; its key never leaves
//!   the host. Leaves for intercepted hosts are issued on demand (ECDSA P-256, valid 7 days, the
//!   host as the only subject alternative name: a DNS name, or an IP address for an IP literal)
//!   and cached in memory for up to [`LEAF_CACHE_HOSTS`] hosts, least recently used first out.
//! - [`UpstreamTrust`]: what upstream certificates are verified against: the host's native
//!   roots (which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus extra CA files.
//! - [`Injector`]: the caller's logic that puts secrets into a request's headers. It is given
//!   only requests for the intercepted host, and reports the names (never the values) of the
//!   secrets it used, for the audit.
//! - [`intercept`]: one intercepted `CONNECT`, end to end, reported as an [`InterceptOutcome`].
//!
//! # What `intercept` guarantees
//!
//! - **One host per connection.** The client's TLS server name (SNI) must be the `CONNECT`
//!   host (or absent, as for an IP literal): another name is domain fronting, and the handshake
//!   is refused with a TLS alert before the upstream is even connected to. Every request must
//!   be in origin-form (`GET /path`) with a `Host` that names the `CONNECT` host and port; an
//!   absolute-form target or another `Host` is answered `421 Misdirected Request` by the proxy
//!   and never reaches the injector or the upstream. So a secret is only ever put into requests
//!   that go to the host it was meant for.
//! - **Only the checked address.** The proxy resolved the name and asked its gate about the
//!   address before calling [`intercept`]; `intercept` connects to that `upstream_addr` and to
//!   nothing else, reconnecting to the same address when the upstream closes a keep-alive
//!   connection.
//! - **The upstream is verified.** The upstream TLS uses the `CONNECT` host as server name and
//!   is verified against [`UpstreamTrust`]. When verification fails, the client's request is
//!   answered `502 Bad Gateway` with a plain-text body naming the host and the error, the
//!   connection is closed, and nothing (in particular no secret) is sent upstream.
//! - **Redirects do not carry secrets.** Responses are passed back unchanged (less hop-by-hop
//!   headers), a `Location` to another host included. Following it means a request to another
//!   host, which the client can only make through a new `CONNECT`: that connection is a plain
//!   tunnel, or an interception with that host's own rules. Nothing the proxy injected for this
//!   host ever goes to another one; a placeholder the client itself copies into its follow-up
//!   request stays a placeholder unless the other host has a rule for that secret.
//! - **Streaming.** Request and response bodies are streamed both ways by hyper, never buffered
//!   whole. A bodiless idempotent request that fails on a reused upstream connection (the
//!   upstream closed it as the request went out) is retried once on a new connection.
//!
//! # Limits
//!
//! - HTTP/1.1 only, on both sides (ALPN `http/1.1`): a client that offers only `h2` fails the
//!   handshake. Protocol upgrades (WebSocket) are not carried: `Upgrade` is a hop-by-hop header
//!   and is dropped, so the upstream answers as to a plain request.
//! - `Expect: 100-continue` is answered by the proxy's own HTTP server when it starts reading
//!   the body, and is not forwarded.
//! - [`InterceptOutcome::bytes_up`] and [`InterceptOutcome::bytes_down`] count the bytes on the
//!   upstream TCP connections (TLS records included), as [`EgressEvent`](crate::EgressEvent)
//!   counts a tunnel's.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderName, CONNECTION, CONTENT_TYPE, EXPECT, HOST, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout_at;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::head::host_port;
use crate::sni::same_host;

/// The common name of a new CA is this, a space and 8 random hex digits.
pub const CA_NAME_PREFIX: &str = "conductor egress CA";
/// How many hosts' leaves are kept in memory.
pub const LEAF_CACHE_HOSTS: usize = 1024;
/// How long an issued leaf is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf older than this is replaced, so a handshake never gets one about to expire.
const LEAF_REISSUE_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);
/// Leaves are valid from this long before their issue, for clocks a little behind.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// How long a new CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The name a leaf is issued for when a loaded CA is checked.
const SELF_TEST_NAME: &str = "conductor-ca-self-test.invalid";
const HTTP11: &[u8] = b"http/1.1";

/// What can go wrong setting up interception: the CA's files, issuing, the trust store.
#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl MitmError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

fn invalid(message: impl Into<String>) -> MitmError {
    MitmError::Invalid(message.into())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ----------------------------------------------------------------------------------------------
// The certificate authority
// ----------------------------------------------------------------------------------------------

/// The per-instance CA that signs the leaves shown to workspaces.
///
/// Cheap to share behind an `Arc`: leaf issuance takes `&self`.
pub struct CertificateAuthority {
    common_name: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<LeafCache>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// The CA kept in `cert_path` (PEM certificate) and `key_path` (PEM PKCS#8 key), made there
    /// first when neither exists.
    ///
    /// A new CA is an ECDSA P-256 key and a self-signed certificate, CN
    /// `conductor egress CA <8 hex digits>`, valid 10 years, that may sign end-entity
    /// certificates only (path length 0). Missing parent directories are made `0700`. Each
    /// file is written to a temporary file beside it, synced, and then linked into place only
    /// if nothing is there yet, so a reader never sees half a file and two processes starting
    /// at once end up with the same CA: the key `0600`, the certificate `0644`. A key without a
    /// certificate (a start interrupted between the two) gets a new certificate; a certificate
    /// without its key is an error, as is a key readable by group or others.
    ///
    /// A loaded CA is checked by issuing a leaf and verifying it against the certificate, so a
    /// key that does not match, or an expired CA, is an error here rather than at every
    /// handshake: remove both files to make a new CA (workspaces must then be given the new
    /// certificate).
    pub fn load_or_create(cert_path: impl AsRef<Path>, key_path: impl AsRef<Path>) -> Result<Self, MitmError> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        let provider = provider();
        for dir in [cert_path.parent(), key_path.parent()].into_iter().flatten() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(MitmError::io(format!("creating {}", dir.display())))?;
            }
        }
        // Each pass publishes at most one file (a file another process published first is
        // read on the next pass): the key, then the certificate, then both are loaded.
        for _ in 0..4 {
            match (key_path.exists(), cert_path.exists()) {
                (true, true) => return Self::load(cert_path, key_path, provider),
                (false, true) => {
                    return Err(invalid(format!(
                    "{} exists but its key {} does not: restore the key, or remove the certificate to make a new CA",
                    cert_path.display(),
                    key_path.display()
                )))
                }
                (true, false) => {
                    let key = read_key(key_path)?;
                    let (cert, _) = new_ca_certificate(&key, &provider)?;
                    publish(cert_path, cert.pem().as_bytes(), 0o644)?;
                }
                (false, false) => {
                    let key = KeyPair::generate().map_err(|e| invalid(format!("generating the CA key: {e}")))?;
                    publish(key_path, key.serialize_pem().as_bytes(), 0o600)?;
                }
            }
        }
        Err(invalid(format!(
            "{} and {} keep changing while being created",
            cert_path.display(),
            key_path.display()
        )))
    }

    /// A new CA kept only in memory (for tests, or an instance without a state directory).
    pub fn generate() -> Result<Self, MitmError> {
        let provider = provider();
        let key = KeyPair::generate().map_err(|e| invalid(format!("generating the CA key: {e}")))?;
        let (cert, params) = new_ca_certificate(&key, &provider)?;
        let common_name = common_name(&params.distinguished_name);
        Ok(Self::assemble(
            common_name,
            cert.pem(),
            cert.der().clone(),
            Issuer::new(params, key),
            provider,
        ))
    }

    fn load(cert_path: &Path, key_path: &Path, provider: Arc<CryptoProvider>) -> Result<Self, MitmError> {
        let key = read_key(key_path)?;
        let cert_pem =
            fs::read_to_string(cert_path).map_err(MitmError::io(format!("reading {}", cert_path.display())))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("{}: not a PEM certificate: {e}", cert_path.display())))?;
        let common_name = {
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
                .map_err(|e| invalid(format!("{}: not an X.509 certificate: {e}", cert_path.display())))?;
            if !parsed.is_ca() {
                return Err(invalid(format!("{}: not a CA certificate", cert_path.display())));
            }
            let name = parsed.subject().iter_common_name().next();
            name.and_then(|name| name.as_str().ok()).unwrap_or_default().to_owned()
        };
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(format!("{}: not a CA certificate: {e}", cert_path.display())))?;
        let ca = Self::assemble(common_name, cert_pem, cert_der, issuer, provider);
        ca.self_test().map_err(|e| {
            invalid(format!(
                "the CA in {} and {} cannot issue certificates that verify ({e}); remove both files to make a new CA",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        Ok(ca)
    }

    fn assemble(
        common_name: String,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            common_name,
            cert_pem,
            cert_der,
            issuer,
            provider,
            leaves: Mutex::new(LeafCache::default()),
        }
    }

    /// Issues a leaf and verifies it against the CA certificate, as a client would.
    fn self_test(&self) -> Result<(), String> {
        let leaf = self.issue(SELF_TEST_NAME).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(|e| e.to_string())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(SELF_TEST_NAME).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The CA certificate in PEM, for the workspaces' trust (CA bundle, `SSL_CERT_FILE`, …).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate's common name, `conductor egress CA …` for a CA made here.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The leaf for `host` (a DNS name or an IP literal, with or without brackets), from the
    /// cache or newly issued. The same host gets the same `Arc` until the leaf is six days old
    /// or has been evicted.
    pub fn leaf_for(&self, host: &str) -> Result<Arc<CertifiedKey>, MitmError> {
        Ok(self.cached(host)?.key)
    }

    /// A TLS server configuration presenting [`leaf_for`](Self::leaf_for)`(host)`, offering ALPN
    /// `http/1.1`. Cached with the leaf, so session resumption works across connections.
    pub fn server_config_for(&self, host: &str) -> Result<Arc<ServerConfig>, MitmError> {
        Ok(self.cached(host)?.config)
    }

    fn cached(&self, host: &str) -> Result<Leaf, MitmError> {
        let host = normalize_host(host);
        if let Some(leaf) = self.leaves.lock().expect("leaf cache lock").get(&host) {
            return Ok(leaf);
        }
        // Issued outside the lock: signing takes a while, and other hosts need not wait.
        let key = self.issue(&host)?;
        let config = self.server_config(key.clone())?;
        let leaf = Leaf {
            key,
            config,
            issued: Instant::now(),
        };
        Ok(self.leaves.lock().expect("leaf cache lock").insert(host, leaf))
    }

    fn issue(&self, host: &str) -> Result<Arc<CertifiedKey>, MitmError> {
        let failed = |e: &dyn std::fmt::Display| invalid(format!("issuing a certificate for {host:?}: {e}"));
        let key = KeyPair::generate().map_err(|e| failed(&e))?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(|e| failed(&e))?;
        let mut name = DistinguishedName::new();
        // X.509 bounds a common name to 64 characters; clients read the alternative name.
        if host.len() <= 64 {
            name.push(DnType::CommonName, host);
        }
        params.distinguished_name = name;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial(&self.provider)?);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| failed(&e))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| failed(&e))?;
        Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
    }

    fn server_config(&self, key: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>, MitmError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS server configuration: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Presents(Some(key))));
        config.alpn_protocols = vec![HTTP11.to_vec()];
        Ok(Arc::new(config))
    }

    /// A configuration whose handshakes all fail with an alert: for refusing a client.
    fn refusing_config(&self) -> Option<Arc<ServerConfig>> {
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Presents(None)));
        Some(Arc::new(config))
    }
}

/// A new CA certificate for `key`, and the parameters it was made from.
fn new_ca_certificate(
    key: &KeyPair,
    provider: &CryptoProvider,
) -> Result<(rcgen::Certificate, CertificateParams), MitmError> {
    let mut suffix = [0u8; 4];
    provider
        .secure_random
        .fill(&mut suffix)
        .map_err(|_| invalid("no random numbers for the CA's name"))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("{CA_NAME_PREFIX} {}", hex(&suffix)));
    name.push(DnType::OrganizationName, "conductor");
    params.distinguished_name = name;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - LEAF_BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial(provider)?);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(key)
        .map_err(|e| invalid(format!("making the CA certificate: {e}")))?;
    Ok((cert, params))
}

fn common_name(name: &DistinguishedName) -> String {
    match name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::PrintableString(s)) => s.to_string(),
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// 16 random bytes, positive as a DER integer.
fn random_serial(provider: &CryptoProvider) -> Result<SerialNumber, MitmError> {
    let mut serial = [0u8; 16];
    provider
        .secure_random
        .fill(&mut serial)
        .map_err(|_| invalid("no random numbers for a serial number"))?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&serial))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a PEM key, refusing one that group or others may read or write.
fn read_key(path: &Path) -> Result<KeyPair, MitmError> {
    let metadata = fs::metadata(path).map_err(MitmError::io(format!("reading {}", path.display())))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "{} is open to group or others (mode {mode:04o}): the CA key must be 0600 (chmod 600 {})",
            path.display(),
            path.display()
        )));
    }
    let pem = fs::read_to_string(path).map_err(MitmError::io(format!("reading {}", path.display())))?;
    KeyPair::from_pem(&pem).map_err(|e| invalid(format!("{}: not a PEM private key: {e}", path.display())))
}

/// Writes `contents` to `path` with `mode` if nothing is at `path` yet: into a temporary file
/// beside it, synced, then hard-linked into place (which fails if `path` exists).
fn publish(path: &Path, contents: &[u8], mode: u32) -> Result<(), MitmError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| invalid(format!("{} is not a file path", path.display())))?;
    let mut suffix = [0u8; 8];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut suffix)
        .map_err(|_| invalid("no random numbers for a temporary file name"))?;
    let temp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), hex(&suffix)));
    let context = || format!("writing {}", path.display());
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        // The umask may have taken bits away from `mode`; a 0600 stays 0600 either way.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    };
    if let Err(error) = write() {
        let _ = fs::remove_file(&temp);
        return Err(MitmError::io(context())(error));
    }
    let linked = match fs::hard_link(&temp, path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        // A file system without hard links: a rename is still atomic for readers.
        Err(_) if !path.exists() => fs::rename(&temp, path),
        Err(error) => Err(error),
    };
    let _ = fs::remove_file(&temp);
    linked.map_err(MitmError::io(context()))?;
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Lowercase, without a trailing dot or IPv6 brackets.
fn normalize_host(host: &str) -> String {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

/// Presents one certificate whatever the client asked for; `None` refuses every handshake.
#[derive(Debug)]
struct Presents(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for Presents {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

#[derive(Clone)]
struct Leaf {
    key: Arc<CertifiedKey>,
    config: Arc<ServerConfig>,
    issued: Instant,
}

/// Leaves by host, evicting the least recently used past [`LEAF_CACHE_HOSTS`].
#[derive(Default)]
struct LeafCache {
    entries: HashMap<String, (Leaf, u64)>,
    clock: u64,
}

impl LeafCache {
    fn get(&mut self, host: &str) -> Option<Leaf> {
        self.clock += 1;
        let clock = self.clock;
        let (leaf, used) = self.entries.get_mut(host)?;
        if leaf.issued.elapsed() >= LEAF_REISSUE_AFTER {
            return None;
        }
        *used = clock;
        Some(leaf.clone())
    }

    /// Keeps `leaf` for `host`, unless a fresh one was put there meanwhile; returns the kept.
    fn insert(&mut self, host: String, leaf: Leaf) -> Leaf {
        if let Some(kept) = self.get(&host) {
            return kept;
        }
        if self.entries.len() >= LEAF_CACHE_HOSTS && !self.entries.contains_key(&host) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(host, _)| host.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(host, (leaf.clone(), self.clock));
        leaf
    }
}

// ----------------------------------------------------------------------------------------------
// Upstream trust
// ----------------------------------------------------------------------------------------------

/// The certificates upstreams are verified against, as a TLS client configuration.
#[derive(Debug, Clone)]
pub struct UpstreamTrust {
    config: Arc<ClientConfig>,
    roots: usize,
    warnings: Vec<String>,
}

impl UpstreamTrust {
    /// The host's native roots (as `rustls-native-certs` finds them: the system bundle, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set) plus every certificate in each of
    /// `extra_ca_files` (PEM). An extra file that cannot be read or holds no certificate is an
    /// error naming it; native roots that cannot be loaded are only [`warnings`](Self::warnings).
    pub fn load(extra_ca_files: &[PathBuf]) -> Result<Self, MitmError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let mut warnings: Vec<String> = native.errors.iter().map(|e| format!("native roots: {e}")).collect();
        let (_, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            warnings.push(format!("native roots: {ignored} certificates could not be used"));
        }
        for path in extra_ca_files {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(format!("reading CA file {}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("reading CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(invalid(format!("CA file {} holds no PEM certificate", path.display())));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("CA file {}: {e}", path.display())))?;
            }
        }
        let mut trust = Self::from_root_store(roots)?;
        trust.warnings = warnings;
        Ok(trust)
    }

    /// Exactly the roots given, without the host's.
    pub fn from_root_store(roots: RootCertStore) -> Result<Self, MitmError> {
        let count = roots.len();
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS client configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![HTTP11.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            roots: count,
            warnings: Vec::new(),
        })
    }

    /// The TLS client configuration (ALPN `http/1.1`) that verifies upstreams.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// How many trusted roots there are.
    pub fn root_count(&self) -> usize {
        self.roots
    }

    /// What went wrong loading the native roots, for the operator's log.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

// ----------------------------------------------------------------------------------------------
// Injection and interception
// ----------------------------------------------------------------------------------------------

/// Puts secrets into the requests of an intercepted connection.
///
/// Called once for every request [`intercept`] forwards, after the request is known to be for
/// `host:port` (the `CONNECT` target) and after hop-by-hop headers are removed, with the headers
/// about to be sent. An implementation replaces placeholders in header values and/or sets
/// headers, and returns the names of the secrets it put in (for the audit; never values). It
/// decides itself which of its secrets belong to `host`.
pub trait Injector: Send + Sync {
    fn inject(&self, host: &str, port: u16, headers: &mut HeaderMap) -> Vec<String>;
}

/// Timeouts of [`intercept_with`]; [`Default`] has values for production.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// Bound on each TCP connection attempt to the upstream.
    pub connect_timeout: Duration,
    /// Bound on each TLS handshake, the client's (from its first byte) and each upstream's.
    pub handshake_timeout: Duration,
    /// Bound on receiving a request head, and so on a keep-alive connection's wait for the
    /// next request.
    pub request_head_timeout: Duration,
    /// The connection is closed after this long without a byte from either side.
    pub idle_timeout: Duration,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            request_head_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// How one intercepted connection went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptOutcome {
    /// Requests the client sent, forwarded or answered by the proxy.
    pub requests: u64,
    /// Of those, how many the proxy answered itself (`421`, `400`, `502`).
    pub refused: u64,
    /// The distinct names of the secrets injected into requests sent upstream, in first-use
    /// order.
    pub injected: Vec<String>,
    /// Bytes written to the upstream connections (TLS records, all connections together).
    pub bytes_up: u64,
    /// Bytes read from the upstream connections.
    pub bytes_down: u64,
    /// TCP+TLS connections made to the upstream.
    pub upstream_connections: u64,
    /// The server name of the client's ClientHello, if it sent one.
    pub sni: Option<String>,
    /// Set when the proxy refused the connection itself: `sni_mismatch`.
    pub reason: Option<String>,
    /// The first thing that went wrong: a refused handshake, an upstream that could not be
    /// connected to or verified, a misdirected request, an idle timeout.
    pub error: Option<String>,
}

/// [`intercept_with`] with [`InterceptConfig::default`].
pub async fn intercept<S>(
    client: S,
    host: &str,
    port: u16,
    upstream_addr: SocketAddr,
    ca: &CertificateAuthority,
    trust: &UpstreamTrust,
    injector: Arc<dyn Injector>,
) -> InterceptOutcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    intercept_with(
        client,
        host,
        port,
        upstream_addr,
        ca,
        trust,
        injector,
        &InterceptConfig::default(),
    )
    .await
}

/// Intercepts one `CONNECT` to `host:port` whose `200 Connection established` the proxy has
/// already sent: terminates the client's TLS with a leaf for `host`, connects to
/// `upstream_addr` (only there) with TLS verified against `trust`, and serves the client's
/// HTTP/1.1 requests over one upstream connection, each with [`Injector::inject`] applied.
/// Returns when the client is done, or on the first fatal error. See the [module](self)
/// documentation for what it guarantees.
#[allow(clippy::too_many_arguments)]
pub async fn intercept_with<S>(
    client: S,
    host: &str,
    port: u16,
    upstream_addr: SocketAddr,
    ca: &CertificateAuthority,
    trust: &UpstreamTrust,
    injector: Arc<dyn Injector>,
    config: &InterceptConfig,
) -> InterceptOutcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let meter = Arc::new(Meter::new());
    let record = Arc::new(Mutex::new(InterceptOutcome::default()));
    let host = normalize_host(host);
    let client = Metered::new(client, meter.clone(), Role::Client);
    let session = Session {
        target: host_port(&host, port),
        host,
        port,
        addr: upstream_addr,
        connector: TlsConnector::from(trust.client_config()),
        injector,
        config: config.clone(),
        upstream: tokio::sync::Mutex::new(Upstream::Idle),
        record: record.clone(),
        meter: meter.clone(),
        tasks: Mutex::new(JoinSet::new()),
    };
    tokio::select! {
        () = run(client, Arc::new(session), ca) => {}
        () = meter.idle(config.idle_timeout) => {
            note(&record, format!("closed after {:?} without a byte in either direction", config.idle_timeout));
        }
    }
    let mut outcome = record.lock().expect("outcome lock").clone();
    outcome.bytes_up = meter.up.load(Ordering::Relaxed);
    outcome.bytes_down = meter.down.load(Ordering::Relaxed);
    outcome
}

/// Records `error` unless an earlier one was recorded.
fn note(record: &Mutex<InterceptOutcome>, error: String) {
    record.lock().expect("outcome lock").error.get_or_insert(error);
}

async fn run<S>(client: Metered<S>, session: Arc<Session>, ca: &CertificateAuthority)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let record = &session.record;
    let handshake_timeout = session.config.handshake_timeout;
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let start = match timeout_at(
        deadline,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client),
    )
    .await
    {
        Ok(Ok(start)) => start,
        Ok(Err(error)) => return note(record, format!("reading the client's TLS ClientHello: {error}")),
        Err(_) => {
            return note(
                record,
                format!("no TLS ClientHello from the client within {handshake_timeout:?}"),
            )
        }
    };
    let sni = start.client_hello().server_name().map(str::to_ascii_lowercase);
    record.lock().expect("outcome lock").sni = sni.clone();
    if let Some(sni) = sni.filter(|sni| !same_host(sni, &session.host)) {
        {
            let mut record = record.lock().expect("outcome lock");
            record.reason = Some("sni_mismatch".to_owned());
            record.error = Some(format!(
                "the TLS server name {sni:?} is not the CONNECT host {:?}",
                session.host
            ));
        }
        // rustls ends the handshake with a fatal alert, which the client can show.
        if let Some(refusing) = ca.refusing_config() {
            let _ = timeout_at(deadline, start.into_stream(refusing)).await;
        }
        return;
    }
    let server_config = match ca.server_config_for(&session.host) {
        Ok(config) => config,
        Err(error) => return note(record, error.to_string()),
    };
    // The upstream handshake runs alongside the client's, so the first request need not wait.
    let (accepted, upstream) = tokio::join!(
        timeout_at(deadline, start.into_stream(server_config)),
        session.connect()
    );
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return note(record, format!("client TLS handshake: {error}")),
        Err(_) => {
            return note(
                record,
                format!("client TLS handshake not done within {handshake_timeout:?}"),
            )
        }
    };
    *session.upstream.lock().await = match upstream {
        Ok(sender) => Upstream::Open(sender),
        Err(failure) => {
            note(record, failure.error.clone());
            Upstream::Failed(failure)
        }
    };
    let service = {
        let session = session.clone();
        service_fn(move |request| {
            let session = session.clone();
            async move { Ok::<_, Infallible>(session.handle(request).await) }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(session.config.request_head_timeout)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(error) = served {
        // A keep-alive connection left idle ends with the head timeout, and a client that
        // closed first leaves no one to send close_notify to: neither is an error.
        if !error.is_timeout() && !error.is_shutdown() {
            note(record, format!("client connection: {error}"));
        }
    }
    session.tasks.lock().expect("tasks lock").abort_all();
}

/// The body of a request sent upstream: the client's, or none.
type UpBody = Either<Incoming, Empty<Bytes>>;
/// The body of a response to the client: the upstream's, or one of the proxy's answers.
type DownBody = Either<Incoming, Full<Bytes>>;

/// One intercepted connection's state, shared with its request handlers.
struct Session {
    host: String,
    port: u16,
    /// `host:port`, for messages.
    target: String,
    addr: SocketAddr,
    connector: TlsConnector,
    injector: Arc<dyn Injector>,
    config: InterceptConfig,
    upstream: tokio::sync::Mutex<Upstream>,
    record: Arc<Mutex<InterceptOutcome>>,
    meter: Arc<Meter>,
    /// The upstream connections' tasks, aborted when the interception ends.
    tasks: Mutex<JoinSet<()>>,
}

enum Upstream {
    /// None open: connect at the next request.
    Idle,
    Open(SendRequest<UpBody>),
    /// The first connection failed: every request is answered with this.
    Failed(Failure),
}

/// Why the upstream could not be reached: the `502` body and the outcome's error.
#[derive(Clone)]
struct Failure {
    answer: String,
    error: String,
}

impl Session {
    async fn handle(&self, request: Request<Incoming>) -> Response<DownBody> {
        self.record.lock().expect("outcome lock").requests += 1;
        let (mut parts, body) = request.into_parts();
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let error = format!(
                "a request for {} on the connection intercepted for {}",
                parts.uri, self.target
            );
            let answer = format!(
                "conductor egress proxy: this connection goes to {} only, and takes requests in origin-form \
                 (GET /path); {} is not one. A request for another host needs its own CONNECT.\n",
                self.target, parts.uri
            );
            return self.refuse(StatusCode::MISDIRECTED_REQUEST, error, answer, false);
        }
        match self.check_host(&parts.headers) {
            Ok(true) => {}
            Ok(false) => {
                let authority = match self.port {
                    443 => host_in_authority(&self.host),
                    _ => host_port(&self.host, self.port),
                };
                if let Ok(value) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(HOST, value);
                }
            }
            Err((status, why)) => {
                let error = format!("{why}, on the connection intercepted for {}", self.target);
                let answer = match status {
                    StatusCode::MISDIRECTED_REQUEST => format!(
                        "conductor egress proxy: this connection goes to {} only; {why}. A request for another \
                         host needs its own CONNECT.\n",
                        self.target
                    ),
                    _ => format!("conductor egress proxy: bad request: {why}.\n"),
                };
                let close = status != StatusCode::MISDIRECTED_REQUEST;
                return self.refuse(status, error, answer, close);
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(PROXY_AUTHORIZATION);
        // hyper's server sends the client its `100 Continue` when the body is first read.
        parts.headers.remove(EXPECT);
        let injected = self.injector.inject(&self.host, self.port, &mut parts.headers);
        let bodiless = body.is_end_stream();
        let replay = (bodiless && parts.method.is_idempotent()).then(|| {
            let mut copy = Request::new(Either::Right(Empty::new()));
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            copy
        });
        let body = if bodiless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        };
        match self.forward(Request::from_parts(parts, body), replay, injected).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(failure) => self.refuse(StatusCode::BAD_GATEWAY, failure.error, failure.answer, true),
        }
    }

    /// `Ok(true)` for a `Host` naming this connection's host and port, `Ok(false)` for none,
    /// else the status to answer and why.
    fn check_host(&self, headers: &HeaderMap) -> Result<bool, (StatusCode, String)> {
        let mut values = headers.get_all(HOST).iter();
        let Some(value) = values.next() else {
            return Ok(false);
        };
        if values.next().is_some() {
            return Err((StatusCode::BAD_REQUEST, "more than one Host header".to_owned()));
        }
        let bad = || {
            (
                StatusCode::BAD_REQUEST,
                format!("the Host header {value:?} is not host[:port]"),
            )
        };
        let text = value.to_str().map_err(|_| bad())?;
        if text.contains('@') {
            return Err(bad());
        }
        let authority: Authority = text.parse().map_err(|_| bad())?;
        let name = normalize_host(authority.host());
        let port = match authority.port() {
            Some(port) => port.as_u16(),
            None if text.ends_with(':') => return Err(bad()),
            None => 443,
        };
        if same_host(&name, &self.host) && port == self.port {
            Ok(true)
        } else {
            Err((
                StatusCode::MISDIRECTED_REQUEST,
                format!("the request's Host is {}", host_port(&name, port)),
            ))
        }
    }

    /// Sends `request` over the upstream connection, opening one when there is none or the
    /// last one closed.
    async fn forward(
        &self,
        mut request: Request<UpBody>,
        mut replay: Option<Request<UpBody>>,
        injected: Vec<String>,
    ) -> Result<Response<Incoming>, Failure> {
        let mut upstream = self.upstream.lock().await;
        let mut injected = Some(injected);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let open = match std::mem::replace(&mut *upstream, Upstream::Idle) {
                Upstream::Failed(failure) => {
                    *upstream = Upstream::Failed(failure.clone());
                    return Err(failure);
                }
                Upstream::Open(mut sender) => sender.ready().await.is_ok().then_some(sender),
                Upstream::Idle => None,
            };
            let (mut sender, reused) = match open {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Some(names) = injected.take() {
                let mut record = self.record.lock().expect("outcome lock");
                for name in names {
                    if !record.injected.contains(&name) {
                        record.injected.push(name);
                    }
                }
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    *upstream = Upstream::Open(sender);
                    return Ok(response);
                }
                Err(mut error) => {
                    // Not sent at all (the connection closed first), or a bodiless idempotent
                    // request that a reused connection lost: once more on a new connection.
                    let again = match error.take_message() {
                        Some(unsent) => Some(unsent),
                        None if reused => replay.take(),
                        None => None,
                    };
                    match again {
                        Some(again) if attempts < 2 => request = again,
                        _ => {
                            let error = error.into_error();
                            return Err(Failure {
                                answer: format!(
                                    "conductor egress proxy: the exchange with {} failed: {error}.\n",
                                    self.target
                                ),
                                error: format!("forwarding to {}: {error}", self.target),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Opens a TCP and TLS connection to the checked address, verified for the host.
    async fn connect(&self) -> Result<SendRequest<UpBody>, Failure> {
        let (target, addr) = (&self.target, self.addr);
        let unreachable = |error: String| Failure {
            answer: format!("conductor egress proxy: could not connect to {target}: {error}.\n"),
            error,
        };
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        let tcp = match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(unreachable(format!("connecting to {addr}: {error}"))),
            Err(_) => {
                return Err(unreachable(format!(
                    "connecting to {addr}: no answer within {:?}",
                    self.config.connect_timeout
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let server_name = match ServerName::try_from(self.host.clone()) {
            Ok(name) => name,
            Err(error) => {
                return Err(unreachable(format!(
                    "{:?} is not a TLS server name: {error}",
                    self.host
                )))
            }
        };
        let deadline = tokio::time::Instant::now() + self.config.handshake_timeout;
        let metered = Metered::new(tcp, self.meter.clone(), Role::Upstream);
        let tls = match timeout_at(deadline, self.connector.connect(server_name, metered)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let rustls_error = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
                return Err(match rustls_error {
                    Some(error @ rustls::Error::InvalidCertificate(_)) => Failure {
                        answer: format!(
                            "conductor egress proxy: the TLS certificate of {target} could not be verified: {error}. \
                             The proxy checks upstream certificates against the host's trust store and its extra CA \
                             files; if {} uses a private CA, add that CA there.\n",
                            self.host
                        ),
                        error: format!("verifying the TLS certificate of {target} ({addr}): {error}"),
                    },
                    _ => unreachable(format!("TLS handshake with {addr}: {error}")),
                });
            }
            Err(_) => {
                return Err(unreachable(format!(
                    "TLS handshake with {addr} not done within {:?}",
                    self.config.handshake_timeout
                )))
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|error| unreachable(format!("starting HTTP/1.1 with {addr}: {error}")))?;
        self.record.lock().expect("outcome lock").upstream_connections += 1;
        let record = self.record.clone();
        let target = target.clone();
        self.tasks.lock().expect("tasks lock").spawn(async move {
            if let Err(error) = connection.await {
                note(&record, format!("upstream connection to {target}: {error}"));
            }
        });
        Ok(sender)
    }

    /// One of the proxy's own answers; `close` ends the connection after it.
    fn refuse(&self, status: StatusCode, error: String, answer: String, close: bool) -> Response<DownBody> {
        {
            let mut record = self.record.lock().expect("outcome lock");
            record.refused += 1;
            record.error.get_or_insert(error);
        }
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(answer))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `host` as it appears in a URL authority: IPv6 in brackets.
fn host_in_authority(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]"),
        _ => host.to_owned(),
    }
}

/// Removes the headers that concern only one hop (RFC 9110 §7.6.1), those the message's
/// `Connection` names included (except `Host` and `Content-Length`, which frame the message).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| *name != HOST && *name != http::header::CONTENT_LENGTH)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

// ----------------------------------------------------------------------------------------------
// Byte counts and the idle timer
// ----------------------------------------------------------------------------------------------

/// Counts the upstream bytes and notes when any byte last moved.
struct Meter {
    start: Instant,
    /// Milliseconds from `start` to the last byte either way.
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Meter {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// Returns once `idle` has passed without a byte.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Client,
    Upstream,
}

/// A stream that reports its traffic to a [`Meter`].
struct Metered<T> {
    inner: T,
    meter: Arc<Meter>,
    role: Role,
}

impl<T> Metered<T> {
    fn new(inner: T, meter: Arc<Meter>, role: Role) -> Self {
        Self { inner, meter, role }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.meter.touch();
            if let Role::Upstream = self.role {
                self.meter.up.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.meter.touch();
            if let Role::Upstream = this.role {
                this.meter.down.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.wrote(n);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.wrote(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ----------------------------------------------------------------------------------------------
// Handing over bytes already read
// ----------------------------------------------------------------------------------------------

/// A stream that first yields bytes already read from it: for the client bytes the proxy read
/// past the `CONNECT` head (a ClientHello sent without waiting for the `200`), before handing
/// the stream to [`intercept`].
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM."), "example.com");
        assert_eq!(normalize_host("[::1]"), "::1");
        assert_eq!(normalize_host("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn hop_by_hop_headers_go_and_framing_stays() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Hop, Host, Content-Length"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "a.test"),
            ("content-length", "3"),
            ("authorization", "Bearer x"),
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-length", "host"]);
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used() {
        let ca = CertificateAuthority::generate().unwrap();
        let leaf = || {
            let key = ca.issue("a.test").unwrap();
            Leaf {
                config: ca.server_config(key.clone()).unwrap(),
                key,
                issued: Instant::now(),
            }
        };
        let mut cache = LeafCache::default();
        let template = leaf();
        for i in 0..LEAF_CACHE_HOSTS {
            cache.insert(format!("h{i}.test"), template.clone());
        }
        assert!(cache.get("h0.test").is_some(), "h0 is now the most recently used");
        cache.insert("new.test".into(), template.clone());
        assert_eq!(cache.entries.len(), LEAF_CACHE_HOSTS);
        assert!(cache.get("h1.test").is_none(), "h1 was the least recently used");
        assert!(cache.get("h0.test").is_some());
        assert!(cache.get("new.test").is_some());
        let stale = Leaf {
            issued: Instant::now() - LEAF_REISSUE_AFTER,
            ..template
        };
        cache.entries.insert("stale.test".into(), (stale, 0));
        assert!(cache.get("stale.test").is_none(), "an old leaf is issued anew");
    }

    #[tokio::test]
    async fn prefixed_yields_the_prefix_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut near, far) = tokio::io::duplex(64);
        let mut stream = Prefixed::new(b"hello ".to_vec(), far);
        near.write_all(b"world").await.unwrap();
        drop(near);
        let mut got = String::new();
        stream.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }
}
