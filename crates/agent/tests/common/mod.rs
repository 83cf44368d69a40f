//! Shared harness of the agent's host tests (no container): the binary started on a socket
//! in a temporary directory, a client speaking the protocol's frames, and waits on
//! processes.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use conductor_agent_protocol::{encode, parse_prefix, ErrorCode, ExecRequest, Request, Response, VERSION};

pub const BIN: &str = env!("CARGO_BIN_EXE_conductor-agent");

/// A `conductor-agent` process on the host; dropping it kills it.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    /// The agent's root, `<dir>/root`: its parent is "outside".
    pub root: PathBuf,
    /// Holds the socket and the root.
    pub dir: tempfile::TempDir,
    /// A feature the hello of every connection must announce.
    needs: Option<&'static str>,
}

impl Agent {
    /// Starts `conductor-agent <mode>` (`serve` or `init`) and waits until it listens.
    pub fn start(mode: &str) -> Agent {
        Agent::start_with(mode, &[])
    }

    /// [`Agent::start`] with more options.
    pub fn start_with(mode: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(BIN)
            .args([
                mode,
                "--socket",
                socket.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
            ])
            .args(extra)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(5), "agent did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            child,
            socket,
            root,
            dir,
            needs: None,
        }
    }

    /// Makes [`Agent::connect`] also check that the agent announces `feature`.
    pub fn needing(mut self, feature: &'static str) -> Agent {
        self.needs = Some(feature);
        self
    }

    /// A connection that has not said hello.
    pub fn raw(&self) -> Client {
        Client(UnixStream::connect(&self.socket).unwrap())
    }

    /// A connection after hello.
    pub fn connect(&self) -> Client {
        let mut c = self.raw();
        c.send(&Request::Hello { version: VERSION }, b"");
        match c.recv().0 {
            Response::Hello { version, features, .. } => {
                assert_eq!(version, VERSION);
                if let Some(f) = self.needs {
                    assert!(features.iter().any(|x| x == f), "{features:?}");
                }
            }
            other => panic!("{other:?}"),
        }
        c
    }

    /// Stops the agent and waits for it (again on drop: a no-op then): SIGTERM first, so
    /// that an init takes its children (server, relay) along instead of leaving them
    /// behind, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while let Ok(None) = self.child.try_wait() {
                if t.elapsed() > Duration::from_secs(5) {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Client(pub UnixStream);

impl Client {
    pub fn send(&mut self, msg: &Request, data: &[u8]) {
        let mut buf = Vec::new();
        encode(msg, data, &mut buf);
        self.0.write_all(&buf).unwrap();
    }

    pub fn recv(&mut self) -> (Response, Vec<u8>) {
        let mut prefix = [0u8; 8];
        self.0.read_exact(&mut prefix).unwrap();
        let (h, d) = parse_prefix(&prefix).unwrap();
        let mut header = vec![0u8; h];
        self.0.read_exact(&mut header).unwrap();
        let mut data = vec![0u8; d];
        self.0.read_exact(&mut data).unwrap();
        (serde_json::from_slice(&header).unwrap(), data)
    }

    /// Sends a request without data; the answer.
    pub fn op(&mut self, req: Request) -> Response {
        self.send(&req, b"");
        self.recv().0
    }

    /// Runs a request; returns (exit or error message, stdout, stderr).
    pub fn exec(&mut self, req: ExecRequest) -> (Response, String, String) {
        self.send(&Request::Exec(req), b"");
        self.collect()
    }

    /// Runs a request with `input` as its stdin; returns what [`Client::exec`] does.
    pub fn exec_stdin(&mut self, req: ExecRequest, input: &[u8]) -> (Response, String, String) {
        self.send(&Request::Exec(req), b"");
        self.send(&Request::Data, input);
        self.send(&Request::Eof, b"");
        self.collect()
    }

    /// The rest of a running command: (exit or error message, stdout, stderr).
    pub fn collect(&mut self) -> (Response, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.recv() {
                (Response::Started { .. }, _) => {}
                (Response::Stdout, d) => out.extend(d),
                (Response::Stderr, d) => err.extend(d),
                (end @ (Response::Exit { .. } | Response::Error { .. }), _) => {
                    return (end, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

pub fn code_of(r: &Response) -> i32 {
    match r {
        Response::Exit { code, .. } => *code,
        other => panic!("{other:?}"),
    }
}

pub fn error_code(r: &Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Whether `pid` runs (a zombie still has a /proc entry: its state tells).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Checks `done` every 10 ms for 5 s; whether it came true.
pub fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits until `pid` no longer runs (it may still be an unreaped zombie).
pub fn wait_gone(pid: u32) -> bool {
    wait_until(|| !alive(pid))
}
