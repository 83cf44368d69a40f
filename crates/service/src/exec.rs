//! Running commands in a workspace.
//!
//! A command line runs through the container's shell (`bash` when present, else `sh`), so
//! `cd`, pipes, quoting and `&&` behave as in a terminal; an argv is executed directly. Each exec carries a unique marker in its
//! environment (`CONDUCTOR_EXEC_ID`); on timeout or cancel conductor kills every process in
//! the container whose environment holds that marker, which reaches the whole process tree
//! (children, grandchildren, even ones that called `setsid`), not just the client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conductor_agent_protocol::valid_session_id;
pub use conductor_core::command::Command;
use conductor_core::engine::{Engine, ExecSpec, OutputChunk};
use conductor_core::task::{command_script, state_dir};
use conductor_core::validate;
use tokio::sync::mpsc;

use crate::agent_client::AgentConn;
use crate::{Result, ServiceError};

/// The user commands run as.
pub const WORKSPACE_USER: &str = "1000:1000";
/// Exit code reported for a command killed by its timeout (as `timeout(1)` does).
pub const TIMEOUT_EXIT_CODE: i64 = 124;
pub(crate) const MARKER: &str = "CONDUCTOR_EXEC_ID";

/// A command to run in a workspace.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// A shell command line, or an argv executed without a shell.
    pub command: Command,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<Bytes>,
    pub timeout: Option<Duration>,
    /// Variables conductor itself sets (e.g. a task marker); not subject to the reserved
    /// `CONDUCTOR_` prefix check. Never filled from caller input.
    pub internal_env: Vec<(String, String)>,
    /// Runs the command as the next step of this shell session (a task's: its id). Through
    /// an agent that keeps sessions, that is one long-lived shell: `cd`, variables,
    /// functions and aliases carry over, `env`/`cwd` count when the session starts. Else
    /// (Podman exec, an older agent) each command gets a fresh shell wrapped in
    /// [`command_script`], which carries over the working directory and the exported
    /// variables through a state directory. No `stdin` with a session.
    pub session: Option<String>,
}

impl ExecRequest {
    pub fn new(command: impl Into<Command>) -> Self {
        ExecRequest {
            command: command.into(),
            ..Default::default()
        }
    }

    /// Validates every field that reaches the engine; errors name the field.
    pub fn validate(&self) -> Result<()> {
        self.command
            .validate("command")
            .map_err(|(field, m)| ServiceError::invalid(field, m))?;
        if let Some(cwd) = &self.cwd {
            validate::container_path(cwd).map_err(|m| ServiceError::invalid("cwd", m))?;
        }
        for (k, v) in &self.env {
            validate::user_env(k, v).map_err(|m| ServiceError::invalid(format!("env.{k}"), m))?;
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ServiceError::invalid("timeout", "must be at least 1 second"));
        }
        if let Some(session) = &self.session {
            valid_session_id(session).map_err(|m| ServiceError::invalid("session", m))?;
            if self.stdin.is_some() {
                return Err(ServiceError::invalid("stdin", "commands of a session read no stdin"));
            }
            if self.command.as_shell().is_none() {
                return Err(ServiceError::invalid(
                    "command",
                    "commands of a session are shell command lines",
                ));
            }
        }
        Ok(())
    }

    /// The same request for a fresh shell per command: a session becomes the state-file
    /// wrapper of [`command_script`].
    fn emulating_session(mut self) -> Self {
        if let Some(session) = self.session.take() {
            if let Command::Shell(line) = &self.command {
                self.command = Command::Shell(command_script(&state_dir(&session), line));
            }
        }
        self
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExecOutcome {
    pub exit_code: i64,
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// The argv that runs `command`: a command line through the container's shell, an argv as
/// it is.
pub fn command_argv(command: Command) -> Vec<String> {
    match command {
        Command::Shell(line) => shell_argv(&line),
        Command::Argv(argv) => argv,
    }
}

/// The argv that runs `command` through the container's shell.
pub fn shell_argv(command: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        r#"if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; else exec sh -c "$1"; fi"#.into(),
        "sh".into(),
        command.into(),
    ]
}

/// Shell loop that kills every process of the container whose environment holds
/// `var=value`, repeating while new ones appear (a process may fork during a pass).
pub fn kill_script(var: &str, value: &str) -> String {
    format!(
        "for round in 1 2 3 4 5; do found=0; for p in /proc/[0-9]*; do \
         if tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx '{var}={value}'; then kill -9 ${{p#/proc/}} 2>/dev/null; found=1; fi; \
         done; [ $found = 0 ] && break; sleep 0.05; done"
    )
}

/// Runs a maintenance script as the workspace user, discarding its output.
pub async fn run_quiet(engine: &dyn Engine, container: &str, script: String) -> Result<()> {
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script],
        user: Some(WORKSPACE_USER.into()),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(8);
    let drain = async move { while rx.recv().await.is_some() {} };
    let (code, ()) = tokio::join!(engine.exec(container, spec, tx), drain);
    code?;
    Ok(())
}

