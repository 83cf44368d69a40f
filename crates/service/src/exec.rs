//! Running shell commands in a workspace.
//!
//! A command runs through the container's shell (`bash` when present, else `sh`), so `cd`,
//! pipes, quoting and `&&` behave as in a terminal. Each exec carries a unique marker in its
//! environment (`CONDUCTOR_EXEC_ID`); on timeout or cancel conductor kills every process in
//! the container whose environment holds that marker, which reaches the whole process tree
//! (children, grandchildren, even ones that called `setsid`), not just the client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conductor_core::engine::{Engine, ExecSpec, OutputChunk};
use conductor_core::validate;
use tokio::sync::mpsc;

use crate::{Result, ServiceError};

/// The user commands run as.
pub const WORKSPACE_USER: &str = "1000:1000";
/// Exit code reported for a command killed by its timeout (as `timeout(1)` does).
pub const TIMEOUT_EXIT_CODE: i64 = 124;
const MARKER: &str = "CONDUCTOR_EXEC_ID";

/// A shell command to run in a workspace.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<Bytes>,
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    pub fn new(command: impl Into<String>) -> Self {
        ExecRequest {
            command: command.into(),
            ..Default::default()
        }
    }

    /// Validates every field that reaches the engine; errors name the field.
    pub fn validate(&self) -> Result<()> {
        validate::command(&self.command).map_err(|m| ServiceError::invalid("command", m))?;
        if let Some(cwd) = &self.cwd {
            validate::container_path(cwd).map_err(|m| ServiceError::invalid("cwd", m))?;
        }
        for (k, v) in &self.env {
            validate::env_name(k).map_err(|m| ServiceError::invalid(format!("env.{k}"), m))?;
            validate::env_value(k, v).map_err(|m| ServiceError::invalid(format!("env.{k}"), m))?;
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ServiceError::invalid("timeout", "must be at least 1 second"));
        }
        Ok(())
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExecOutcome {
    pub exit_code: i64,
    pub timed_out: bool,
    pub duration_ms: u64,
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

/// Kills every process of the container carrying `marker` in its environment, repeating
/// until none is left (a process may fork while the first pass runs).
pub async fn kill_marked(engine: &dyn Engine, container: &str, marker: &str) -> Result<()> {
    let script = format!(
        "for round in 1 2 3 4 5; do found=0; for p in /proc/[0-9]*; do \
         if tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx '{MARKER}={marker}'; then kill -9 ${{p#/proc/}} 2>/dev/null; found=1; fi; \
         done; [ $found = 0 ] && break; sleep 0.05; done"
    );
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script],
        user: Some(WORKSPACE_USER.into()),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(8);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    engine.exec(container, spec, tx).await?;
    let _ = drain.await;
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
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let mut env: Vec<(String, String)> = req.env.into_iter().collect();
    env.push((MARKER.into(), marker.clone()));
    let spec = ExecSpec {
        argv: shell_argv(&req.command),
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
                    kill_marked(engine, container, &marker).await?;
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
