//! `conductor-agent`: the in-workspace agent.
//!
//! Mounted read-only into every workspace and started as its PID 1:
//!
//! ```text
//! conductor-agent init   [--socket /run/conductor/agent.sock] [--root /workspace]
//!                        [--egress-listen 127.0.0.1:3128 [--egress-socket /run/conductor-egress/egress.sock]]
//! conductor-agent serve  [--socket PATH] [--root DIR]
//! conductor-agent egress [--egress-listen ADDR] [--egress-socket PATH]
//! conductor-agent install PATH
//! ```
//!
//! `install` copies this binary to `PATH` (mode 0555): the init container of a Kubernetes
//! workspace Pod runs it to put the agent into the Pod's `emptyDir` (the agent image has
//! nothing else, not even `cp`).
//!
//! `init` is PID 1: it reaps every zombie of the container, forwards signals, and exits on
//! SIGTERM/SIGINT after forwarding them. It starts `serve` (this same binary, as a child) to
//! answer conductor on the Unix socket: a crash of the server, or a workload killing it,
//! never takes the container down; conductor then falls back to Podman exec. With
//! `--egress-listen`, init also starts `egress` (again this binary, as a second child, and
//! restarted when it dies): the relay from a loopback TCP port to the host's egress proxy
//! socket, for workspaces whose network is only loopback (see `egress.rs`). All of them run
//! as the workspace user with the workload's capabilities and seccomp filter, so the agent
//! can do nothing the workload could not. Protocol: `docs/agent-protocol.md`.
//!
//! Built static (`-C target-feature=+crt-static` on the gnu target) so that it runs in any
//! image, whatever its libc.

mod archive;
mod conn;
mod egress;
mod exec;
mod files;
mod init;
mod pipes;
mod server;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use conductor_agent_protocol::{EGRESS_DEFAULT_LISTEN, EGRESS_SOCKET_DIR, EGRESS_SOCKET_NAME, SOCKET_DIR, SOCKET_NAME};

/// Where the agent listens, what file operations may touch, and the egress relay.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub root: PathBuf,
    /// Where the egress relay listens (a loopback address); `None`: no relay.
    pub egress_listen: Option<SocketAddr>,
    /// The host's egress proxy socket the relay connects to.
    pub egress_socket: PathBuf,
}

const USAGE: &str =
    "usage: conductor-agent init [--socket PATH] [--root DIR] [--egress-listen ADDR] [--egress-socket PATH]
       conductor-agent serve [--socket PATH] [--root DIR]
       conductor-agent egress [--egress-listen ADDR] [--egress-socket PATH]
       conductor-agent install PATH
       conductor-agent --version
  --socket PATH         the agent's Unix socket (default /run/conductor/agent.sock)
  --root DIR            the root of file operations (default /workspace)
  --egress-listen ADDR  relay TCP connections on this loopback address (e.g. 127.0.0.1:3128) to
                        the egress socket; init: no relay without it; egress: default 127.0.0.1:3128
  --egress-socket PATH  the host's egress proxy socket (default /run/conductor-egress/egress.sock)";

