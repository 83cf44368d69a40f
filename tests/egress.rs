//! Proxy mode and the bridged `egress` mode, from inside real workspaces.
//!
//! The upstreams are this test's own servers in a network namespace it creates
//! ([`Upstream`]: a veth pair on 198.51.100.0/24, TEST-NET-2; this machine reaches its package registries through an address in TEST-NET-3, so that one is left alone),
//! and names reach them only through `network.egress.resolve`, the test-only resolver
//! override. Nothing here contacts any other address, except the one bounded check per
//! package manager at the end, which goes to PyPI and the npm registry through the ordinary
//! clients.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command as Process;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{quiet, TestEnv};
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::lifecycle::TaskState;
use conductor_core::task::TaskSpec;
use conductor_service::exec::ExecRequest;
use conductor_service::tasks::Orchestrator;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{Conductor, ServiceError};
use conductor_store::{EgressDecision, EgressEventRecord, EgressFilter};

/// What an upstream saw: one entry per connection, its first bytes.
type Seen = Arc<Mutex<Vec<(u16, Vec<u8>)>>>;

/// A network namespace with HTTP servers on 80 and 8080 and a recorder on 443, at
/// `self.addr`, reached from the host through a veth pair.
struct Upstream {
    ns: String,
    host_if: String,
    addr: Ipv4Addr,
    seen: Seen,
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Process::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Upstream {
    fn start() -> Upstream {
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let ns = format!("cegr-{tag}");
        let (host_if, ns_if) = (format!("cgh{tag}"), format!("cgn{tag}"));
        // A /30 per upstream: .1 the host's end, .2 the upstream.
        let base = 4 * (n % 60);
        let host_addr = Ipv4Addr::new(198, 51, 100, base as u8 + 1);
        let addr = Ipv4Addr::new(198, 51, 100, base as u8 + 2);
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
        let up = Upstream {
            ns,
            host_if,
            addr,
            seen: Arc::default(),
        };
        for port in [80, 443, 8080] {
            up.listen(port);
        }
        up
    }

    /// Binds `addr:port` inside the namespace (from a thread that entered it) and serves:
    /// HTTP on 80 and 8080 (the answer names the Host header and the request line), and on
    /// 443 records the first bytes and closes.
    fn listen(&self, port: u16) {
        let (ns, addr, seen) = (self.ns.clone(), self.addr, self.seen.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the netns");
            let listener = TcpListener::bind((addr, port)).expect("bind in the netns");
            ready_tx.send(()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = vec![0u8; 16 * 1024];
                    let n = conn.read(&mut buf).unwrap_or(0);
                    seen.lock().unwrap().push((port, buf[..n].to_vec()));
                    if port != 443 && n > 0 {
                        let head = String::from_utf8_lossy(&buf[..n]).to_string();
                        let line = head.lines().next().unwrap_or("").to_string();
                        let host = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Host: ").or_else(|| l.strip_prefix("host: ")))
                            .unwrap_or("")
                            .to_string();
                        let body = format!("upstream {port} host={host} line={line}\n");
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                });
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the upstream listens");
    }

    /// The connections seen on `port` so far.
    fn seen_on(&self, port: u16) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Test-only resolver entries mapping `names` to this upstream.
    fn resolve(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|n| format!("      {n}: [\"{}\"]\n", self.addr))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Process::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Process::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn config(up: &Upstream, extra_egress: &str) -> String {
    format!(
        "network:\n  egress:\n    resolve:\n{}      loopy.test: [\"127.0.0.1\"]\n{extra_egress}",
        up.resolve(&[
            "allowed.test",
            "other.test",
            "a.wild.test",
            "wild.test",
            "bad.wild.test",
            "evil.test"
        ])
    )
}

fn proxied(agent: &str, allow: &[&str], deny: &[&str]) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: "python-dev".into(),
        network: Some(NetworkPolicy {
            mode: Some(NetworkMode::Proxy),
            allow: Some(allow.iter().map(|s| s.to_string()).collect()),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    }
}

async fn create(c: &Conductor, req: CreateRequest) -> WorkspaceInfo {
    c.create_workspace(req, quiet()).await.expect("create workspace")
}

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out, err)
}

/// `curl` through the workspace's proxy: `(http status, body)`; the status is 000 when
/// the connection failed.
async fn curl(c: &Conductor, id: &str, url: &str) -> (String, String) {
    let (_, out, err) = sh(
        c,
        id,
        &format!("curl -s -m 10 -o /tmp/body -w '%{{http_code}}' '{url}'; echo; cat /tmp/body 2>/dev/null"),
    )
    .await;
    let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
    assert!(!status.is_empty(), "curl printed nothing: {err}");
    (status.to_string(), body.to_string())
}

/// The workspace's audit rows, waiting briefly for the one about `host` (rows are written
/// when a connection ends).
async fn events_for(c: &Conductor, id: &str, host: &str) -> Vec<EgressEventRecord> {
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
        if !rows.is_empty() || begin.elapsed() > Duration::from_secs(5) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_allows_what_is_listed_and_denies_the_rest_with_a_403_that_says_why() {
    let up = Upstream::start();
    let t = TestEnv::new(&config(&up, "")).await;
    let c = t.c();
    let w = create(
        c,
        proxied(
            "eg1",
            &["allowed.test", "*.wild.test", "allowed.test:8080", "loopy.test"],
            &["bad.wild.test"],
        ),
    )
    .await;
    assert_eq!(w.network_policy.mode, NetworkMode::Proxy);
    let (_, env, _) = sh(c, &w.id, "echo $HTTP_PROXY $https_proxy $NO_PROXY").await;
    assert_eq!(
        env.trim(),
        "http://127.0.0.1:3128 http://127.0.0.1:3128 localhost,127.0.0.1,::1"
    );

    // Allowed, plain HTTP: forwarded in origin form with the Host of the URL.
    let (status, body) = curl(c, &w.id, "http://allowed.test/hello").await;
    assert_eq!(status, "200", "{body}");
    assert_eq!(body.trim(), "upstream 80 host=allowed.test line=GET /hello HTTP/1.1");
    let rows = events_for(c, &w.id, "allowed.test").await;
    let row = rows.last().expect("an audit row");
    assert_eq!(
        (row.decision, row.method.as_str(), row.port),
        (EgressDecision::Allowed, "GET", 80)
    );
    assert_eq!(row.resolved.as_deref(), Some(up.addr.to_string().as_str()));
    assert_eq!(row.rule.as_deref(), Some("allowed.test"));
    assert!(row.bytes_up > 0 && row.bytes_down > 0, "{row:?}");

    // A port listed explicitly; and a port that is not (8080 is only allowed for allowed.test).
    assert_eq!(curl(c, &w.id, "http://allowed.test:8080/").await.0, "200");
    let (status, body) = curl(c, &w.id, "http://other.test:8080/").await;
    assert_eq!(status, "403");
    assert!(body.contains("other.test:8080"), "{body}");

    // Not listed: a 403 whose body names the host, the reason and how to allow it.
    let (status, body) = curl(c, &w.id, "http://other.test/").await;
    assert_eq!(status, "403");
    assert!(body.contains("other.test") && body.contains("not_allowed"), "{body}");
    assert!(
        body.contains("network.allow"),
        "the answer says how to allow it: {body}"
    );
    let row = events_for(c, &w.id, "other.test").await.pop().expect("row");
    assert_eq!(
        (row.decision, row.reason.as_deref()),
        (EgressDecision::Denied, Some("not_allowed"))
    );
    assert_eq!(row.resolved, None, "a denied name is never resolved or connected to");

    // Wildcards match subdomains only; deny wins over allow.
    assert_eq!(curl(c, &w.id, "http://a.wild.test/").await.0, "200");
    assert_eq!(curl(c, &w.id, "http://wild.test/").await.0, "403");
    let (status, body) = curl(c, &w.id, "http://bad.wild.test/").await;
    assert_eq!(status, "403", "{body}");
    let row = events_for(c, &w.id, "bad.wild.test").await.pop().expect("row");
    assert_eq!(row.reason.as_deref(), Some("denied"));

    // A listed name that resolves to loopback is refused after resolution; so is an IP
    // literal, even the upstream's.
    let (status, body) = curl(c, &w.id, "http://loopy.test/").await;
    assert_eq!(status, "403", "{body}");
    let row = events_for(c, &w.id, "loopy.test").await.pop().expect("row");
    assert_eq!(row.reason.as_deref(), Some("special_address"), "{row:?}");
    let (status, _) = curl(c, &w.id, &format!("http://{}/", up.addr)).await;
    assert_eq!(status, "403");
    let row = events_for(c, &w.id, &up.addr.to_string()).await.pop().expect("row");
    assert_eq!(row.reason.as_deref(), Some("ip_literal"));

    // Nothing denied ever reached the upstream: only the allowed requests did.
    let lines: Vec<String> = up
        .seen_on(80)
        .iter()
        .chain(up.seen_on(8080).iter())
        .map(|b| String::from_utf8_lossy(b).lines().next().unwrap_or("").to_string())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_passes_through_untouched_and_a_mismatched_sni_is_refused() {
    let up = Upstream::start();
    let t = TestEnv::new(&config(&up, "")).await;
    let c = t.c();
    let w = create(c, proxied("eg2", &["allowed.test"], &[])).await;
    // curl's TLS handshake reaches the upstream as is (it is no TLS server, so the
    // handshake then fails): the proxy does not terminate TLS.
    let _ = curl(c, &w.id, "https://allowed.test/").await;
    let hello = up.seen_on(443);
    assert_eq!(hello.len(), 1, "one tunnel");
    assert_eq!(
        hello[0].first(),
        Some(&0x16),
        "a TLS handshake record arrived untouched"
    );
    let row = events_for(c, &w.id, "allowed.test").await.pop().expect("row");
    assert_eq!(
        (row.method.as_str(), row.decision),
        ("CONNECT", EgressDecision::Allowed)
    );

    // CONNECT to an allowed name, then a ClientHello for another: domain fronting.
    let script = r#"
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
print(s.recv(4096).split(b"\r\n")[0].decode())
ctx = ssl.create_default_context()
try:
    ctx.wrap_socket(s, server_hostname="evil.test")
    print("handshake")
except (ssl.SSLError, OSError) as e:
    print("refused")
"#;
    let (_, out, err) = sh(c, &w.id, &format!("python3 - <<'EOF'\n{script}\nEOF")).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["HTTP/1.1 200 Connection established", "refused"], "{out}{err}");
    let begin = Instant::now();
    let row = loop {
        let rows = events_for(c, &w.id, "allowed.test").await;
        if let Some(r) = rows.into_iter().find(|r| r.reason.as_deref() == Some("sni_mismatch")) {
            break r;
        }
        assert!(begin.elapsed() < Duration::from_secs(5), "no sni_mismatch row");
    };
    assert_eq!(row.decision, EgressDecision::Denied);
    let hellos = up.seen_on(443);
    assert!(
        hellos.iter().skip(1).all(|b| b.is_empty()),
        "the fronted hello never reached the upstream: {hellos:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_answers_429_and_an_isolated_workspace_has_no_proxy() {
    let up = Upstream::start();
    let t = TestEnv::new(&config(&up, "    max_connections: 2\n")).await;
    let c = t.c();
    let w = create(c, proxied("eg3", &["allowed.test"], &[])).await;
    let script = r#"
import socket
socks = []
for i in range(3):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(b"CONNECT allowed.test:80 HTTP/1.1\r\nHost: allowed.test:80\r\n\r\n")
    print(s.recv(4096).split(b"\r\n")[0].decode())
    socks.append(s)
"#;
    let (_, out, err) = sh(c, &w.id, &format!("python3 - <<'EOF'\n{script}\nEOF")).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 Connection established",
            "HTTP/1.1 200 Connection established",
            "HTTP/1.1 429 Too Many Requests"
        ],
        "{out}{err}"
    );
    let rows = events_for(c, &w.id, "allowed.test").await;
    assert!(
        rows.iter().any(|r| r.reason.as_deref() == Some("connection_limit")),
        "{rows:?}"
    );

    // The default, isolated: no proxy variables and nothing listens on the proxy port.
    let iso = create(
        c,
        CreateRequest {
            agent_id: "eg3b".into(),
            environment: "python-dev".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(iso.network_policy.mode, NetworkMode::Isolated);
    let (_, out, _) = sh(c, &iso.id, "echo \"[$HTTP_PROXY]\"; curl -s -m 5 -o /dev/null -w '%{http_code}' -x http://127.0.0.1:3128 http://allowed.test/").await;
    assert_eq!(out.trim(), "[]\n000".trim(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_and_entries_outside_the_operators_bound_are_refused_by_name() {
    let up = Upstream::start();
    let t = TestEnv::new(&config(&up, "    max_allow: [\"allowed.test\", \"*.wild.test\"]\n")).await;
    let c = t.c();
    for (allow, field, needle) in [
        (vec!["foo..test"], "network.allow[0]", "empty label"),
        (vec!["allowed.test", "a.*.test"], "network.allow[1]", "wildcard"),
        (vec!["*"], "network.allow[0]", "*"),
        (vec!["allowed.test:70000"], "network.allow[0]", "port"),
        (vec!["bücher.test"], "network.allow[0]", "punycode"),
        (vec!["other.test"], "network.allow[0]", "max_allow"),
    ] {
        match c.create_workspace(proxied("eg4", &allow, &[]), quiet()).await {
            Err(ServiceError::Invalid { field: f, message }) => {
                assert_eq!(f, field, "{allow:?}: {message}");
                assert!(message.contains(needle), "{allow:?}: {message}");
            }
            other => panic!("{allow:?} was accepted: {other:?}"),
        }
    }
    // A task may not widen it either; the error names the task's field.
    let mut spec = TaskSpec::new("python-dev", vec!["true".into()]);
    spec.network = Some(NetworkPolicy::allow(&["other.test"]));
    match c.submit_tasks(vec![spec]) {
        Err(ServiceError::Invalid { field, .. }) => assert_eq!(field, "network.allow[0]"),
        other => panic!("{other:?}"),
    }
    assert!(
        c.list_workspaces(&Default::default()).unwrap().is_empty(),
        "nothing was made for a refused request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_narrows_its_shared_workspace_for_its_own_run_and_its_rows_carry_its_id() {
    let up = Upstream::start();
    let extra = format!("isolated_workspace:\n  mode: shared\n{}", config(&up, ""));
    let mut t = TestEnv::new(&extra).await;
    let owned = common::Owned::take(&mut t);
    let c = owned.0.clone();
    let w = create(&c, proxied("eg5", &["allowed.test", "other.test"], &[])).await;
    let orchestrator = Orchestrator::start(c.clone());
    let mut spec = TaskSpec::new(
        "python-dev",
        vec![
            "curl -s -o /dev/null -w 'allowed=%{http_code}\\n' http://allowed.test/".into(),
            "curl -s -o /dev/null -w 'other=%{http_code}\\n' http://other.test/".into(),
        ],
    );
    spec.agent_id = Some("eg5".into());
    spec.network = Some(NetworkPolicy::allow(&["allowed.test"]));
    let task = c.submit_tasks(vec![spec]).unwrap().remove(0);
    let done = tokio::time::timeout(Duration::from_secs(120), c.wait_task(&task.id))
        .await
        .expect("the task ends")
        .unwrap();
    assert_eq!(done.status, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        done.workspace_id.as_deref(),
        Some(w.id.as_str()),
        "the shared workspace ran it"
    );
    let out: String = done.commands.iter().map(|c| c.stdout.clone()).collect();
    assert_eq!(out, "allowed=200\nother=403\n");
    let summary = c.get_task(&task.id).unwrap().egress.expect("an egress summary");
    assert_eq!((summary.allowed, summary.denied), (1, 1), "{summary:?}");
    let rows = c
        .egress_events(
            &w.id,
            EgressFilter {
                task_id: Some(task.id.clone()),
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    // After the task, the workspace's own policy is back.
    assert_eq!(curl(&c, &w.id, "http://other.test/").await.0, "200");
    orchestrator.shutdown(Duration::from_secs(10)).await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridged_egress_mode_cannot_reach_the_host() {
    // A service on the host, on every address: what a new user has running.
    let host_service = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = host_service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in host_service.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        }
    });
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = create(
        c,
        CreateRequest {
            agent_id: "eg6".into(),
            environment: "python-dev".into(),
            network: Some(NetworkPolicy::mode(NetworkMode::Egress)),
            ..Default::default()
        },
    )
    .await;
    let (_, gw, _) = sh(c, &w.id, "ip route 2>/dev/null | awk '/default/ {print $3}' || true").await;
    let gateway = if gw.trim().is_empty() {
        // No iproute2 in the image: the gateway is the first address of the /29.
        let (_, route, _) = sh(c, &w.id, "awk 'NR>1 && $2==\"00000000\" {print $3}' /proc/net/route").await;
        let hex = u32::from_str_radix(route.trim(), 16).expect("a default route");
        Ipv4Addr::from(hex.swap_bytes()).to_string()
    } else {
        gw.trim().to_string()
    };
    let begin = Instant::now();
    let (code, out, err) = sh(
        c,
        &w.id,
        &format!("curl -s -m 10 -o /dev/null -w '%{{http_code}}' http://{gateway}:{port}/"),
    )
    .await;
    let elapsed = begin.elapsed();
    assert_ne!(code, 0, "the host service answered the workspace: {out}{err}");
    assert_eq!(out.trim(), "000");
    assert!(
        elapsed < Duration::from_secs(5),
        "refused at once, not a timeout: {elapsed:?}"
    );
}

/// One bounded check per package manager against the registries this machine reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_and_npm_work_through_the_proxy_when_their_bundle_is_allowed() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let py = create(c, proxied("eg7", &["pypi"], &[])).await;
    let (code, out, err) = sh(
        c,
        &py.id,
        "cd /tmp && pip download --no-deps --no-cache-dir -q six==1.16.0 && ls six-1.16.0*",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("six-1.16.0"), "{out}");
    let node = create(
        c,
        CreateRequest {
            environment: "nodejs-dev".into(),
            ..proxied("eg8", &["npm"], &[])
        },
    )
    .await;
    let (code, out, err) = sh(c, &node.id, "npm view is-number@7.0.0 version").await;
    assert_eq!((code, out.trim()), (0, "7.0.0"), "{err}");

    // Not allowed: both fail with the proxy's 403, and nothing left the host.
    let none = create(c, proxied("eg9", &["allowed.test"], &[])).await;
    let (code, out, err) = sh(
        c,
        &none.id,
        "cd /tmp && pip download --no-deps --no-cache-dir --retries 0 --timeout 5 six==1.16.0",
    )
    .await;
    // pip reports the index's 403 only as "from versions: none"; the audit says why.
    assert_ne!(code, 0, "{out}{err}");
    let rows = events_for(c, &none.id, "pypi.org").await;
    assert!(
        rows.iter().any(|r| r.reason.as_deref() == Some("not_allowed")),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.decision == EgressDecision::Denied && r.resolved.is_none()),
        "{rows:?}"
    );
    assert!(!rows.is_empty());
    let node_none = create(
        c,
        CreateRequest {
            environment: "nodejs-dev".into(),
            ..proxied("eg10", &["allowed.test"], &[])
        },
    )
    .await;
    let (code, out, err) = sh(c, &node_none.id, "npm view is-number@7.0.0 version --fetch-retries=0").await;
    assert_ne!(code, 0);
    assert!(format!("{out}{err}").contains("403"), "{out}{err}");
    let rows = events_for(c, &node_none.id, "registry.npmjs.org").await;
    assert!(
        rows.iter()
            .all(|r| r.decision == EgressDecision::Denied && r.resolved.is_none()),
        "{rows:?}"
    );
}

/// Which tools honour the proxy variables (docs/egress.md lists them): git over HTTPS and
/// Python requests do; Node's built-in fetch (Node 18 here) does not and fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_and_python_requests_honour_the_proxy_and_node_fetch_does_not() {
    let up = Upstream::start();
    let t = TestEnv::new(&config(&up, "")).await;
    let c = t.c();
    let w = create(c, proxied("eg11", &["allowed.test"], &[])).await;
    // git's TLS handshake reaches the upstream through a CONNECT tunnel (the upstream is no
    // TLS server, so git then fails: what matters is that it went through the proxy).
    let (code, _, _) = sh(
        c,
        &w.id,
        "GIT_TERMINAL_PROMPT=0 timeout 20 git ls-remote https://allowed.test/repo.git",
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        up.seen_on(443).iter().any(|b| b.first() == Some(&0x16)),
        "git's ClientHello arrived"
    );
    let row = events_for(c, &w.id, "allowed.test").await.pop().expect("row");
    assert_eq!(row.method, "CONNECT");

    // requests (pip's vendored copy) reads HTTP_PROXY for plain HTTP.
    let (code, out, err) = sh(
        c,
        &w.id,
        "python3 -c \"from pip._vendor import requests; r = requests.get('http://allowed.test/py', timeout=10); print(r.status_code, r.text.strip())\"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "200 upstream 80 host=allowed.test line=GET /py HTTP/1.1");

    let node = create(
        c,
        CreateRequest {
            environment: "nodejs-dev".into(),
            ..proxied("eg12", &["allowed.test"], &[])
        },
    )
    .await;
    let begin = Instant::now();
    let (code, _, _) = sh(
        c,
        &node.id,
        "node -e \"fetch('http://allowed.test/').then(() => process.exit(0), () => process.exit(7))\"",
    )
    .await;
    assert_eq!(code, 7, "Node's fetch ignores HTTP_PROXY and has no route of its own");
    assert!(begin.elapsed() < Duration::from_secs(10), "it fails at once");
}

/// The audit over HTTP (a page, then a follow that gets the next row live) and the CLI's
/// `ws egress`, against `conductor serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_is_served_over_http_with_a_live_follow_and_by_the_cli() {
    use futures_util::StreamExt;
    let up = Upstream::start();
    let (_dir, config) = common::config_dir("conductor-egress-api-", &config(&up, ""));
    let served = common::serve(&config);
    let http = reqwest::Client::new();
    let base = &served.base;
    let created: serde_json::Value = http
        .post(format!("{base}/workspaces"))
        .json(&serde_json::json!({"agent_id": "eg13", "environment": "python-dev", "network": {"allow": ["allowed.test"]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["workspace_id"].as_str().expect("created").to_string();
    assert_eq!(created["network_policy"]["mode"], "proxy", "{created}");
    let exec = |cmd: &str| {
        http.post(format!("{base}/workspaces/{id}/exec"))
            .json(&serde_json::json!({"command": cmd}))
            .send()
    };
    exec("curl -s -o /dev/null http://denied.test/").await.unwrap();
    let mut page = serde_json::Value::Null;
    for _ in 0..50 {
        page = http
            .get(format!("{base}/workspaces/{id}/egress?decision=denied"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if page["events"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = &page["events"][0];
    assert_eq!(
        (row["host"].as_str(), row["reason"].as_str()),
        (Some("denied.test"), Some("not_allowed")),
        "{page}"
    );
    let bad = http
        .get(format!("{base}/workspaces/{id}/egress?decision=maybe"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["field"], "decision", "{body}");

    // Follow from after the row we have: the next one arrives live.
    let after = row["id"].as_i64().unwrap();
    let resp = http
        .get(format!("{base}/workspaces/{id}/egress?follow=true&after={after}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    exec("curl -s -o /dev/null http://allowed.test/live").await.unwrap();
    let mut text = String::new();
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("\"allowed.test\"") {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no live row: {text}");
    assert!(text.contains("event: egress"), "{text}");
    assert!(
        !text.contains("denied.test"),
        "the row before the cursor is not sent again: {text}"
    );

    let (ok, out, err) = common::cli(&config, &["ws", "egress", &id, "--json"], None);
    assert!(ok, "{err}");
    let hosts: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON row per line")["host"].to_string())
        .collect();
    assert_eq!(
        hosts,
        ["\"denied.test\"", "\"allowed.test\""],
        "{}",
        String::from_utf8_lossy(&out)
    );
    let removed = http.delete(format!("{base}/workspaces/{id}")).send().await.unwrap();
    assert_eq!(removed.status(), 200);
}
