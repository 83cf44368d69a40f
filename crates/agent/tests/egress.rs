//! The egress relay through the real binary (no container): init starts it beside the
//! server, restarts it when it dies, and neither takes the other down.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{alive, code_of, wait_gone, wait_until, Agent};
use conductor_agent_protocol::ExecRequest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A Unix-socket echo server at `path`.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut s = s;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A loopback address nothing listens on (right now).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Whether "ping" goes through the relay at `addr` and comes back.
fn round_trip(addr: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    if c.write_all(b"ping").is_err() || c.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let mut got = Vec::new();
    c.read_to_end(&mut got).is_ok() && got == b"ping"
}

/// The child of `init` whose command line holds `word` (`serve` or `egress`).
fn child(init: u32, word: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &u32| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            cmd.split(|b| *b == 0).nth(1) == Some(word.as_bytes())
        })
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    assert!(wait_gone(pid), "{pid} survived SIGKILL");
}

/// SIGTERM to init: it exits, and its children with it (not after init's grace period).
fn stop(a: &mut Agent) {
    let children: Vec<u32> = ["serve", "egress"]
        .iter()
        .filter_map(|w| child(a.child.id(), w))
        .collect();
    kill(Pid::from_raw(a.child.id() as i32), Signal::SIGTERM).unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "init did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the children ignored the SIGTERM init forwarded"
    );
    for pid in children {
        assert!(!alive(pid), "{pid} outlived init");
    }
}

#[test]
fn init_runs_the_relay_apart_from_the_server_and_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("egress.sock");
    echo_server(&sock);
    let addr = free_addr();
    let mut a = Agent::start_with(
        "init",
        &[
            "--egress-listen",
            &addr.to_string(),
            "--egress-socket",
            sock.to_str().unwrap(),
        ],
    );
    let init = a.child.id();
    assert!(wait_until(|| round_trip(addr)), "the relay does not answer");
    let server = child(init, "serve").expect("a server");
    let relay = child(init, "egress").expect("a relay");

    // The workload killing the relay: init starts a new one, at once the first time.
    sigkill(relay);
    assert!(
        wait_until(|| child(init, "egress").is_some_and(|p| p != relay) && round_trip(addr)),
        "the relay was not restarted"
    );
    assert_eq!(child(init, "serve"), Some(server), "the server must not notice");
    let (exit, out, _) = a.connect().exec(ExecRequest {
        shell: Some("echo ok".into()),
        ..Default::default()
    });
    assert_eq!((code_of(&exit), out.as_str()), (0, "ok\n"));

    // Killing the server leaves the relay running.
    let relay = child(init, "egress").unwrap();
    sigkill(server);
    assert!(round_trip(addr));
    assert_eq!(child(init, "egress"), Some(relay));

    stop(&mut a);
}

#[test]
fn a_taken_address_leaves_exec_working_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("egress.sock");
    echo_server(&sock);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut a = Agent::start_with(
        "init",
        &[
            "--egress-listen",
            &addr.to_string(),
            "--egress-socket",
            sock.to_str().unwrap(),
        ],
    );
    let (exit, out, _) = a.connect().exec(ExecRequest {
        shell: Some("echo ok".into()),
        ..Default::default()
    });
    assert_eq!((code_of(&exit), out.as_str()), (0, "ok\n"));
    let relay = child(a.child.id(), "egress").expect("a relay");
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(relay), "a bind failure must not end the relay");
    // Once the address is free the relay takes it (its next try is within 1 s).
    drop(taken);
    assert!(
        wait_until(|| round_trip(addr)),
        "the relay did not bind once the address was free"
    );
    assert_eq!(child(a.child.id(), "egress"), Some(relay));
    stop(&mut a);
}

#[test]
fn without_egress_options_init_starts_no_relay() {
    let mut a = Agent::start("init");
    let init = a.child.id();
    assert!(child(init, "serve").is_some());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(child(init, "egress"), None);
    stop(&mut a);
}
