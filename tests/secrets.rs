//! Secrets injected by the egress proxy, from inside real workspaces (docs/egress.md,
//! "Secrets").
//!
//! The upstream is this test's own HTTPS server in a network namespace it creates
//! ([`Upstream`]: a veth pair on a /30 of 198.51.100.240/29, TEST-NET-2 above what
//! `tests/egress.rs` and `benches/egress.rs` use), with a certificate from a test CA that
//! the proxy trusts through `network.egress.upstream_ca_files`. Names reach it only through
//! `network.egress.resolve`. It serves three names:
//!
//! - `git.test`: `git http-backend` (CGI) over a bare repository the test makes, behind
//!   HTTP Basic `x-access-token:<token>`;
//! - `echo.test`: records every request's headers (it answers `ok`, never echoing them: a
//!   host that reflects a credential hands it to whoever asks); `/redirect` answers `302`
//!   to `https://other.test/landed`;
//! - `other.test`: the same recorder, a host without a rule.

mod common;

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{quiet, TestEnv};
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::lifecycle::TaskState;
use conductor_core::secrets::{Injection, InjectionRule};
use conductor_core::task::TaskSpec;
use conductor_service::exec::ExecRequest;
use conductor_service::tasks::Orchestrator;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};
use conductor_store::{EgressEventRecord, EgressFilter};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// What the upstream saw: one entry per request.
#[derive(Debug, Clone)]
struct Seen {
    host: String,
    path: String,
    headers: Vec<(String, String)>,
}

/// The /30 blocks this file may use (198.51.100.240/30 and .244/30): at most two upstreams
/// at once, the others wait.
static BLOCKS: Mutex<[bool; 2]> = Mutex::new([false; 2]);
static NEXT: AtomicU32 = AtomicU32::new(0);

