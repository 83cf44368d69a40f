//! Egress benchmark: proxy mode (the workspace's agent relaying 127.0.0.1:3128 over a Unix
//! socket to conductor's allowlist proxy on the host) against a direct connection from the
//! host, to a local upstream, on the same machine in one run. Prints medians, p95 and
//! ratios as Markdown tables (docs/performance.md holds the last one).
//!
//! 1. throughput: 1 GiB of zeros over plain HTTP, by `curl` inside the workspace through a
//!    `CONNECT` tunnel (`curl -p -x http://127.0.0.1:3128`: the proxy only moves bytes) vs
//!    the same `curl` on the host straight to the upstream; `BENCH_RUNS` runs of each
//!    (default 3), interleaved, medians. Also the host half alone: a Rust client on the
//!    host tunnelling through the workspace's proxy socket (no agent relay, no container);
//!    the CPU time the proxy and the relay spend per GiB, and whether the workspace's CPU
//!    limit throttled it.
//! 2. connect latency: `BENCH_N` (default 50) fresh connections each sending a tiny GET and
//!    timed to the first byte of the answer: from a `python3` loop in the workspace
//!    (connect to 127.0.0.1:3128, `CONNECT`, its `200`, the GET) vs a Rust loop on the host
//!    straight to the upstream (the added latency is the difference of the medians); also
//!    the same `python3` loop on the host straight to the upstream, and a Rust loop through
//!    the host half alone (the proxy's Unix socket). In 5 interleaved rounds, each loop a
//!    process started once per round (5 untimed requests first), so that spawning is not
//!    timed and a change of machine load hits every series alike.
//! 3. memory per open connection: `BENCH_CONNS` (default 200) idle `CONNECT` tunnels held by
//!    one `python3` process in the workspace; the RSS growth of this process (which hosts the
//!    proxy) and of the agent's relay process (`conductor-agent egress`, a child of the
//!    container's init), their threads and descriptors. The workspace gets `nofile` 4096 and
//!    `pids` 1024 for it (`BENCH_NOFILE`, `BENCH_PIDS`): at the defaults (1024, 512) the
//!    relay runs out of descriptors at about 170 tunnels (the output says where).
//!
//! The upstream is this bench's own server (this binary again, started with
//! `ip netns exec`) in a network namespace it creates, `cbench-egress`, reached through a
//! veth pair on 198.51.100.248/30 (TEST-NET-2; tests/egress.rs uses .0–.239): .249 is the
//! host's end, .250 the upstream, named `up.bench` by the test-only
//! `network.egress.resolve`. Nothing else is contacted. The namespace, the veth, the server
//! and the workspace are removed at the end, also when the bench fails.
//!
//! Run: `cargo bench --bench egress` or `scripts/bench.sh egress`. Needs root, Podman,
//! `ip` (iproute2), `curl` on the host, the `python-dev` environment and the static agent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_agent_protocol::EGRESS_SOCKET_NAME;
use conductor_core::config::{NetworkMode, NetworkPolicy};
use conductor_core::engine::Progress;
use conductor_core::Config;
use conductor_service::exec::ExecRequest;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::{agent_client, Conductor};

/// The namespace and the two ends of the veth pair.
const NS: &str = "cbench-egress";
const HOST_IF: &str = "cbegress-h";
const NS_IF: &str = "cbegress-n";
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 249);
const UP_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
const UP_PORT: u16 = 8080;
const UP_NAME: &str = "up.bench";
/// Set for the upstream server process (this binary in the namespace): its address.
const UPSTREAM_ENV: &str = "CONDUCTOR_BENCH_EGRESS_UPSTREAM";
/// The workspace's `nofile` and `pids` limits (`BENCH_NOFILE`, `BENCH_PIDS`), above the
/// defaults: the relay holds 6 descriptors and 2 threads per connection, so the defaults
/// would cap the memory test below `BENCH_CONNS` (the output says where).
const NOFILE: usize = 4096;
const PIDS: usize = 1024;
/// The configuration's defaults.
const DEFAULT_NOFILE: u64 = 1024;
const DEFAULT_PIDS: u64 = 512;
const GIB: u64 = 1 << 30;
const MIB: f64 = (1u64 << 20) as f64;
/// The tiny request of the latency loops.
const TINY_GET: &[u8] = b"GET /tiny HTTP/1.1\r\nHost: up.bench:8080\r\nConnection: close\r\n\r\n";
const CONNECT: &[u8] = b"CONNECT up.bench:8080 HTTP/1.1\r\nHost: up.bench:8080\r\n\r\n";

