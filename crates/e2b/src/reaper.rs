//! Ends sandboxes whose lease has expired: every second, each expired lease's workspace is
//! removed (E2B's default) or paused (`autoPause`); a lease whose workspace is gone is
//! dropped. Runs in `conductor serve` while the E2B API is on.

use std::sync::Arc;
use std::time::Duration;

use conductor_core::lifecycle::WorkspaceState;
use conductor_service::{Conductor, ServiceError};
use conductor_store::OnTimeout;

use crate::E2b;

/// How often leases are checked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    pub killed: Vec<String>,
    pub paused: Vec<String>,
}

/// One pass over the expired leases.
pub async fn reap(e2b: &E2b) -> Result<Reaped, ServiceError> {
    let conductor: &Conductor = &e2b.conductor;
    let mut done = Reaped::default();
    for lease in conductor.store.expired_leases(conductor_service::now_ms())? {
        let id = lease.workspace_id.clone();
        let state = match conductor.get_workspace(&id) {
            Ok(w) => w.state,
            Err(ServiceError::NotFound { .. }) => {
                conductor.store.delete_lease(&id)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        match (lease.on_timeout, state) {
            (_, WorkspaceState::Removed | WorkspaceState::Failed | WorkspaceState::Lost) => {
                conductor.store.delete_lease(&id)?;
            }
            (OnTimeout::Pause, WorkspaceState::Running) => match conductor.pause_workspace(&id).await {
                Ok(_) => {
                    // A paused sandbox does not expire; connect or resume sets a new end.
                    conductor.store.set_lease_end(&id, i64::MAX)?;
                    done.paused.push(id);
                }
                Err(e) => tracing::warn!(workspace = %id, "pausing the expired sandbox failed: {e}"),
            },
            (OnTimeout::Pause, _) => conductor.store.set_lease_end(&id, i64::MAX)?,
            (OnTimeout::Kill, WorkspaceState::Creating | WorkspaceState::Removing) => {}
            (OnTimeout::Kill, _) => match conductor.remove_workspace(&id, Some(false)).await {
                Ok(_) => {
                    e2b.processes.forget_sandbox(&id);
                    e2b.watchers.forget_sandbox(&id);
                    done.killed.push(id);
                }
                Err(e) => tracing::warn!(workspace = %id, "removing the expired sandbox failed: {e}"),
            },
        }
    }
    Ok(done)
}

/// Runs [`reap`] every [`INTERVAL`] until the returned task is aborted.
pub fn spawn(e2b: Arc<E2b>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match reap(&e2b).await {
                Ok(r) => {
                    for id in &r.killed {
                        tracing::info!(workspace = %id, "sandbox timeout reached: removed");
                    }
                    for id in &r.paused {
                        tracing::info!(workspace = %id, "sandbox timeout reached: paused");
                    }
                }
                Err(e) => tracing::warn!("checking sandbox timeouts failed: {e}"),
            }
        }
    })
}