/// Parses the options of `cmd`: `init` takes them all, `serve` the socket and the root,
/// `egress` the egress ones.
fn parse(cmd: &str, args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        socket: PathBuf::from(SOCKET_DIR).join(SOCKET_NAME),
        root: PathBuf::from("/workspace"),
        egress_listen: None,
        egress_socket: PathBuf::from(EGRESS_SOCKET_DIR).join(EGRESS_SOCKET_NAME),
    };
    let mut egress_socket_given = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match (cmd, a.as_str()) {
            ("init" | "serve", "--socket") => opts.socket = PathBuf::from(value),
            ("init" | "serve", "--root") => opts.root = PathBuf::from(value),
            ("init" | "egress", "--egress-listen") => {
                let addr: SocketAddr = value
                    .parse()
                    .map_err(|_| format!("--egress-listen: {value:?} is not an address with a port"))?;
                if !addr.ip().is_loopback() {
                    return Err(format!("--egress-listen must be a loopback address, not {addr}"));
                }
                opts.egress_listen = Some(addr);
            }
            ("init" | "egress", "--egress-socket") => {
                opts.egress_socket = PathBuf::from(value);
                egress_socket_given = true;
            }
            (_, other) => return Err(format!("unknown option {other}")),
        }
    }
    if !opts.root.is_absolute() {
        return Err("--root must be an absolute path".into());
    }
    if cmd == "egress" && opts.egress_listen.is_none() {
        opts.egress_listen = Some(EGRESS_DEFAULT_LISTEN.parse().expect("a valid default"));
    }
    if egress_socket_given && opts.egress_listen.is_none() {
        return Err("--egress-socket needs --egress-listen".into());
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if cmd == "--version" {
        println!(
            "conductor-agent {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            conductor_agent_protocol::VERSION
        );
        return ExitCode::SUCCESS;
    }
    if cmd == "install" {
        return match rest {
            [dest] => match install(std::path::Path::new(dest)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("conductor-agent: install to {dest}: {e}");
                    ExitCode::FAILURE
                }
            },
            _ => {
                eprintln!("conductor-agent: install takes one path\n{USAGE}");
                ExitCode::from(2)
            }
        };
    }
    let opts = match parse(cmd, rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("conductor-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Not dumpable: a workload process (same uid) may not open this process's
    // /proc/<pid>/mem or use process_vm_writev on it, so the agent conductor verified at
    // connect time (see agent_client.rs in the service) is the code it runs.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("conductor-agent: prctl(PR_SET_DUMPABLE): {e}");
    }
    if cmd != "init" {
        child_signal_mask();
    }
    match cmd {
        "init" => init::run(&opts),
        "serve" => match server::run(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("conductor-agent: serving on {} failed: {e}", opts.socket.display());
                ExitCode::FAILURE
            }
        },
        "egress" => {
            let listen = opts.egress_listen.expect("parse sets a default");
            match egress::run(listen, opts.egress_socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("conductor-agent: the egress relay on {listen} failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Copies the running binary to `dest` (through a temporary file beside it, so a reader
/// never sees half a binary), readable and executable by everyone, writable by no one.
fn install(dest: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe()?;
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&me, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, dest)
}

/// The signal mask of init's children (`serve`, `egress`), set before any thread starts so
/// that all inherit it. A child inherits init's mask (init blocks the signals it takes with
/// `sigwait`; std's spawn does not reset it): without this the children would ignore the
/// SIGTERM init forwards on `podman stop`. SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2, which init
/// forwards to every process of the container for the workload, stay blocked (their
/// default action would end the agent). Commands the server starts get an empty mask.
fn child_signal_mask() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut quiet = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2] {
        quiet.add(s);
    }
    if let Err(e) = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&quiet), None) {
        eprintln!("conductor-agent: cannot set the signal mask: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_have_workspace_defaults() {
        for cmd in ["init", "serve"] {
            let o = parse(cmd, &[]).unwrap();
            assert_eq!(o.socket, PathBuf::from("/run/conductor/agent.sock"));
            assert_eq!(o.root, PathBuf::from("/workspace"));
            assert_eq!(o.egress_listen, None, "no relay unless asked for");
            let o = parse(cmd, &args(&["--root", "/srv", "--socket", "/tmp/s"])).unwrap();
            assert_eq!((o.root.to_str(), o.socket.to_str()), (Some("/srv"), Some("/tmp/s")));
            assert!(parse(cmd, &args(&["--root"])).is_err());
            assert!(parse(cmd, &args(&["--root", "rel"])).is_err());
            assert!(parse(cmd, &args(&["--bogus", "x"])).is_err());
        }
    }

    #[test]
    fn egress_options() {
        let o = parse("init", &args(&["--egress-listen", "127.0.0.1:3128"])).unwrap();
        assert_eq!(o.egress_listen, Some("127.0.0.1:3128".parse().unwrap()));
        assert_eq!(o.egress_socket, PathBuf::from("/run/conductor-egress/egress.sock"));
        let o = parse(
            "init",
            &args(&["--egress-listen", "[::1]:8080", "--egress-socket", "/e.sock"]),
        )
        .unwrap();
        assert_eq!(o.egress_listen, Some("[::1]:8080".parse().unwrap()));
        assert_eq!(o.egress_socket, PathBuf::from("/e.sock"));
        // The relay process listens on the default address unless told otherwise.
        let o = parse("egress", &[]).unwrap();
        assert_eq!(o.egress_listen, Some(EGRESS_DEFAULT_LISTEN.parse().unwrap()));
        // Only loopback, always with a port; the socket alone enables nothing.
        assert!(parse("init", &args(&["--egress-listen", "0.0.0.0:3128"])).is_err());
        assert!(parse("init", &args(&["--egress-listen", "10.0.0.2:3128"])).is_err());
        assert!(parse("init", &args(&["--egress-listen", "127.0.0.1"])).is_err());
        assert!(parse("init", &args(&["--egress-socket", "/e.sock"])).is_err());
        // Each child takes only its own options.
        assert!(parse("serve", &args(&["--egress-listen", "127.0.0.1:3128"])).is_err());
        assert!(parse("egress", &args(&["--socket", "/tmp/s"])).is_err());
    }
}
