//! The one way commands reach a workspace: its in-workspace agent when it answers, else the
//! engine's exec (Podman's here).
//!
//! A [`Channel`] is made once per [`WorkspaceHandle`](crate::handle::WorkspaceHandle), from
//! the workspace's container and agent socket, and every command of that piece of work (an
//! HTTP request, a task attempt) goes through it: exec with or without a shell session,
//! maintenance scripts, ending a session and killing a task's processes. Callers never
//! decide "agent or Podman" again; the file service asks [`Channel::agent`] for a
//! connection and takes its own Podman fallback when there is none.

use std::sync::Arc;

use conductor_core::engine::{Engine, OutputChunk};
use tokio::sync::mpsc;

use crate::agent_client::AgentConn;
use crate::backend::AgentTransport;
use crate::exec::{self, ExecOutcome, ExecPath, ExecRequest};
use crate::Result;

/// How commands reach one workspace's container.
#[derive(Clone)]
pub struct Channel {
    engine: Arc<dyn Engine>,
    agents: Arc<dyn AgentTransport>,
    container: String,
    workspace_id: String,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("container", &self.container)
            .field("workspace", &self.workspace_id)
            .finish()
    }
}

impl Channel {
    pub fn new(
        engine: Arc<dyn Engine>,
        agents: Arc<dyn AgentTransport>,
        container: impl Into<String>,
        workspace_id: impl Into<String>,
    ) -> Self {
        Channel {
            engine,
            agents,
            container: container.into(),
            workspace_id: workspace_id.into(),
        }
    }

    /// The container commands run in (its engine id, else its name).
    pub fn container(&self) -> &str {
        &self.container
    }

    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// A connection to the workspace's agent, when it answers; `None` means "use the engine".
    pub async fn agent(&self) -> Option<AgentConn> {
        match self.agents.connect(&self.workspace_id).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::debug!(container = %self.container, "the agent does not answer ({e}); using podman");
                None
            }
        }
    }

    /// Runs `req`, streaming its output: through the agent when it answers, else through the
    /// engine's exec. Same shell, environment, marker and outcome either way.
    pub async fn exec(&self, req: ExecRequest, output: mpsc::Sender<OutputChunk>) -> Result<(ExecOutcome, ExecPath)> {
        req.validate()?;
        match self.agent().await {
            Some(conn) => Ok((exec::run_agent(conn, req, output).await?, ExecPath::Agent)),
            None => Ok((
                exec::run_validated(self.engine(), &self.container, req, output).await?,
                ExecPath::Podman,
            )),
        }
    }

    /// Runs a maintenance script as the workspace user, discarding its output. With
    /// `end_session`, first ends that shell session in the agent (on the same connection).
    pub async fn run_quiet(&self, script: String, end_session: Option<&str>) -> Result<()> {
        let Some(mut conn) = self.agent().await else {
            return exec::run_quiet(self.engine(), &self.container, script).await;
        };
        if let Some(session) = end_session {
            if conn.has_sessions() {
                if let Err(error) = conn.end_session(session).await {
                    tracing::warn!(session, %error, "ending the shell session failed");
                }
            }
        }
        exec::run_quiet_through(conn, script).await
    }
}