// ---------------------------------------------------------------------------------------
// The upstream: an HTTP server in the namespace, a process of its own (so that its memory
// is not counted as the proxy's).

/// Serves `GET /1g` (1 GiB of zeros) and anything else (a 3-byte body), one thread per
/// connection, `Connection: close`. Ends when its standard input closes (the bench is gone).
fn serve_upstream(addr: &str) {
    let listener = TcpListener::bind((addr, UP_PORT)).expect("bind the upstream");
    println!("ready");
    std::io::stdout().flush().unwrap();
    std::thread::spawn(|| {
        let mut b = [0u8; 64];
        while matches!(std::io::stdin().read(&mut b), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || answer(conn));
    }
}

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

fn answer(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    if path == "/1g" {
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {GIB}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        );
        for _ in 0..GIB / ZEROS.len() as u64 {
            if conn.write_all(&ZEROS).is_err() {
                return;
            }
        }
    } else {
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the namespace and the veth (a leftover of an interrupted run, or ours).
fn remove_net() {
    let _ = Command::new("ip").args(["link", "del", HOST_IF]).output();
    let _ = Command::new("ip").args(["netns", "del", NS]).output();
}

/// The namespace, the veth pair and the upstream server in it; all gone on drop.
struct Upstream {
    server: Option<Child>,
}

impl Upstream {
    fn start() -> Upstream {
        remove_net();
        // Made before anything that can fail, so that its Drop undoes a partial set-up.
        let mut up = Upstream { server: None };
        ip(&["netns", "add", NS]);
        ip(&[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NS,
        ]);
        ip(&["addr", "add", &format!("{HOST_ADDR}/30"), "dev", HOST_IF]);
        ip(&["link", "set", HOST_IF, "up"]);
        ip(&["-n", NS, "addr", "add", &format!("{UP_ADDR}/30"), "dev", NS_IF]);
        ip(&["-n", NS, "link", "set", NS_IF, "up"]);
        ip(&["-n", NS, "link", "set", "lo", "up"]);
        let exe = std::env::current_exe().expect("the bench binary");
        let mut child = Command::new("ip")
            .args(["netns", "exec", NS])
            .arg(exe)
            .env(UPSTREAM_ENV, UP_ADDR.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the upstream");
        let stdout = child.stdout.take().unwrap();
        up.server = Some(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the upstream's first line");
        assert_eq!(line.trim(), "ready", "the upstream did not start");
        up
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_net();
    }
}

// ---------------------------------------------------------------------------------------
// The workspace.

/// A workspace removed on drop (unless [`Workspace::remove`] already did).
struct Workspace {
    c: Arc<Conductor>,
    info: WorkspaceInfo,
    removed: bool,
}

impl Workspace {
    async fn remove(mut self) {
        self.removed = true;
        let _ = self.c.remove_workspace(&self.info.id, None).await;
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (c, id) = (self.c.clone(), self.info.id.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tokio::task::block_in_place(|| {
                handle.block_on(async move {
                    let _ = c.remove_workspace(&id, None).await;
                })
            });
        }
    }
}

fn quiet() -> conductor_core::engine::ProgressSink {
    Arc::new(|_: Progress| {})
}

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out, err)
}

// ---------------------------------------------------------------------------------------
// Measuring.

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `curl -w` of a 1 GiB download: checks it got all of it with a 200; MiB/s.
fn curl_speed(out: &str, what: &str) -> f64 {
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{what}: curl printed {out:?}");
    assert_eq!(fields[0], "200", "{what}: HTTP status {out:?}");
    assert_eq!(fields[1].parse::<u64>().ok(), Some(GIB), "{what}: not 1 GiB: {out:?}");
    fields[2].parse::<f64>().expect("speed_download") / MIB
}

const CURL_W: &str = "%{http_code} %{size_download} %{speed_download}";

/// 1 GiB through the proxy, from the workspace.
async fn throughput_proxied(c: &Conductor, id: &str) -> f64 {
    let (code, out, err) = sh(
        c,
        id,
        &format!(
            "curl -s -S -m 300 -p -x http://127.0.0.1:3128 -o /dev/null -w '{CURL_W}' http://{UP_NAME}:{UP_PORT}/1g"
        ),
    )
    .await;
    assert_eq!(code, 0, "curl in the workspace: {out}{err}");
    curl_speed(&out, "through the proxy")
}

/// 1 GiB with `curl` on the host, straight to the upstream.
fn throughput_direct() -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-m",
            "300",
            "-o",
            "/dev/null",
            "-w",
            CURL_W,
            "--noproxy",
            "*",
        ])
        .arg("--resolve")
        .arg(format!("{UP_NAME}:{UP_PORT}:{UP_ADDR}"))
        .arg(format!("http://{UP_NAME}:{UP_PORT}/1g"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl on the host: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    curl_speed(&text, "from the host")
}

/// 1 GiB through the proxy's host half alone: a Rust client on the host connects to the
/// workspace's proxy socket (where the agent's relay would), tunnels and reads it all
/// (curl's `--unix-socket` does not combine with a proxy). MiB/s, timed like curl's
/// `speed_download` (from the start, connection included).
fn throughput_host_half(socket: &Path) -> f64 {
    let t = Instant::now();
    let mut s = UnixStream::connect(socket).expect("connect to the proxy socket");
    s.write_all(CONNECT).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"GET /1g HTTP/1.1\r\nHost: up.bench:8080\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = Vec::new();
    // The answer's head, then the body (its first bytes may come with the head).
    let mut body = loop {
        let n = s.read(&mut buf).expect("read the answer");
        assert!(n > 0, "closed in the answer's head");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
            break (got.len() - end - 4) as u64;
        }
    };
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the body: {e}"),
        }
    }
    assert_eq!(body, GIB, "the host half delivered {body} bytes");
    GIB as f64 / MIB / t.elapsed().as_secs_f64()
}