/// Runs a maintenance script through a connected agent, discarding its output.
pub(crate) async fn run_quiet_through(conn: AgentConn, script: String) -> Result<()> {
    let req = conductor_agent_protocol::ExecRequest {
        argv: Some(vec!["/bin/sh".into(), "-c".into(), script]),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(8);
    let drain = async move { while rx.recv().await.is_some() {} };
    let (exit, ()) = tokio::join!(conn.exec(req, None, tx), drain);
    exit?;
    Ok(())
}

/// Runs `req` in `container`, streaming output into `output`.
pub async fn run(
    engine: &dyn Engine,
    container: &str,
    req: ExecRequest,
    output: mpsc::Sender<OutputChunk>,
) -> Result<ExecOutcome> {
    req.validate()?;
    run_validated(engine, container, req, output).await
}

/// [`run`] of a request already validated.
pub(crate) async fn run_validated(
    engine: &dyn Engine,
    container: &str,
    req: ExecRequest,
    output: mpsc::Sender<OutputChunk>,
) -> Result<ExecOutcome> {
    let req = req.emulating_session();
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let mut env: Vec<(String, String)> = req.env.into_iter().collect();
    env.extend(req.internal_env);
    env.push((MARKER.into(), marker.clone()));
    let spec = ExecSpec {
        argv: command_argv(req.command),
        user: Some(WORKSPACE_USER.into()),
        workdir: req.cwd,
        env,
        stdin: req.stdin,
    };
    let start = Instant::now();
    let fut = engine.exec(container, spec, output);
    let (exit_code, timed_out) = match req.timeout {
        None => (fut.await?, false),
        Some(limit) => {
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => (r?, false),
                _ = tokio::time::sleep(limit) => {
                    run_quiet(engine, container, kill_script(MARKER, &marker)).await?;
                    // The exec ends once its processes are gone; don't wait forever on it.
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut fut).await;
                    (TIMEOUT_EXIT_CODE, true)
                }
            }
        }
    };
    Ok(ExecOutcome {
        exit_code,
        timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

/// Which way commands reach a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecPath {
    /// The in-workspace agent over its Unix socket (a few ms).
    Agent,
    /// Podman's exec API (tens of ms).
    Podman,
}

/// Runs `req` through a connected agent; the agent enforces the timeout and kills the
/// process group and the marked processes. With a session, the command line goes to the
/// session's shell (the agent starts it with the first command's environment and marker).
pub(crate) async fn run_agent(
    conn: AgentConn,
    req: ExecRequest,
    output: mpsc::Sender<OutputChunk>,
) -> Result<ExecOutcome> {
    let req = if conn.has_sessions() {
        req
    } else {
        req.emulating_session()
    };
    let start = Instant::now();
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let mut env: Vec<(String, String)> = req.env.into_iter().collect();
    env.extend(req.internal_env);
    env.push((MARKER.into(), marker.clone()));
    let (argv, shell) = match (&req.session, req.command) {
        (Some(_), Command::Shell(line)) => (None, Some(line)),
        (_, command) => (Some(command_argv(command)), None),
    };
    let agent_req = conductor_agent_protocol::ExecRequest {
        argv,
        shell,
        session: req.session,
        cwd: req.cwd,
        env,
        stdin: req.stdin.is_some(),
        timeout_ms: req.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        kill_marker: Some(format!("{MARKER}={marker}")),
    };
    let exit = conn.exec(agent_req, req.stdin, output).await?;
    Ok(ExecOutcome {
        exit_code: if exit.timed_out {
            TIMEOUT_EXIT_CODE
        } else {
            i64::from(exit.code)
        },
        timed_out: exit.timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_checked_and_emulated_without_an_agent() {
        let mut r = ExecRequest::new("cd /tmp");
        r.session = Some("3f2a9c1e-77b0-4b0e-9d43-0a1b2c3d4e5f".into());
        r.validate().unwrap();
        // Podman exec (or an agent without sessions): the state-file wrapper.
        let fresh = r.clone().emulating_session();
        assert_eq!(fresh.session, None);
        assert_eq!(
            fresh.command,
            Command::Shell(command_script(
                &state_dir("3f2a9c1e-77b0-4b0e-9d43-0a1b2c3d4e5f"),
                "cd /tmp"
            ))
        );
        let plain = ExecRequest::new("true").emulating_session();
        assert_eq!(plain.command, Command::from("true"));

        for bad in ["", "a/b", "x'y"] {
            r.session = Some(bad.into());
            assert!(
                matches!(r.validate(), Err(ServiceError::Invalid { ref field, .. }) if field == "session"),
                "{bad:?}"
            );
        }
        r.session = Some("t1".into());
        r.stdin = Some(Bytes::from_static(b"x"));
        assert!(r.validate().is_err(), "no stdin in a session");
        r.stdin = None;
        r.command = Command::Argv(vec!["ls".into()]);
        assert!(
            matches!(r.validate(), Err(ServiceError::Invalid { ref field, .. }) if field == "command"),
            "no argv in a session"
        );
    }

    #[test]
    fn an_argv_runs_without_a_shell() {
        let argv = vec!["printf".to_string(), "%s".into(), "a b".into()];
        assert_eq!(command_argv(Command::Argv(argv.clone())), argv);
        assert_eq!(command_argv(Command::from("ls")), shell_argv("ls"));
        let r = ExecRequest::new(Command::Argv(vec!["ls".into(), "x y".into()]));
        r.validate().unwrap();
        let bad = ExecRequest::new(Command::Argv(vec!["ls".into(), "a\0b".into()]));
        assert!(matches!(bad.validate(), Err(ServiceError::Invalid { ref field, .. }) if field == "command[1]"));
        let empty = ExecRequest::new(Command::Argv(vec![]));
        assert!(matches!(empty.validate(), Err(ServiceError::Invalid { ref field, .. }) if field == "command"));
    }
}
