//! Noticing a workspace whose container stopped behind conductor's back.
//!
//! Two faults are told apart (see docs/workspaces.md, "When a workspace's container dies"):
//! - **Its main process died** (the agent, PID 1, killed or crashed): the container has
//!   exited. The workspace becomes `stopped`, its `error` says how the process exited, and a
//!   request that was running in it fails with `workspace_exited` (409). `start` brings it
//!   back with its files.
//! - **Its monitor died** (Podman's `conmon`): the container's processes run on, but Podman
//!   records neither their exit nor their output any more and may fail to stop them. Such a
//!   workspace is not trusted: conductor removes its container (the data volume is kept), the
//!   workspace becomes `lost` with the reason, and a task running in it fails with that
//!   reason instead of reporting the command's result as a success.
//!
//! The checks run where a fault matters (an exec or task that failed or ended, a
//! `GET /workspaces/{id}`, a listing) and every [`WATCH_INTERVAL`] in `conductor serve`.

use std::sync::Arc;
use std::time::Duration;

use conductor_core::engine::{ContainerInfo, ContainerStatus};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_store::{WorkspaceFilter, WorkspaceRecord};

use crate::{Conductor, Result};

/// How often `conductor serve` checks every running workspace's container.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(10);

/// What a check of a running workspace's container found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The container exited: the workspace is now `stopped`.
    Exited(String),
    /// The engine no longer supervises the container: the workspace is now `lost`.
    Unsupervised(String),
}

impl Fault {
    pub fn reason(&self) -> &str {
        match self {
            Fault::Exited(r) | Fault::Unsupervised(r) => r,
        }
    }
}