fn take_block() -> usize {
    loop {
        {
            let mut blocks = BLOCKS.lock().unwrap();
            if let Some(i) = blocks.iter().position(|taken| !taken) {
                blocks[i] = true;
                return i;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ip(args: &[&str]) {
    let out = Process::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &mut Process) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Standard base64, to check the Basic credential independently of conductor's encoder.
fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Upstream {
    ns: String,
    host_if: String,
    block: usize,
    addr: Ipv4Addr,
    /// The test CA's certificate, for `network.egress.upstream_ca_files`.
    ca_file: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

struct State {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The token `git.test` wants.
    git_token: String,
    git_root: PathBuf,
}

impl Upstream {
    async fn start(git_token: &str) -> Upstream {
        let block = take_block();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let ns = format!("csec-{tag}");
        let (host_if, ns_if) = (format!("csh{tag}"), format!("csn{tag}"));
        let base = 240 + 4 * block as u8;
        let host_addr = Ipv4Addr::new(198, 51, 100, base + 1);
        let addr = Ipv4Addr::new(198, 51, 100, base + 2);
        let _ = Process::new("ip").args(["netns", "del", &ns]).output();
        let _ = Process::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/30"), "dev", &ns_if]);
        ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);

        let dir = tempfile::Builder::new()
            .prefix("conductor-secrets-upstream-")
            .tempdir_in(common::test_root())
            .unwrap();
        // The test CA and a leaf for the three names.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conductor secrets test upstream CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["git.test".into(), "echo.test".into(), "other.test".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_file = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        // A bare repository with one commit.
        let git_root = dir.path().join("git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        run(Process::new("git")
            .args(["init", "-q", "--bare"])
            .arg(git_root.join("repo.git")));
        run(Process::new("git").args(["init", "-q"]).arg(&work));
        std::fs::write(work.join("README"), "private repository\n").unwrap();
        let git = |args: &[&str]| {
            let mut c = Process::new("git");
            c.arg("-C")
                .arg(&work)
                .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
                .args(args);
            c
        };
        run(&mut git(&["add", "README"]));
        run(&mut git(&["commit", "-q", "-m", "first"]));
        run(&mut git(&[
            "push",
            "-q",
            git_root.join("repo.git").to_str().unwrap(),
            "HEAD:refs/heads/main",
        ]));
        run(Process::new("git").arg("-C").arg(git_root.join("repo.git")).args([
            "symbolic-ref",
            "HEAD",
            "refs/heads/main",
        ]));

        // Bound inside the namespace by a thread that entered it; served from here.
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(ns_path).expect("open the netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the netns");
            let listener = std::net::TcpListener::bind((addr, 443)).expect("bind in the netns");
            listener.set_nonblocking(true).unwrap();
            tx.send(listener).unwrap();
        });
        let listener = tokio::net::TcpListener::from_std(rx.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let state = Arc::new(State {
            seen: seen.clone(),
            git_token: git_token.to_string(),
            git_root,
        });
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Upstream {
            ns,
            host_if,
            block,
            addr,
            ca_file,
            seen,
            accept,
            _dir: dir,
        }
    }

    fn seen(&self, host: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.host == host)
            .cloned()
            .collect()
    }

    /// The `network.egress` keys that reach it and trust its CA.
    fn egress_config(&self) -> String {
        let addr = self.addr;
        format!(
            "network:\n  egress:\n    upstream_ca_files: [\"{}\"]\n    resolve:\n      git.test: [\"{addr}\"]\n      echo.test: [\"{addr}\"]\n      other.test: [\"{addr}\"]\n",
            self.ca_file.display()
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = Process::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Process::new("ip").args(["netns", "del", &self.ns]).output();
        BLOCKS.lock().unwrap()[self.block] = false;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("")
        .to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    state.seen.lock().unwrap().push(Seen {
        host: host.clone(),
        path: req.uri().path().to_string(),
        headers: headers.clone(),
    });
    match (host.as_str(), req.uri().path()) {
        ("git.test", _) => {
            let want = format!(
                "Basic {}",
                base64(format!("x-access-token:{}", state.git_token).as_bytes())
            );
            let got = headers
                .iter()
                .find(|(n, _)| n == "authorization")
                .map(|(_, v)| v.as_str());
            if got != Some(want.as_str()) {
                let mut r = text(StatusCode::UNAUTHORIZED, "authentication required\n");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"git\""),
                );
                return r;
            }
            git_cgi(&state.git_root, req).await
        }
        ("echo.test", "/redirect") => {
            let mut r = text(StatusCode::FOUND, "");
            r.headers_mut().insert(
                http::header::LOCATION,
                http::HeaderValue::from_static("https://other.test/landed"),
            );
            r
        }
        _ => text(StatusCode::OK, "ok\n"),
    }
}

/// `git http-backend` as CGI: the request as variables and stdin, the output's headers
/// (`Status:` among them) and body as the response.
async fn git_cgi(root: &Path, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "198.51.100.1");
    if let Some(t) = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        cmd.env("CONTENT_TYPE", t);
    }
    for (name, value) in &parts.headers {
        if let Ok(v) = value.to_str() {
            let var = format!("HTTP_{}", name.as_str().to_ascii_uppercase().replace('-', "_"));
            if var != "HTTP_AUTHORIZATION" {
                cmd.env(var, v);
            }
        }
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let feed = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("git http-backend ends");
    let _ = feed.await;
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, sep)) = split else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("bad CGI output: {}", String::from_utf8_lossy(&out.stderr)),
        );
    };
    let mut response = text(StatusCode::OK, Bytes::copy_from_slice(&raw[end + sep..]));
    for line in String::from_utf8_lossy(&raw[..end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            if let Some(code) = value.split_whitespace().next().and_then(|c| c.parse::<u16>().ok()) {
                *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            }
        } else if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(n, v);
        }
    }
    response
}

/// The test's conductor, taken out of its [`TestEnv`] to be shared with an orchestrator
/// (a second `Conductor::open` would share, and on drop stop, the first one's Podman
/// service). Dropping it removes every workspace, as the `TestEnv` would, also after a
/// failure; declared after the `TestEnv`, it goes first.
/// A value of `prefix` and 24 random hex digits: nothing else could contain it by chance.
fn token(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

fn header_rule(host: &str, name: &str, template: &str) -> InjectionRule {
    InjectionRule {
        host: host.into(),
        inject: Injection::Header {
            name: name.into(),
            value: template.into(),
        },
    }
}

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out, err)
}

