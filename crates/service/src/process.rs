//! Long-lived processes in a workspace: started, then fed stdin, signalled and waited for
//! separately (the E2B-compatible API's process service drives these).
//!
//! [`Conductor::spawn_process`] starts a command through the workspace's agent on a
//! connection of its own, which stays open for the command's whole life whatever the caller
//! does in between: output goes to the returned channel, stdin (when asked for) comes from
//! the returned sender (dropping it is the end of stdin), and the outcome arrives on
//! `done`. The command carries the same exec marker as every command
//! ([`crate::exec`]), so [`Conductor::signal_process`] reaches its whole process tree.
//! Processes need the agent: there is no way to feed a Podman exec's stdin later.

use bytes::Bytes;
use conductor_core::engine::OutputChunk;
use tokio::sync::{mpsc, oneshot};

use crate::agent_client::StdinFeed;
use crate::exec::{command_argv, ExecRequest, MARKER};
use crate::handle::WorkspaceHandle;
use crate::{Conductor, Result, ServiceError};

/// A signal a caller may send to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessSignal {
    Term,
    Kill,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit code; for a process ended by a signal, 128 + the signal.
    pub code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Killed by its timeout.
    pub timed_out: bool,
}

/// A started process.
pub struct Spawned {
    /// Its pid in the workspace (also its process group).
    pub pid: u32,
    /// The value of its exec marker, for [`Conductor::signal_process`].
    pub marker: String,
    /// Its stdin, when asked for; dropping every clone closes it.
    pub stdin: Option<mpsc::Sender<Bytes>>,
    /// Its output, in order, as produced (the process slows down while this is full).
    pub output: mpsc::Receiver<OutputChunk>,
    /// Its end: the outcome, or why the connection to it broke.
    pub done: oneshot::Receiver<Result<ProcessExit>>,
}

/// Output chunks buffered between a process and its reader.
const OUTPUT_BUFFER: usize = 64;

impl Conductor {
    /// Starts `req` in the running workspace `id` (see the module docs). With `stdin`,
    /// the process reads what is sent on [`Spawned::stdin`].
    pub async fn spawn_process(&self, id: &str, req: ExecRequest, stdin: bool) -> Result<Spawned> {
        req.validate()?;
        if req.session.is_some() {
            return Err(ServiceError::invalid("session", "a process is not part of a session"));
        }
        let h = self.running(id, "start a process").await?;
        let Some(conn) = h.channel.agent().await else {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}': its agent does not answer, and processes need it",
                h.id()
            )));
        };
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let mut env: Vec<(String, String)> = req.env.into_iter().collect();
        env.extend(req.internal_env);
        env.push(("CONDUCTOR_AGENT_ID".into(), h.record.agent_id.clone()));
        env.push((MARKER.into(), marker.clone()));
        let agent_req = conductor_agent_protocol::ExecRequest {
            argv: Some(command_argv(req.command)),
            shell: None,
            session: None,
            cwd: req.cwd,
            env,
            stdin,
            timeout_ms: req.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            kill_marker: Some(format!("{MARKER}={marker}")),
        };
        let (stdin_tx, feed) = if stdin {
            let (tx, rx) = mpsc::channel(16);
            (Some(tx), StdinFeed::Stream(rx))
        } else {
            (None, StdinFeed::None)
        };
        let (out_tx, output) = mpsc::channel(OUTPUT_BUFFER);
        let (started_tx, started) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let workspace = h.id().to_string();
        tokio::spawn(async move {
            // The handle keeps the workspace in use (no idle pause) while the process runs.
            let _h: WorkspaceHandle = h;
            let result = conn
                .exec_with(agent_req, feed, Some(started_tx), out_tx)
                .await
                .map(|exit| ProcessExit {
                    code: exit.code,
                    signal: exit.signal,
                    timed_out: exit.timed_out,
                })
                .map_err(|e| ServiceError::host(format!("process in workspace '{workspace}'"), e));
            let _ = done_tx.send(result);
        });
        match started.await {
            Ok(pid) => Ok(Spawned {
                pid,
                marker,
                stdin: stdin_tx,
                output,
                done,
            }),
            // The exec ended before the agent reported a pid: its error says why.
            Err(_) => match done.await {
                Ok(Err(e)) => Err(e),
                _ => Err(ServiceError::host(
                    "start a process",
                    "the agent did not start the command",
                )),
            },
        }
    }

    /// Sends `signal` to every process of the workspace carrying the exec marker `marker`
    /// (the process a [`Spawned`] describes, and everything it started).
    pub async fn signal_process(&self, id: &str, marker: &str, signal: ProcessSignal) -> Result<()> {
        let h = self.running(id, "signal a process").await?;
        let script = match signal {
            ProcessSignal::Kill => crate::exec::kill_script(MARKER, marker),
            ProcessSignal::Term => signal_script(MARKER, marker, "TERM"),
        };
        h.channel.run_quiet(script, None).await
    }
}

/// Shell loop that sends `signal` once to every process whose environment holds
/// `var=value`.
fn signal_script(var: &str, value: &str, signal: &str) -> String {
    format!(
        "for p in /proc/[0-9]*; do \
         if tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx '{var}={value}'; then kill -{signal} ${{p#/proc/}} 2>/dev/null; fi; \
         done; true"
    )
}
