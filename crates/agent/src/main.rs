//! `conductor-agent`: the in-workspace agent.
//!
//! Mounted read-only into every workspace and started as its PID 1:
//!
//! ```text
//! conductor-agent init  [--socket /run/conductor/agent.sock] [--root /workspace]
//! conductor-agent serve [--socket PATH] [--root DIR]
//! ```
//!
//! `init` is PID 1: it reaps every zombie of the container, forwards signals, and exits on
//! SIGTERM/SIGINT after forwarding them. It starts `serve` (this same binary, as a child) to
//! answer conductor on the Unix socket: a crash of the server, or a workload killing it,
//! never takes the container down; conductor then falls back to Podman exec. Both run as the
//! workspace user with the workload's capabilities and seccomp filter, so the agent can do
//! nothing the workload could not. Protocol: `docs/agent-protocol.md`.
//!
//! Built static (`-C target-feature=+crt-static` on the gnu target) so that it runs in any
//! image, whatever its libc.

mod archive;
mod conn;
mod exec;
mod files;
mod init;
mod pipes;
mod server;
mod session;

use std::path::PathBuf;
use std::process::ExitCode;

use conductor_agent_protocol::{SOCKET_DIR, SOCKET_NAME};

/// Where the agent listens and what file operations may touch.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub root: PathBuf,
}

const USAGE: &str = "usage: conductor-agent (init | serve) [--socket PATH] [--root DIR] | --version";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        socket: PathBuf::from(SOCKET_DIR).join(SOCKET_NAME),
        root: PathBuf::from("/workspace"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--socket" => opts.socket = PathBuf::from(value),
            "--root" => opts.root = PathBuf::from(value),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if !opts.root.is_absolute() {
        return Err("--root must be an absolute path".into());
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
    let opts = match parse(rest) {
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
    match cmd {
        "init" => init::run(rest),
        "serve" => match server::run(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("conductor-agent: serving on {} failed: {e}", opts.socket.display());
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_have_workspace_defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.socket, PathBuf::from("/run/conductor/agent.sock"));
        assert_eq!(o.root, PathBuf::from("/workspace"));
        let o = parse(&["--root".into(), "/srv".into(), "--socket".into(), "/tmp/s".into()]).unwrap();
        assert_eq!((o.root.to_str(), o.socket.to_str()), (Some("/srv"), Some("/tmp/s")));
        assert!(parse(&["--root".into()]).is_err());
        assert!(parse(&["--root".into(), "rel".into()]).is_err());
        assert!(parse(&["--bogus".into(), "x".into()]).is_err());
    }
}
