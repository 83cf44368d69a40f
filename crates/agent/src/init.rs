//! PID 1 of a workspace: reaps zombies, forwards signals, keeps the server running once.
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

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

/// How long processes get to exit after a forwarded SIGTERM before init exits.
const GRACE: Duration = Duration::from_secs(3);

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
    ] {
        set.add(s);
    }
    set
}

/// Sends `sig` to every process init may signal: as PID 1 that is the whole container;
/// otherwise (tests, or started by hand) only the server.
fn forward(sig: Signal, server: Option<Pid>) {
    if getpid().as_raw() == 1 {
        let _ = kill(Pid::from_raw(-1), sig);
    } else if let Some(pid) = server {
        let _ = kill(pid, sig);
    }
}

/// Reaps every exited child; returns true when the server was among them.
fn reap(server: Option<Pid>) -> bool {
    let mut server_gone = false;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return server_gone,
            Ok(status) => {
                if status.pid().is_some() && status.pid() == server {
                    eprintln!("conductor-agent: the server ended ({status:?}); exec falls back to podman");
                    server_gone = true;
                }
            }
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

/// Runs as init; `serve_args` are passed on to the server (`--socket`, `--root`).
pub fn run(serve_args: &[String]) -> ExitCode {
    let set = signals();
    if let Err(e) = set.thread_block() {
        eprintln!("conductor-agent: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    // Outside a container (tests) orphans must come to us too.
    let _ = prctl::set_child_subreaper(true);
    // The child starts with an empty signal mask (std resets it).
    let mut server = match Command::new("/proc/self/exe").arg("serve").args(serve_args).spawn() {
        Ok(child) => Some(Pid::from_raw(child.id() as i32)),
        Err(e) => {
            eprintln!("conductor-agent: cannot start the server: {e}; exec falls back to podman");
            None
        }
    };
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        match sig {
            Signal::SIGCHLD => {
                if reap(server) {
                    server = None;
                }
            }
            Signal::SIGTERM | Signal::SIGINT => {
                forward(sig, server);
                drain_children();
                return ExitCode::SUCCESS;
            }
            other => forward(other, server),
        }
    }
}