/// The latency loop in Python: `argv[1]` timed iterations after 5 untimed, each a new
/// connection; `argv[2]` `proxy` (127.0.0.1:3128 and a CONNECT) or `direct` (the upstream).
/// Prints one time per line, in ms, to the first byte of the answer to the GET.
const LATENCY_PY: &str = r#"
import socket, sys, time
n, mode = int(sys.argv[1]), sys.argv[2]
CONNECT = b"CONNECT up.bench:8080 HTTP/1.1\r\nHost: up.bench:8080\r\n\r\n"
GET = b"GET /tiny HTTP/1.1\r\nHost: up.bench:8080\r\nConnection: close\r\n\r\n"
def once():
    t = time.perf_counter()
    if mode == "proxy":
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(CONNECT)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("the proxy closed: %r" % head)
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit("refused: %r" % head)
    else:
        s = socket.create_connection(("198.51.100.250", 8080), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(GET)
    first = s.recv(4096)
    d = time.perf_counter() - t
    if not first.startswith(b"HTTP/1.1 200"):
        raise SystemExit("bad answer: %r" % first)
    while s.recv(4096):
        pass
    s.close()
    return d
for _ in range(5):
    once()
for _ in range(n):
    print("%.4f" % (once() * 1000.0))
"#;

fn parse_ms(out: &str, n: usize, what: &str) -> Vec<f64> {
    let v: Vec<f64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(v.len(), n, "{what}: {out}");
    v
}

/// Reads until the end of a response head; returns it.
fn read_head(s: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read the head");
        assert!(n > 0, "closed before the head ended: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    head
}

/// Sends the tiny GET, returns when its first byte arrived (checked), drains the rest.
fn tiny_get(s: &mut (impl Read + Write), t: Instant) -> Duration {
    s.write_all(TINY_GET).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).expect("read the answer");
    let d = t.elapsed();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    d
}

/// Rust latency loop on the host: straight to the upstream, or through the proxy's socket.
fn latency_host(n: usize, unix_socket: Option<PathBuf>) -> Vec<f64> {
    let once = || -> Duration {
        let t = Instant::now();
        match &unix_socket {
            Some(sock) => {
                let mut s = UnixStream::connect(sock).expect("connect to the proxy socket");
                s.write_all(CONNECT).unwrap();
                let head = read_head(&mut s);
                assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
                tiny_get(&mut s, t)
            }
            None => {
                let mut s = TcpStream::connect((UP_ADDR, UP_PORT)).expect("connect to the upstream");
                s.set_nodelay(true).unwrap();
                tiny_get(&mut s, t)
            }
        }
    };
    for _ in 0..5 {
        once();
    }
    (0..n).map(|_| ms(once())).collect()
}

/// The Python latency loop on the host, straight to the upstream (`None`: no python3).
fn latency_host_python(n: usize) -> Option<Vec<f64>> {
    let mut child = Command::new("python3")
        .args(["-", &n.to_string(), "direct"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(LATENCY_PY.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| parse_ms(&String::from_utf8_lossy(&out.stdout), n, "python3 on the host"))
}

/// Holds `argv[1]` idle CONNECT tunnels until /tmp/tunnels-release appears (at most 10
/// minutes); /tmp/tunnels-ready says they are all open.
const TUNNELS_PY: &str = r#"
import os, socket, sys, time
n = int(sys.argv[1])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(b"CONNECT up.bench:8080 HTTP/1.1\r\nHost: up.bench:8080\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("tunnel %d: the proxy closed: %r" % (i, head))
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit("tunnel %d refused: %r" % (i, head))
    socks.append(s)
with open("/tmp/tunnels-ready.tmp", "w") as f:
    f.write(str(len(socks)))
os.rename("/tmp/tunnels-ready.tmp", "/tmp/tunnels-ready")
deadline = time.time() + 600
while not os.path.exists("/tmp/tunnels-release") and time.time() < deadline:
    time.sleep(0.05)
for s in socks:
    s.close()
print("closed", len(socks))
"#;

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// (CFS periods, periods throttled) so far of the CPU cgroup of process `pid` (the
/// container's init: the workspace's CPU limit); zeros where unreadable.
fn throttling(pid: u32) -> (u64, u64) {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let path = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "cpu") {
            Some(format!("/sys/fs/cgroup/{controllers}{path}/cpu.stat"))
        } else {
            None
        }
    });
    let path = path.or_else(|| {
        let p = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(format!("/sys/fs/cgroup{p}/cpu.stat"))
    });
    let stat = path.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let get = |key: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get("nr_periods "), get("nr_throttled "))
}