async fn sh_in(c: &Conductor, id: &str, cmd: &str, stdin: &[u8]) -> (i64, String, String) {
    let mut req = ExecRequest::new(cmd);
    req.stdin = Some(Bytes::copy_from_slice(stdin));
    let (o, out, err) = c.exec_collect(id, req).await.expect("exec");
    (o.exit_code, out, err)
}

async fn create(c: &Conductor, agent: &str, secrets: &[&str], allow: &[&str]) -> WorkspaceInfo {
    c.create_workspace(
        CreateRequest {
            agent_id: agent.into(),
            environment: "python-dev".into(),
            network: (!allow.is_empty()).then(|| NetworkPolicy::allow(allow)),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        quiet(),
    )
    .await
    .expect("create workspace")
}

/// The workspace's audit rows, waiting until one for `host` has `done` true (rows are
/// written when a connection ends).
async fn rows_for(
    c: &Conductor,
    id: &str,
    host: &str,
    done: impl Fn(&[EgressEventRecord]) -> bool,
) -> Vec<EgressEventRecord> {
    let begin = Instant::now();
    loop {
        let rows: Vec<_> = c
            .egress_events(
                id,
                EgressFilter {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .unwrap()
            .into_iter()
            .filter(|r| r.host == host)
            .collect();
        if done(&rows) || begin.elapsed() > Duration::from_secs(10) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The value appears nowhere the workspace can see: its environment, every readable
/// `/proc/*/environ` and `cmdline`, and files under /workspace /tmp /etc /home (searched by
/// `grep -F` reading the value from stdin, so that no command line ever holds it).
async fn assert_not_inside(c: &Conductor, id: &str, value: &str) {
    let (_, env, _) = sh(c, id, "env").await;
    assert!(!env.contains(value), "the environment holds the value");
    let (_, procs, _) = sh(
        c,
        id,
        "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do cat \"$f\" 2>/dev/null | tr '\\0' '\\n'; echo; done",
    )
    .await;
    assert!(procs.len() > 100, "the processes were read: {procs}");
    assert!(
        !procs.contains(value),
        "a process's environment or command line holds the value"
    );
    let (code, files, err) = sh_in(
        c,
        id,
        "grep -rlF -f /dev/stdin /workspace /tmp /etc /home 2>/dev/null; echo \"grep=$?\"",
        value.as_bytes(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // grep exits 1 when nothing matched (2 for unreadable files, with nothing listed).
    assert!(
        files.trim() == "grep=1" || files.trim() == "grep=2",
        "files hold the value: {files}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_works_with_the_injected_secret_which_appears_nowhere_inside() {
    let git_token = token("ghs_");
    let up = Upstream::start(&git_token).await;
    let secret_dir = tempfile::tempdir_in(common::test_root()).unwrap();
    let secret_file = secret_dir.path().join("git-token");
    std::fs::write(&secret_file, format!("{git_token}\n")).unwrap();
    let extra = format!(
        "{}secrets:\n  define:\n    - name: gitcred\n      from_file: {}\n      rules: [{{host: git.test, inject: {{type: basic, username: x-access-token}}}}]\n",
        up.egress_config(),
        secret_file.display()
    );
    let mut t = TestEnv::new(&extra).await;
    let owned = common::Owned::take(&mut t);
    let c = owned.0.clone();

    // The database and the key files are readable by root only.
    let base = t.dir.path();
    let list = c.list_secrets().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].name.as_str(), list[0].env_var.as_str()),
        ("gitcred", "GITCRED_TOKEN")
    );
    let w = create(&c, "sec1", &["gitcred"], &[]).await;
    assert_eq!(w.network_policy.mode, NetworkMode::Proxy, "secrets imply proxy mode");
    assert!(
        w.network_policy.allow.contains(&"git.test:443".to_string()),
        "the rule's host is allowed: {:?}",
        w.network_policy.allow
    );
    assert_eq!(w.secrets, ["gitcred"]);
    let db = &c.paths.database;
    for path in [
        db.clone(),
        PathBuf::from(format!("{}-wal", db.display())),
        PathBuf::from(format!("{}-shm", db.display())),
        base.join("secrets.key"),
        base.join("egress-ca.key"),
    ] {
        assert_eq!(mode_of(&path), 0o600, "{}", path.display());
    }

    // The placeholder, and the conductor CA in the trust.
    let (_, env, _) = sh(
        &c,
        &w.id,
        "echo $GITCRED_TOKEN; echo $GIT_SSL_CAINFO $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS",
    )
    .await;
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines[0].starts_with("conductor-secret-gitcred-"), "{env}");
    assert_eq!(lines[0].len(), "conductor-secret-gitcred-".len() + 32, "{env}");
    assert_eq!(
        lines[1],
        "/run/conductor-egress/bundle.crt /run/conductor-egress/bundle.crt /run/conductor-egress/ca.crt"
    );
    let placeholder = lines[0].to_string();

    // git clone: the proxy terminates TLS for git.test and puts the credential in.
    let (code, out, err) = sh(
        &c,
        &w.id,
        "cd /workspace && GIT_TERMINAL_PROMPT=0 timeout 60 git clone -q https://git.test/repo.git && cat repo/README",
    )
    .await;
    assert_eq!((code, out.trim()), (0, "private repository"), "{err}");
    let expected = format!("Basic {}", base64(format!("x-access-token:{git_token}").as_bytes()));
    let seen = up.seen("git.test");
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|s| s.headers.iter().any(|(n, v)| n == "authorization" && *v == expected)),
        "the upstream saw the real credential on every request: {seen:?}"
    );
    assert!(seen.iter().any(|s| s.path.ends_with("/git-upload-pack")));
    let rows = rows_for(&c, &w.id, "git.test", |r| r.iter().any(|r| !r.injected.is_empty())).await;
    let row = rows.iter().find(|r| !r.injected.is_empty()).expect("an audit row");
    assert_eq!(row.injected, ["gitcred"], "{row:?}");
    assert_eq!(row.method, "CONNECT");
    assert!(row.bytes_up > 0 && row.bytes_down > 0, "{row:?}");

    // A sandbox task with the secret: its logs and results hold no value either.
    let orchestrator = Orchestrator::start(c.clone());
    let mut spec = TaskSpec::new(
        "python-dev",
        vec![
            "cd /workspace && GIT_TERMINAL_PROMPT=0 timeout 60 git clone -q https://git.test/repo.git".into(),
            "cat /workspace/repo/README; env | sort".into(),
        ],
    );
    spec.secrets = vec!["gitcred".into()];
    let task = c.submit_tasks(vec![spec]).unwrap().remove(0);
    let done = tokio::time::timeout(Duration::from_secs(180), c.wait_task(&task.id))
        .await
        .expect("the task ends")
        .unwrap();
    assert_eq!(done.status, TaskState::Succeeded, "{done:?}");
    let view = serde_json::to_string(&c.get_task(&task.id).unwrap()).unwrap();
    assert!(view.contains("private repository") && view.contains("GITCRED_TOKEN=conductor-secret-gitcred-"));
    assert!(!view.contains(&git_token), "the task's result holds the value");
    let log = c.read_task_log(&task.id, 0).unwrap();
    assert!(!log.is_empty());
    assert!(
        log.iter().all(|(_, _, text)| !text.contains(&git_token)),
        "the task's log holds the value"
    );
    orchestrator.shutdown(Duration::from_secs(10)).await;

    // Nowhere inside the workspace, nor in the audit, the API's view or `ws inspect`.
    assert_not_inside(&c, &w.id, &git_token).await;
    // Nor in a snapshot (seen through a fork made from it) or a fork of the live workspace.
    c.create_snapshot(&w.id, "after-clone", false).await.unwrap();
    for snapshot in [Some("after-clone".to_string()), None] {
        let fork = c
            .fork_workspace(
                &w.id,
                conductor_service::fork::ForkRequest {
                    count: 1,
                    snapshot,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let copy = &fork.workspaces[0];
        // The copy holds the clone.
        let (_, readme, _) = sh(&c, &copy.id, "cat /workspace/repo/README").await;
        assert!(readme.contains("private repository"), "{readme}");
        assert_not_inside(&c, &copy.id, &git_token).await;
        c.remove_workspace(&copy.id, Some(false)).await.unwrap();
    }
    let audit = c
        .egress_events(
            &w.id,
            EgressFilter {
                limit: 1000,
                ..Default::default()
            },
        )
        .unwrap();
    let audit = serde_json::to_string(&audit).unwrap();
    assert!(audit.contains("\"injected\":[\"gitcred\"]"), "{audit}");
    assert!(!audit.contains(&git_token));
    let info = serde_json::to_string(&c.get_workspace(&w.id).unwrap()).unwrap();
    assert!(!info.contains(&git_token) && !info.contains(&placeholder), "{info}");
    let (ok, out, err) = common::cli(&t.config_path(), &["ws", "inspect", &w.id, "--json"], None);
    assert!(ok, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("\"gitcred\""), "{out}");
    assert!(!out.contains(&git_token) && !err.contains(&git_token));

    // Without the secret: git reaches the server (through an untouched tunnel, trusting
    // the test CA) and is refused.
    let plain = create(&c, "sec2", &[], &["git.test"]).await;
    let (code, _, err) = sh_in(
        &c,
        &plain.id,
        "cat > /tmp/upstream-ca.pem",
        std::fs::read(&up.ca_file).unwrap().as_slice(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let before = up.seen("git.test").len();
    let (code, out, err) = sh(
        &c,
        &plain.id,
        "cd /tmp && GIT_SSL_CAINFO=/tmp/upstream-ca.pem GIT_TERMINAL_PROMPT=0 timeout 60 git clone -q https://git.test/repo.git",
    )
    .await;
    assert_ne!(code, 0, "cloned without the secret: {out}");
    assert!(
        err.contains("Authentication failed") || err.contains("could not read Username") || err.contains("401"),
        "{err}"
    );
    let after = up.seen("git.test");
    assert!(after.len() > before, "the server was reached");
    assert!(
        after[before..]
            .iter()
            .all(|s| s.headers.iter().all(|(n, _)| n != "authorization")),
        "nothing was injected: {:?}",
        &after[before..]
    );
    let rows = rows_for(&c, &plain.id, "git.test", |r| !r.is_empty()).await;
    assert!(rows.iter().all(|r| r.injected.is_empty()), "{rows:?}");
    drop(c);
    drop(owned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_stay_placeholders_elsewhere_redirects_carry_nothing_and_rotation_applies() {
    let up = Upstream::start("unused").await;
    let t = TestEnv::new(&up.egress_config()).await;
    let c = t.c();
    let first = token("sk_first_");
    let info = c
        .put_secret(
            "echoapi",
            first.as_bytes(),
            vec![header_rule("echo.test", "Authorization", "Bearer {value}")],
        )
        .unwrap();
    assert_eq!((info.version, info.env_var.as_str()), (1, "ECHOAPI_TOKEN"));
    let w = create(c, "sec3", &["echoapi"], &["other.test"]).await;
    let (_, placeholder, _) = sh(c, &w.id, "printf %s \"$ECHOAPI_TOKEN\"").await;
    assert!(placeholder.starts_with("conductor-secret-echoapi-"), "{placeholder}");

    // The rule's host: the header is set (whatever was sent), placeholders elsewhere in the
    // request are replaced.
    let curl = "curl -s -m 20 -o /dev/null -w '%{http_code}' -H \"X-Copy: $ECHOAPI_TOKEN\" https://echo.test/one";
    let (_, status, err) = sh(c, &w.id, curl).await;
    assert_eq!(status, "200", "{err}");
    let seen = up.seen("echo.test").pop().expect("a request");
    let header = |s: &Seen, name: &str| s.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(header(&seen, "authorization"), Some(format!("Bearer {first}")));
    assert_eq!(header(&seen, "x-copy"), Some(first.clone()));

    // Another allowed host (an untouched tunnel): the placeholder goes out as it is.
    let (_, status, err) = sh(
        c,
        &w.id,
        "curl -sk -m 20 -o /dev/null -w '%{http_code}' -H \"Authorization: Bearer $ECHOAPI_TOKEN\" https://other.test/elsewhere",
    )
    .await;
    assert_eq!(status, "200", "{err}");
    let seen = up.seen("other.test").pop().expect("a request");
    assert_eq!(header(&seen, "authorization"), Some(format!("Bearer {placeholder}")));
    let rows = rows_for(c, &w.id, "other.test", |r| !r.is_empty()).await;
    assert!(rows.iter().all(|r| r.injected.is_empty()), "{rows:?}");

    // A redirect to another host: followed (even with curl sending its headers on), the
    // other host gets the placeholder, never the value.
    let (_, status, err) = sh(
        c,
        &w.id,
        "curl -sk -m 20 -L --location-trusted -o /dev/null -w '%{http_code}' -H \"Authorization: Bearer $ECHOAPI_TOKEN\" https://echo.test/redirect",
    )
    .await;
    assert_eq!(status, "200", "{err}");
    let landed = up
        .seen("other.test")
        .into_iter()
        .find(|s| s.path == "/landed")
        .expect("followed");
    assert_eq!(header(&landed, "authorization"), Some(format!("Bearer {placeholder}")));
    assert!(
        up.seen("other.test")
            .iter()
            .all(|s| s.headers.iter().all(|(_, v)| !v.contains(&first))),
        "the value never reached other.test"
    );

    // Rotation: a new connection gets the new value.
    let second = token("sk_second_");
    let info = c
        .put_secret(
            "echoapi",
            second.as_bytes(),
            vec![header_rule("echo.test", "Authorization", "Bearer {value}")],
        )
        .unwrap();
    assert_eq!(info.version, 2);
    let (_, status, err) = sh(c, &w.id, curl).await;
    assert_eq!(status, "200", "{err}");
    let seen = up.seen("echo.test").pop().expect("a request");
    assert_eq!(header(&seen, "authorization"), Some(format!("Bearer {second}")));
    let rows = rows_for(c, &w.id, "echo.test", |r| {
        r.iter().filter(|r| !r.injected.is_empty()).count() >= 3
    })
    .await;
    assert!(
        rows.iter().filter(|r| r.injected == ["echoapi"]).count() >= 3,
        "every connection to echo.test is recorded with the secret's name: {rows:?}"
    );
    let all = serde_json::to_string(&rows).unwrap();
    assert!(!all.contains(&first) && !all.contains(&second));
    assert!(c.list_secrets().unwrap().iter().all(|s| s.version == 2));
    assert_not_inside(c, &w.id, &first).await;
    assert_not_inside(c, &w.id, &second).await;

    // Deleted: the placeholder goes out unchanged from then on.
    c.delete_secret("echoapi").unwrap();
    let (_, status, err) = sh(
        c,
        &w.id,
        "curl -s -m 20 -o /dev/null -w '%{http_code}' -H \"Authorization: Bearer $ECHOAPI_TOKEN\" https://echo.test/after",
    )
    .await;
    // A plain tunnel now, to a certificate the workspace does not trust.
    assert_ne!(status, "200", "{err}");
    assert!(
        up.seen("echo.test").iter().all(|s| s.path != "/after"),
        "nothing reached the upstream over an untrusted tunnel"
    );
}

/// The field and message of an `Invalid` error.
fn invalid<T: std::fmt::Debug>(r: Result<T, ServiceError>) -> (String, String) {
    match r {
        Err(ServiceError::Invalid { field, message }) => (field, message),
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_unknown_secrets_and_secrets_outside_the_bound_are_refused_by_field() {
    let t = TestEnv::new("secrets:\n  max_allow: [allowed]\n").await;
    let c = t.c();
    let rule = || header_rule("api.example.com", "Authorization", "Bearer {value}");
    // Bad rules and values.
    let (f, m) = invalid(c.put_secret(
        "allowed",
        b"v",
        vec![rule(), header_rule("a..b.example", "X", "{value}")],
    ));
    assert_eq!(f, "rules[1].host", "{m}");
    assert!(m.contains("empty label"), "{m}");
    let (f, _) = invalid(c.put_secret("allowed", b"v", vec![header_rule("api.example.com", "Host", "{value}")]));
    assert_eq!(f, "rules[0].inject.name");
    let (f, _) = invalid(c.put_secret("allowed", b"v", vec![header_rule("api.example.com", "X", "Bearer")]));
    assert_eq!(f, "rules[0].inject.value");
    let (f, _) = invalid(c.put_secret("Bad Name", b"v", vec![rule()]));
    assert_eq!(f, "name");
    let (f, m) = invalid(c.put_secret("allowed", b"two\nlines", vec![rule()]));
    assert_eq!(f, "value");
    assert!(!m.contains("two"), "the message does not quote the value: {m}");
    assert!(c.list_secrets().unwrap().is_empty(), "nothing was stored");

    c.put_secret("allowed", b"v1", vec![rule()]).unwrap();
    c.put_secret("outside", b"v2", vec![rule()]).unwrap();
    // Unknown, outside the bound, a non-proxy mode; nothing is made.
    for (secrets, network, field, needle) in [
        (vec!["nope"], None, "secrets[0]", "no secret named \"nope\""),
        (
            vec!["allowed", "outside"],
            None,
            "secrets[1]",
            "outside the operator's bound",
        ),
        (
            vec!["allowed"],
            Some(NetworkPolicy::mode(NetworkMode::Egress)),
            "secrets",
            "proxy",
        ),
    ] {
        let r = c
            .create_workspace(
                CreateRequest {
                    agent_id: "sec4".into(),
                    environment: "python-dev".into(),
                    secrets: secrets.iter().map(|s| s.to_string()).collect(),
                    network,
                    ..Default::default()
                },
                quiet(),
            )
            .await;
        let (f, m) = invalid(r);
        assert_eq!(f, field, "{secrets:?}: {m}");
        assert!(m.contains(needle), "{secrets:?}: {m}");
    }
    let mut spec = TaskSpec::new("python-dev", vec!["true".into()]);
    spec.secrets = vec!["outside".into()];
    let (f, m) = invalid(c.submit_tasks(vec![spec]));
    assert_eq!(f, "secrets[0]", "{m}");
    assert!(
        c.list_workspaces(&Default::default()).unwrap().is_empty(),
        "nothing was made for a refused request"
    );
    // A config-defined secret whose file is missing: the error names the key.
    let text = common::config_text(
        t.dir.path(),
        "secrets:\n  define:\n    - {name: gone, from_file: /nonexistent/token, rules: [{host: a.example, inject: {type: basic, username: git}}]}\n",
    );
    let config = conductor_core::Config::parse(&text).unwrap().config;
    let err = Conductor::open(config).await.err().expect("refused").to_string();
    assert!(err.starts_with("secrets.define[0].from_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_in_a_shared_workspace_may_use_only_the_workspaces_secrets() {
    let mut t = TestEnv::new("isolated_workspace:\n  mode: shared\n").await;
    let owned = common::Owned::take(&mut t);
    let c = owned.0.clone();
    let rule = || vec![header_rule("api.example.com", "Authorization", "Bearer {value}")];
    c.put_secret("s1", token("one_").as_bytes(), rule()).unwrap();
    c.put_secret("s2", token("two_").as_bytes(), rule()).unwrap();
    let w = create(&c, "sec5", &["s1"], &[]).await;
    let (_, placeholder, _) = sh(&c, &w.id, "printf %s \"$S1_TOKEN\"").await;
    assert!(placeholder.starts_with("conductor-secret-s1-"), "{placeholder}");
    let orchestrator = Orchestrator::start(c.clone());
    let task = |secrets: &[&str]| {
        let mut spec = TaskSpec::new("python-dev", vec!["printf %s \"$S1_TOKEN\"".into()]);
        spec.agent_id = Some("sec5".into());
        spec.secrets = secrets.iter().map(|s| s.to_string()).collect();
        c.submit_tasks(vec![spec]).unwrap().remove(0).id
    };
    let wait = |id: String| {
        let c = c.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(120), c.wait_task(&id))
                .await
                .expect("the task ends")
                .unwrap()
        }
    };
    let ok = wait(task(&["s1"])).await;
    assert_eq!(ok.status, TaskState::Succeeded, "{ok:?}");
    assert_eq!(ok.workspace_id.as_deref(), Some(w.id.as_str()));
    assert_eq!(
        ok.commands.last().unwrap().stdout,
        placeholder,
        "the workspace's placeholder"
    );
    let refused = wait(task(&["s2"])).await;
    assert_eq!(refused.status, TaskState::Failed, "{refused:?}");
    let error = refused.error.unwrap_or_default();
    assert!(
        error.contains("secrets[0]") && error.contains("made without secret \"s2\"") && error.contains("made with: s1"),
        "{error}"
    );
    orchestrator.shutdown(Duration::from_secs(10)).await;
    drop(c);
    drop(owned);
}