/// How a container's end reads for a person: "exited with status 3", "was killed by
/// signal 9 (SIGKILL)", "was killed for using more memory than its limit".
pub fn describe_exit(code: Option<i64>, oom_killed: bool) -> String {
    if oom_killed {
        return "was killed for using more memory than its limit (OOM)".into();
    }
    match code {
        Some(code) if code > 128 && code < 128 + 65 => {
            let signal = code - 128;
            let name = match signal {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            format!("was killed by signal {signal}{name} (exit status {code})")
        }
        Some(code) => format!("exited with status {code}"),
        None => "exited".into(),
    }
}

/// The fault of a workspace whose recorded state is `running`, given its container as the
/// engine reports it (`None`: the container is gone). Pure.
pub fn fault_of(container: Option<&ContainerInfo>) -> Option<Fault> {
    let c = container?;
    match c.status {
        ContainerStatus::Running | ContainerStatus::Paused if c.supervised == Some(false) => Some(Fault::Unsupervised(
            "its container monitor (conmon) died: Podman no longer supervises the container, so conductor removed it \
             (the workspace's data volume is kept)"
                .into(),
        )),
        ContainerStatus::Running | ContainerStatus::Paused | ContainerStatus::Created => None,
        ContainerStatus::Exited | ContainerStatus::Other => Some(Fault::Exited(format!(
            "its main process (PID 1, the workspace agent) {}",
            describe_exit(c.exit_code, c.oom_killed)
        ))),
    }
}

impl Conductor {
    /// Checks the container of `w` (a `running` workspace) and records a fault: `stopped`
    /// when it exited, `lost` (container removed, data kept) when it is unsupervised.
    /// Returns the fault; `None` when the container is fine, when it is gone (reconcile's
    /// business), or when the row moved on meanwhile (a stop, a restore).
    pub async fn check_container(&self, w: &WorkspaceRecord) -> Result<Option<Fault>> {
        let (WorkspaceState::Running, Some(cid)) = (w.state, w.container_id.as_deref()) else {
            return Ok(None);
        };
        let info = self.engine.container_inspect(cid).await?;
        let Some(fault) = fault_of(info.as_ref()) else {
            return Ok(None);
        };
        match &fault {
            Fault::Exited(reason) => {
                if !self.store.mark_container_exited(&w.id, cid, reason)? {
                    return Ok(None);
                }
                tracing::warn!(workspace = %w.id, "the workspace stopped: {reason}");
            }
            Fault::Unsupervised(reason) => {
                tracing::warn!(workspace = %w.id, "retiring the workspace: {reason}");
                self.release_resources(w, Some(true)).await?;
                self.store
                    .set_workspace_state(&w.id, WorkspaceState::Lost, Some(reason))?;
            }
        }
        Ok(Some(fault))
    }

    /// Like [`Self::check_container`], looking again until `patience` ends: a container
    /// whose main process was just killed still counts as running for a moment.
    pub async fn await_fault(&self, w: &WorkspaceRecord, patience: Duration) -> Option<Fault> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.check_container(w).await {
                Ok(Some(fault)) => return Some(fault),
                Ok(None) if tokio::time::Instant::now() < deadline => {}
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(workspace = %w.id, "checking the container failed: {e}");
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Brings `running` workspaces whose container exited in line (one engine call, then
    /// one inspect per exited container): what listings call first.
    pub async fn refresh_states(&self) -> Result<()> {
        let rows = self.store.list_workspaces(&WorkspaceFilter {
            states: vec![WorkspaceState::Running],
            ..Default::default()
        })?;
        if rows.is_empty() {
            return Ok(());
        }
        let containers = self
            .engine
            .container_list(&[(naming::LABEL_INSTANCE, Some(self.instance.as_str()))])
            .await?;
        for w in &rows {
            let exited = containers.iter().any(|c| {
                Some(c.id.as_str()) == w.container_id.as_deref()
                    && matches!(c.status, ContainerStatus::Exited | ContainerStatus::Other)
            });
            if exited {
                self.check_container(w).await?;
            }
        }
        Ok(())
    }

    /// Checks every running workspace's container, monitor included.
    pub async fn check_all_containers(&self) -> Result<Vec<(String, Fault)>> {
        let rows = self.store.list_workspaces(&WorkspaceFilter {
            states: vec![WorkspaceState::Running],
            ..Default::default()
        })?;
        let mut faults = Vec::new();
        for w in &rows {
            if let Some(f) = self.check_container(w).await? {
                faults.push((w.id.clone(), f));
            }
        }
        Ok(faults)
    }
}

/// Runs [`Conductor::check_all_containers`] and [`Conductor::adopt_egress`] every
/// [`WATCH_INTERVAL`] (the first time at once) until aborted.
pub fn spawn_watch(conductor: Arc<Conductor>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = conductor.check_all_containers().await {
                tracing::debug!("checking the workspaces' containers failed: {e}");
            }
            // Proxy-mode workspaces another process (a CLI command) made: serve their proxy.
            match conductor.adopt_egress().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("serving the egress proxy of {n} more workspace(s)"),
                Err(e) => tracing::warn!("serving the egress proxy of running workspaces failed: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(status: ContainerStatus, exit_code: Option<i64>, supervised: Option<bool>) -> ContainerInfo {
        ContainerInfo {
            id: "c".into(),
            name: "n".into(),
            image: "i".into(),
            status,
            pid: None,
            exit_code,
            oom_killed: false,
            labels: Default::default(),
            supervised,
        }
    }

    #[test]
    fn exits_read_as_a_person_would_say_them() {
        assert_eq!(describe_exit(Some(3), false), "exited with status 3");
        assert_eq!(
            describe_exit(Some(137), false),
            "was killed by signal 9 (SIGKILL) (exit status 137)"
        );
        assert!(describe_exit(Some(137), true).contains("memory"));
        assert_eq!(describe_exit(None, false), "exited");
    }

    #[test]
    fn faults_of_a_running_workspace() {
        assert_eq!(fault_of(None), None, "a vanished container is reconcile's");
        assert_eq!(
            fault_of(Some(&container(ContainerStatus::Running, None, Some(true)))),
            None
        );
        assert_eq!(fault_of(Some(&container(ContainerStatus::Running, None, None))), None);
        assert_eq!(
            fault_of(Some(&container(ContainerStatus::Paused, None, Some(true)))),
            None
        );
        let exited = fault_of(Some(&container(ContainerStatus::Exited, Some(137), None))).unwrap();
        assert!(
            matches!(&exited, Fault::Exited(r) if r.contains("signal 9")),
            "{exited:?}"
        );
        let lost = fault_of(Some(&container(ContainerStatus::Running, None, Some(false)))).unwrap();
        assert!(
            matches!(&lost, Fault::Unsupervised(r) if r.contains("conmon")),
            "{lost:?}"
        );
    }
}