/// The host's CPU pressure: `some avg60`, the share of the last minute in which some task
/// waited for a CPU.
fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("some"))?
                .split_whitespace()
                .find_map(|f| f.strip_prefix("avg60="))
                .map(|v| format!("{v} %"))
        })
        .unwrap_or_else(|| "?".into())
}

/// CPU time (user + system) of process `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: u64 = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// (open descriptors, of which pipes) of `pid`.
fn fds(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let links: Vec<String> = dir
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().to_string())
        .collect();
    let pipes = links.iter().filter(|l| l.starts_with("pipe:")).count();
    (links.len(), pipes)
}

/// The host pid of the agent's egress relay: the child of the container's init whose
/// first argument is `egress`.
fn relay_pid(init: u32) -> u32 {
    let mut kids = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{init}/task"))
        .expect("the init's tasks")
        .flatten()
    {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        kids.extend(text.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
    }
    kids.into_iter()
        .find(|k| {
            let cmdline = std::fs::read(format!("/proc/{k}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).nth(1) == Some(b"egress".as_slice())
        })
        .expect("the agent's egress relay among the init's children")
}

/// What a process holds at one moment.
#[derive(Clone, Copy)]
struct Sample {
    rss_kib: u64,
    threads: u64,
    fds: usize,
    pipes: usize,
}

fn sample(pid: u32) -> Sample {
    let (fds, pipes) = fds(pid);
    Sample {
        rss_kib: proc_status(pid, "VmRSS:"),
        threads: proc_status(pid, "Threads:"),
        fds,
        pipes,
    }
}

fn open_files_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("?")
        .to_string()
}

struct Results {
    runs: usize,
    proxied: Vec<f64>,
    host_half: Vec<f64>,
    direct: Vec<f64>,
    /// CPU seconds of this process (the proxy) and of the relay per proxied transfer.
    cpu_proxy: Vec<f64>,
    cpu_relay: Vec<f64>,
    /// The workspace's (CFS periods, throttled periods) during the proxied transfers and
    /// during the latency loops in it.
    throttled_tp: (u64, u64),
    throttled_lat: (u64, u64),
    n: usize,
    lat_proxied: Vec<f64>,
    lat_host_half: Vec<f64>,
    lat_direct: Vec<f64>,
    lat_direct_py: Option<Vec<f64>>,
    conns: usize,
    /// The workspace's (nofile, pids).
    limits: (u32, u32),
    relay_nofile: String,
    pressure_start: String,
    /// (before, with the tunnels, after closing them) for this process and the relay.
    bench: [Sample; 3],
    relay: [Sample; 3],
}

async fn measure(c: Arc<Conductor>, w: WorkspaceInfo) -> Results {
    let id = w.id.as_str();
    let runs = env_usize("BENCH_RUNS", 3).max(1);
    let n = env_usize("BENCH_N", 50).max(1);
    let conns = env_usize("BENCH_CONNS", 200).max(1);
    let socket = c.egress_dir(id).join(EGRESS_SOCKET_NAME);
    let pressure_start = cpu_pressure();

    // The proxy answers before anything is timed.
    let (code, out, err) = sh(
        &c,
        id,
        &format!("curl -s -m 10 -o /dev/null -w '%{{http_code}}' http://{UP_NAME}:{UP_PORT}/tiny"),
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "200"), "the proxy path does not work: {err}");

    let init = c
        .engine
        .container_inspect(&w.container_name)
        .await
        .unwrap()
        .expect("the workspace's container")
        .pid
        .expect("its init pid");
    let relay = relay_pid(init);
    let me = std::process::id();

    // 1. Throughput, interleaved.
    let (mut proxied, mut host_half, mut direct) = (vec![], vec![], vec![]);
    let (mut cpu_proxy, mut cpu_relay) = (vec![], vec![]);
    let mut throttled_tp = (0, 0);
    for _ in 0..runs {
        let cpu = (cpu_seconds(me), cpu_seconds(relay));
        let t0 = throttling(init);
        proxied.push(throughput_proxied(&c, id).await);
        let t1 = throttling(init);
        throttled_tp = (throttled_tp.0 + t1.0 - t0.0, throttled_tp.1 + t1.1 - t0.1);
        cpu_proxy.push(cpu_seconds(me) - cpu.0);
        cpu_relay.push(cpu_seconds(relay) - cpu.1);
        let sock = socket.clone();
        host_half.push(
            tokio::task::spawn_blocking(move || throughput_host_half(&sock))
                .await
                .unwrap(),
        );
        direct.push(tokio::task::spawn_blocking(throughput_direct).await.unwrap());
    }

    // 2. Connect latency, in interleaved rounds (a new python3 process each round).
    let rounds = n.min(5);
    let (mut lat_proxied, mut lat_host_half, mut lat_direct) = (vec![], vec![], vec![]);
    let mut lat_direct_py: Option<Vec<f64>> = Some(vec![]);
    let mut throttled_lat = (0, 0);
    for round in 0..rounds {
        let k = n / rounds + usize::from(round < n % rounds);
        let t0 = throttling(init);
        let (code, out, err) = sh(&c, id, &format!("python3 - {k} proxy <<'EOF'\n{LATENCY_PY}\nEOF")).await;
        let t1 = throttling(init);
        throttled_lat = (throttled_lat.0 + t1.0 - t0.0, throttled_lat.1 + t1.1 - t0.1);
        assert_eq!(code, 0, "the latency loop in the workspace: {out}{err}");
        lat_proxied.extend(parse_ms(&out, k, "through the proxy"));
        let sock = socket.clone();
        lat_host_half.extend(
            tokio::task::spawn_blocking(move || latency_host(k, Some(sock)))
                .await
                .unwrap(),
        );
        lat_direct.extend(
            tokio::task::spawn_blocking(move || latency_host(k, None))
                .await
                .unwrap(),
        );
        let py = tokio::task::spawn_blocking(move || latency_host_python(k))
            .await
            .unwrap();
        lat_direct_py = lat_direct_py.zip(py).map(|(mut all, v)| {
            all.extend(v);
            all
        });
    }

    // 3. Memory per idle tunnel.
    let relay_nofile = open_files_limit(relay);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (sample(me), sample(relay));
    let holder = {
        let (c, id) = (c.clone(), id.to_string());
        tokio::spawn(async move {
            sh(
                &c,
                &id,
                &format!("rm -f /tmp/tunnels-*; python3 - {conns} <<'EOF'\n{TUNNELS_PY}\nEOF"),
            )
            .await
        })
    };
    let begin = Instant::now();
    loop {
        let (_, out, _) = sh(&c, id, "cat /tmp/tunnels-ready 2>/dev/null || true").await;
        if !out.trim().is_empty() {
            assert_eq!(out.trim(), conns.to_string());
            break;
        }
        if holder.is_finished() {
            let (code, out, err) = holder.await.unwrap();
            panic!("the tunnels' holder ended ({code}): {out}{err}");
        }
        assert!(begin.elapsed() < Duration::from_secs(120), "the tunnels did not open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with = (sample(me), sample(relay));
    sh(&c, id, "touch /tmp/tunnels-release").await;
    let (code, out, err) = holder.await.unwrap();
    assert_eq!((code, out.trim()), (0, format!("closed {conns}").as_str()), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = (sample(me), sample(relay));

    Results {
        runs,
        proxied,
        host_half,
        direct,
        cpu_proxy,
        cpu_relay,
        throttled_tp,
        throttled_lat,
        n,
        lat_proxied,
        lat_host_half,
        lat_direct,
        lat_direct_py,
        conns,
        limits: (w.limits.nofile, w.limits.pids),
        relay_nofile,
        pressure_start,
        bench: [before.0, with.0, after.0],
        relay: [before.1, with.1, after.1],
    }
}

fn print(r: &Results) {
    let (dm, dmin) = (median(&r.direct), quantile(&r.direct, 0.0));
    println!(
        "\n### Throughput: 1 GiB over plain HTTP in a `CONNECT` tunnel (curl), {} runs\n",
        r.runs
    );
    println!("| measurement | median MiB/s | slowest MiB/s | baseline | median MiB/s | slowest MiB/s | ratio |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for (name, v) in [
        ("through the proxy, from the workspace (relay + host proxy)", &r.proxied),
        (
            "host half only: the proxy's Unix socket, from the host (Rust client)",
            &r.host_half,
        ),
    ] {
        let (m, min) = (median(v), quantile(v, 0.0));
        println!(
            "| {name} | {m:.0} | {min:.0} | direct from the host | {dm:.0} | {dmin:.0} | {:.3} |",
            m / dm
        );
    }
    println!("| direct from the host (no proxy) | {dm:.0} | {dmin:.0} | | | | |");
    println!(
        "\nCPU per GiB through the proxy from the workspace (medians): conductor's proxy {:.2} s, the agent's relay {:.2} s.",
        median(&r.cpu_proxy),
        median(&r.cpu_relay)
    );
    println!(
        "The workspace's CPU limit throttled it in {} of {} scheduling periods during these transfers.",
        r.throttled_tp.1, r.throttled_tp.0
    );

    let (lm, lp) = (median(&r.lat_direct), quantile(&r.lat_direct, 0.95));
    println!(
        "\n### Connect latency: new connection + tiny GET, to the first byte of the answer, n = {}\n",
        r.n
    );
    println!("| measurement | median ms | p95 ms | baseline | median ms | p95 ms | added median ms |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    let mut rows = vec![
        (
            "through the proxy, from the workspace (python3: connect, `CONNECT`, GET)",
            &r.lat_proxied,
        ),
        ("host half only: the proxy's Unix socket (Rust loop)", &r.lat_host_half),
    ];
    if let Some(py) = &r.lat_direct_py {
        rows.push(("direct from the host (python3, the same loop without the proxy)", py));
    }
    for (name, v) in rows {
        let (m, p) = (median(v), quantile(v, 0.95));
        println!(
            "| {name} | {m:.3} | {p:.3} | direct from the host (Rust loop) | {lm:.3} | {lp:.3} | {:.3} |",
            m - lm
        );
    }
    println!("| direct from the host (Rust loop) | {lm:.3} | {lp:.3} | | | | |");
    println!(
        "\n{} interleaved rounds; the workspace's CPU limit throttled it in {} of {} scheduling periods during its loops.",
        r.n.min(5),
        r.throttled_lat.1,
        r.throttled_lat.0
    );

    println!("\n### Memory per open connection: {} idle `CONNECT` tunnels\n", r.conns);
    println!("| process | RSS before KiB | with the tunnels KiB | KiB per tunnel | after closing KiB | threads (before / with) | descriptors (before / with; pipes) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, s) in [
        ("conductor (hosts the proxy; this bench process)", &r.bench),
        ("agent egress relay (`conductor-agent egress`)", &r.relay),
    ] {
        let per = (s[1].rss_kib as f64 - s[0].rss_kib as f64) / r.conns as f64;
        println!(
            "| {name} | {} | {} | {per:.1} | {} | {} / {} | {} / {}; {} / {} |",
            s[0].rss_kib,
            s[1].rss_kib,
            s[2].rss_kib,
            s[0].threads,
            s[1].threads,
            s[0].fds,
            s[1].fds,
            s[0].pipes,
            s[1].pipes
        );
    }
    let rl = &r.relay;
    let fds_per = (rl[1].fds as f64 - rl[0].fds as f64) / r.conns as f64;
    let threads_per = (rl[1].threads as f64 - rl[0].threads as f64) / r.conns as f64;
    println!(
        "\nKernel socket buffers and pipes are not in RSS. The relay holds {fds_per:.1} descriptors and {threads_per:.1} threads \
         per tunnel: at the default `nofile` ({DEFAULT_NOFILE}) it can hold about {:.0} tunnels, and at the default `pids` \
         ({DEFAULT_PIDS}, threads count) at most about {:.0} (the relay's own cap is {}); this run sets `nofile` {} (the relay's \
         limit: {}) and `pids` {}.",
        (DEFAULT_NOFILE as f64 - rl[0].fds as f64) / fds_per.max(1.0),
        (DEFAULT_PIDS as f64 - rl[0].threads as f64) / threads_per.max(1.0),
        conductor_agent_protocol::EGRESS_MAX_CONNECTIONS,
        r.limits.0,
        r.relay_nofile,
        r.limits.1
    );

    println!(
        "\nHost CPU pressure (some, avg60) at the start: {}; at the end: {}.",
        r.pressure_start,
        cpu_pressure()
    );
    let ratio = median(&r.proxied) / dm;
    let added = median(&r.lat_proxied) - lm;
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    println!(
        "\nGoals: throughput through the proxy ≥ 0.80 × direct: {ratio:.3} ({}); added connect latency p50 ≤ 1 ms: {added:.3} ms ({}).",
        verdict(ratio >= 0.80),
        verdict(added <= 1.0)
    );
}

fn main() {
    if let Ok(addr) = std::env::var(UPSTREAM_ENV) {
        serve_upstream(&addr);
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let up = Upstream::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-egress");
    std::fs::create_dir_all(&root).unwrap();
    let dir = tempfile::tempdir_in(&root).unwrap();
    // The release agent (scripts/bench.sh builds it), not whichever build is newest.
    let agent = std::env::var("BENCH_AGENT").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../x86_64-unknown-linux-gnu/release/conductor-agent")
    });
    let agent_line = if agent_client::is_static_elf(&agent) {
        format!("    agent_binary: \"{}\"\n", agent.display())
    } else {
        String::new()
    };
    let outcome = rt.block_on(async {
        let text = format!(
            "storage:\n  base_path: {}\nisolated_workspace:\n  agent_containers:\n{agent_line}    resources:\n      limits:\n        nofile: {}\n        pids: {}\nnetwork:\n  egress:\n    max_connections: 512\n    idle_timeout: 3600\n    resolve:\n      {UP_NAME}: [\"{UP_ADDR}\"]\n",
            dir.path().display(),
            env_usize("BENCH_NOFILE", NOFILE),
            env_usize("BENCH_PIDS", PIDS),
        );
        let config = Config::parse(&text).expect("config").config;
        let c = Arc::new(Conductor::open(config).await.expect("open conductor"));
        let agent = agent_client::binary(&c.config).expect("build the static agent first (scripts/setup.sh)");
        let info = c
            .create_workspace(
                CreateRequest {
                    agent_id: "egress-bench".into(),
                    environment: "python-dev".into(),
                    ephemeral: true,
                    network: Some(NetworkPolicy {
                        mode: Some(NetworkMode::Proxy),
                        allow: Some(vec![format!("{UP_NAME}:{UP_PORT}"), UP_NAME.into()]),
                        deny: vec![],
                    }),
                    ..Default::default()
                },
                quiet(),
            )
            .await
            .expect("create the proxy-mode workspace");
        println!(
            "conductor egress benchmark: {} cores, load average {}, upstream {UP_ADDR}:{UP_PORT} in a network namespace (veth), \
             workspace `python-dev` in proxy mode ({} CPU, the default; nofile {}, pids {}), agent {}",
            std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            info.limits.cpu.0 as f64 / 1000.0,
            info.limits.nofile,
            info.limits.pids,
            agent.display(),
        );
        let ws = Workspace {
            c: c.clone(),
            info: info.clone(),
            removed: false,
        };
        // A panic in the measurement is caught here, so the workspace is removed first.
        let measured = tokio::select! {
            r = tokio::spawn(measure(c.clone(), info)) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: cleaning up");
                ws.remove().await;
                let _ = c.reconcile().await;
                return None;
            }
        };
        ws.remove().await;
        for w in c.list_workspaces(&Default::default()).unwrap_or_default() {
            let _ = c.remove_workspace(&w.id, None).await;
        }
        let _ = c.reconcile().await;
        Some(measured)
    });
    drop(up);
    match outcome {
        Some(Ok(results)) => print(&results),
        Some(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        None => std::process::exit(130),
    }
}
