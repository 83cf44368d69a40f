//! PID 1 of a workspace: reaps zombies, forwards signals, starts the server (once) and the
//! egress relay (restarted when it dies).
//!
//! All interesting signals are blocked and taken synchronously with `sigwait`, so there are
//! no handlers and no races with `waitpid`. SIGCHLD reaps every exited child (orphans of
//! the workload are re-parented to PID 1 and would stay zombies otherwise). SIGTERM and
//! SIGINT (`podman stop`) are forwarded to every process of the container, then init waits
//! up to [`GRACE`] for them to exit and exits itself; the kernel kills whatever is left.
//! Other signals (HUP, QUIT, USR1, USR2) are forwarded and init carries on.
//!
//! The server is started once. If it dies, init stays (the workspace keeps running and
//! conductor falls back to Podman exec) and says so on stderr, which ends up in the
//! container's log.
//!
//! With `--egress-listen`, init also starts the egress relay (`conductor-agent egress`, see
//! `egress.rs`) as a process of its own, so that a workload killing the server or the relay
//! leaves the other one running. Nothing else gives the workspace its way out, so a relay
//! that dies is started again: at once the first time, then after 1, 2, 4… up to 60 s
//! while it keeps dying within 30 s of its start. The delay is a SIGALRM (`alarm`), taken
//! by the same `sigwait` loop.

use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{alarm, getpid, Pid};

use crate::Options;

/// How long processes get to exit after a forwarded SIGTERM before init exits.
const GRACE: Duration = Duration::from_secs(3);
/// A relay that ran this long before it died is restarted at once.
const RELAY_STABLE: Duration = Duration::from_secs(30);
/// Longest delay before restarting a relay that keeps dying, in seconds.
const RELAY_MAX_DELAY: u32 = 60;

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
    ] {
        set.add(s);
    }
    set
}

/// Sends `sig` to every process init may signal: as PID 1 that is the whole container;
/// otherwise (tests, or started by hand) only its own children (the server, the relay).
fn forward(sig: Signal, children: &[Option<Pid>]) {
    if getpid().as_raw() == 1 {
        let _ = kill(Pid::from_raw(-1), sig);
    } else {
        for pid in children.iter().flatten() {
            let _ = kill(*pid, sig);
        }
    }
}

/// Reaps every exited child; returns those of `watched` that were among them.
fn reap(watched: &[Option<Pid>]) -> Vec<(Pid, WaitStatus)> {
    let mut gone = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return gone,
            Ok(status) => {
                if let Some(pid) = status.pid().filter(|p| watched.contains(&Some(*p))) {
                    gone.push((pid, status));
                }
            }
        }
    }
}

/// Starts `conductor-agent <args>` (this same binary). The child inherits init's signal
/// mask; `main` sets its own first thing (`child_signal_mask`).
fn start(args: &[OsString]) -> std::io::Result<Pid> {
    let child = Command::new("/proc/self/exe").args(args).spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// The egress relay child and its restarts.
struct Relay {
    args: Vec<OsString>,
    pid: Option<Pid>,
    started: Instant,
    /// Deaths in a row, each within [`RELAY_STABLE`] of its start.
    quick_deaths: u32,
}

impl Relay {
    fn new(opts: &Options) -> Option<Relay> {
        let listen = opts.egress_listen?;
        let args = vec![
            "egress".into(),
            "--egress-listen".into(),
            listen.to_string().into(),
            "--egress-socket".into(),
            opts.egress_socket.clone().into_os_string(),
        ];
        let mut relay = Relay {
            args,
            pid: None,
            started: Instant::now(),
            quick_deaths: 0,
        };
        relay.start();
        Some(relay)
    }

    fn start(&mut self) {
        self.started = Instant::now();
        match start(&self.args) {
            Ok(pid) => self.pid = Some(pid),
            Err(e) => {
                eprintln!("conductor-agent: cannot start the egress relay: {e}");
                self.schedule();
            }
        }
    }

    /// The relay died (or could not start): starts it again now or arms the alarm.
    fn schedule(&mut self) {
        self.pid = None;
        if self.started.elapsed() >= RELAY_STABLE {
            self.quick_deaths = 0;
        }
        let delay = match self.quick_deaths {
            0 => 0,
            n => (1u32 << (n - 1).min(6)).min(RELAY_MAX_DELAY),
        };
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        if delay == 0 {
            eprintln!("conductor-agent: restarting the egress relay");
            self.start();
        } else {
            eprintln!("conductor-agent: restarting the egress relay in {delay} s");
            alarm::set(delay);
        }
    }

    /// SIGALRM: the delay is over (or someone sent it early: harmless).
    fn alarm(&mut self) {
        if self.pid.is_none() {
            self.start();
        }
    }
}

/// Waits up to [`GRACE`] for every child to exit.
fn drain_children() {
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
}

/// Runs as init: the server gets `--socket` and `--root`, the relay (only with
/// `--egress-listen`) the egress options.
pub fn run(opts: &Options) -> ExitCode {
    let set = signals();
    if let Err(e) = set.thread_block() {
        eprintln!("conductor-agent: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    // Outside a container (tests) orphans must come to us too.
    let _ = prctl::set_child_subreaper(true);
    let serve_args: Vec<OsString> = vec![
        "serve".into(),
        "--socket".into(),
        opts.socket.clone().into_os_string(),
        "--root".into(),
        opts.root.clone().into_os_string(),
    ];
    let mut server = match start(&serve_args) {
        Ok(pid) => Some(pid),
        Err(e) => {
            eprintln!("conductor-agent: cannot start the server: {e}; exec falls back to podman");
            None
        }
    };
    let mut relay = Relay::new(opts);
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        let children = [server, relay.as_ref().and_then(|r| r.pid)];
        match sig {
            Signal::SIGCHLD => {
                for (pid, status) in reap(&children) {
                    if Some(pid) == server {
                        eprintln!("conductor-agent: the server ended ({status:?}); exec falls back to podman");
                        server = None;
                    } else if let Some(r) = relay.as_mut().filter(|r| r.pid == Some(pid)) {
                        eprintln!("conductor-agent: the egress relay ended ({status:?})");
                        r.schedule();
                    }
                }
            }
            Signal::SIGALRM => {
                if let Some(r) = relay.as_mut() {
                    r.alarm();
                }
            }
            Signal::SIGTERM | Signal::SIGINT => {
                forward(sig, &children);
                drain_children();
                return ExitCode::SUCCESS;
            }
            other => forward(other, &children),
        }
    }
}
