//! A workspace looked up once for a piece of work.
//!
//! [`Conductor::handle`] reads the workspace's row once and returns a [`WorkspaceHandle`]:
//! the row, its typed limits, and the [`Channel`] its commands take. Exec, the orchestrator
//! (one handle per task attempt), files and snapshots take the handle instead of an id, so
//! a task's commands do not re-read and re-check the row, and the rule "the container's
//! engine id, else its name" is written once ([`WorkspaceRecord::container`]).

use conductor_core::engine::OutputChunk;
use conductor_core::resources::WorkspaceLimits;
use conductor_store::WorkspaceRecord;
use tokio::sync::mpsc;

use std::sync::Arc;

use crate::channel::Channel;
use crate::exec::{ExecOutcome, ExecRequest};
use crate::pause::InUse;
use crate::{Conductor, Result, ServiceError};

/// A workspace ready for work: its row (as read when the handle was made), its limits and
/// its channel.
#[derive(Debug, Clone)]
pub struct WorkspaceHandle {
    pub record: WorkspaceRecord,
    pub limits: WorkspaceLimits,
    pub channel: Channel,
    /// Set by [`Conductor::running`]: the request is in flight (the idle check leaves the
    /// workspace alone) until the last clone of the handle drops.
    pub in_use: Option<Arc<InUse>>,
}

impl WorkspaceHandle {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The container commands run in (its engine id, else its name).
    pub fn container(&self) -> &str {
        self.channel.container()
    }
}

impl Conductor {
    /// The workspace `id` (or its container name), in whatever state.
    pub fn handle(&self, id: &str) -> Result<WorkspaceHandle> {
        let record = match self.store.get_workspace(id)? {
            Some(r) => r,
            None => self
                .store
                .list_workspaces(&Default::default())?
                .into_iter()
                .rev()
                .find(|r| r.container_name == id)
                .ok_or_else(|| ServiceError::not_found(format!("workspace '{id}'")))?,
        };
        Ok(self.handle_of(record))
    }

    /// The handle of a row already read.
    pub fn handle_of(&self, record: WorkspaceRecord) -> WorkspaceHandle {
        let channel = Channel::new(self.engine.clone(), self.agents.clone(), record.container(), &record.id);
        WorkspaceHandle {
            limits: record.limits.clone(),
            channel,
            record,
            in_use: None,
        }
    }

    /// The workspace `id`, which must be running, with its use recorded (`last_used_at`,
    /// which idle cleanup reads) in the same statement. A paused or suspended one is resumed
    /// first (unless `auto_resume` is off); any other state is a 409 naming it. The handle
    /// marks the request in flight until it drops.
    pub async fn running(&self, id: &str, to: &str) -> Result<WorkspaceHandle> {
        let mut h = match self.store.use_workspace(id, crate::now_ms())? {
            Some(record) => self.handle_of(record),
            None => {
                let h = self.handle(id)?;
                self.store.touch_workspace(h.id(), crate::now_ms())?;
                h
            }
        };
        let in_use = Arc::new(self.pause.begin_use(h.id()));
        if !h.record.state.can_exec() {
            self.resume_for_use(&h.record, to).await?;
            h = self.handle(h.id())?;
            if !h.record.state.can_exec() {
                return Err(ServiceError::Conflict(format!(
                    "workspace '{}' is {}; it must be running to {to}",
                    h.record.id, h.record.state
                )));
            }
        }
        h.in_use = Some(in_use);
        Ok(h)
    }

    /// Runs a command in a workspace through its handle, streaming its output. A failure
    /// because the workspace's main process died is reported as such
    /// ([`ServiceError::WorkspaceExited`]).
    pub async fn exec_in(
        &self,
        h: &WorkspaceHandle,
        mut req: ExecRequest,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<ExecOutcome> {
        // The container's own value is its creator's (a warm-pool workspace keeps the pool's).
        req.internal_env
            .push(("CONDUCTOR_AGENT_ID".into(), h.record.agent_id.clone()));
        match h.channel.exec(req, output).await {
            Ok((outcome, _)) => Ok(outcome),
            Err(e @ ServiceError::Invalid { .. }) => Err(e),
            // The agent (PID 1) dying breaks the connection: say what happened instead.
            Err(e) => match self.await_fault(&h.record, std::time::Duration::from_secs(2)).await {
                Some(fault) => Err(ServiceError::WorkspaceExited(format!(
                    "workspace '{}' stopped during the command: {}",
                    h.record.id,
                    fault.reason()
                ))),
                None => Err(e),
            },
        }
    }
}
