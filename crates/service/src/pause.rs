//! Pause, suspend and resume, and the idle check that does them on its own.
//!
//! - **Pause** freezes every process of the workspace (its container and the sidecars in its
//!   network namespace, through the cgroup freezer): no CPU, memory kept, connections held.
//!   Resume thaws them where they were.
//! - **Suspend** stops the container to free its memory. Files are kept: the data volume and
//!   the container's root file system changes (installed packages, `/tmp`, `/home`).
//!   Processes are not: a suspended workspace comes back as after a reboot, its agent ready
//!   for the next command. It survives a conductor restart and a host reboot (reconcile and
//!   resume mount its volume again).
//! - **Auto-resume**: exec, the file API and tasks on a paused or suspended workspace resume
//!   it first ([`Conductor::running`]), unless `isolated_workspace.auto_resume` is off (then
//!   a 409 names the state). A workspace a user *stopped* stays stopped.
//! - **Idle**: with `cleanup.idle_pause_after` / `cleanup.idle_suspend_after`, `conductor
//!   serve` checks every [`idle_check_interval`]. A workspace is idle when no request or task
//!   used it for that long and its processes used less than
//!   [`conductor_core::lifecycle::IDLE_CPU_PERCENT`] of a CPU since the previous check (a busy
//!   reading counts as use). Requests in flight (a long exec, a file download) count as use
//!   until they end. The decision is the pure [`conductor_core::lifecycle::idle_action`].
//!
//! # Crash safety
//! The row changes before the engine acts for pause and suspend (so the liveness watch
//! never takes a suspended container for a dead one), after it for resume. Reconcile makes
//! the row follow the container when a crash fell in between: a running container makes the
//! row `running`, a paused one `paused`, a `paused` row whose container stopped (a host
//! reboot) `suspended`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conductor_core::config::NetworkMode;
use conductor_core::engine::ContainerStatus;
use conductor_core::lifecycle::{idle_action, IdleAction, IdleFacts, WorkspaceState};
use conductor_core::naming;
use conductor_store::{WorkspaceFilter, WorkspaceRecord};

use crate::workspaces::WorkspaceInfo;
use crate::{now_ms, Conductor, Result, ServiceError};

/// Grace the workspace's processes get to exit when it is suspended (its agent ends them).
const SUSPEND_GRACE_SECS: u32 = 2;

/// In-memory state of pause and resume: transitions serialised per workspace, requests in
/// flight, and the last CPU reading of each workspace.
#[derive(Default)]
pub(crate) struct PauseRuntime {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    cpu: Mutex<HashMap<String, (u64, Instant)>>,
}

impl PauseRuntime {
    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn in_flight(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|n| *n > 0)
    }

    /// Marks a request in flight on `id` until the guard drops.
    pub(crate) fn begin_use(&self, id: &str) -> InUse {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default() += 1;
        InUse {
            map: self.in_flight.clone(),
            id: id.to_string(),
        }
    }
}

/// A request in flight on a workspace (the idle check leaves it alone).
#[derive(Debug)]
pub struct InUse {
    map: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// What one idle check did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdleReport {
    pub paused: Vec<String>,
    pub suspended: Vec<String>,
    /// Idle long enough but skipped: a process in it used CPU.
    pub busy: Vec<String>,
}

/// How often `conductor serve` runs the idle check: a quarter of the shorter delay, between
/// 1 s and 30 s. `None` when both delays are off.
pub fn idle_check_interval(pause_after: Option<u64>, suspend_after: Option<u64>) -> Option<Duration> {
    let shortest = [pause_after, suspend_after].into_iter().flatten().min()?;
    Some(Duration::from_millis((shortest * 250).clamp(1000, 30_000)))
}

impl Conductor {
    fn conflict(w: &WorkspaceRecord, what: &str) -> ServiceError {
        ServiceError::Conflict(format!("workspace '{}' is {}; {what}", w.id, w.state))
    }

    /// The workspace's containers that carry its processes: the workspace's own and the
    /// sidecars in its network namespace.
    async fn members(&self, w: &WorkspaceRecord) -> Result<Vec<String>> {
        let mut ids = vec![w.container().to_string()];
        for c in self
            .engine
            .container_list(&[
                (naming::LABEL_WORKSPACE, Some(w.id.as_str())),
                (naming::LABEL_ROLE, Some("service")),
            ])
            .await?
        {
            ids.push(c.id);
        }
        Ok(ids)
    }

    /// Freezes every process of a running workspace.
    pub async fn pause_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        let w = self.record_of(id)?;
        let lock = self.pause.lock_of(&w.id);
        let _turn = lock.lock().await;
        let w = self.record_of(&w.id)?;
        if !w.state.can_pause() {
            return Err(Self::conflict(&w, "only a running workspace can be paused"));
        }
        self.store.set_workspace_state(&w.id, WorkspaceState::Paused, None)?;
        if let Err(e) = self.freeze(&w).await {
            self.store.set_workspace_state(&w.id, WorkspaceState::Running, None)?;
            return Err(e);
        }
        self.get_workspace(&w.id)
    }

    async fn freeze(&self, w: &WorkspaceRecord) -> Result<()> {
        let members = self.members(w).await?;
        for (i, c) in members.iter().enumerate() {
            if let Err(e) = self.engine.container_pause(c).await {
                for done in &members[..i] {
                    let _ = self.engine.container_unpause(done).await;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Stops a running or paused workspace's container to free its memory; its files stay.
    /// Refused while a task runs in it (its processes would die under the task).
    pub async fn suspend_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        let w = self.record_of(id)?;
        let lock = self.pause.lock_of(&w.id);
        let _turn = lock.lock().await;
        let w = self.record_of(&w.id)?;
        if !w.state.can_suspend() {
            return Err(Self::conflict(
                &w,
                "only a running or paused workspace can be suspended",
            ));
        }
        if let Some(t) = self
            .store
            .running_tasks()?
            .into_iter()
            .find(|t| t.workspace_id.as_deref() == Some(w.id.as_str()))
        {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' runs task {}; suspending it would kill the task's processes",
                w.id, t.id
            )));
        }
        self.suspend(&w).await?;
        self.get_workspace(&w.id)
    }

    async fn suspend(&self, w: &WorkspaceRecord) -> Result<()> {
        let was = w.state;
        self.store.set_workspace_state(&w.id, WorkspaceState::Suspended, None)?;
        let result = async {
            let members = self.members(w).await?;
            if was == WorkspaceState::Paused {
                // A frozen process cannot take the stop signal.
                for c in &members {
                    self.engine.container_unpause(c).await?;
                }
            }
            // Sidecars joined the workspace's namespace: they stop first.
            for c in members.iter().rev() {
                self.engine.container_stop(c, SUSPEND_GRACE_SECS).await?;
            }
            Ok::<_, ServiceError>(())
        }
        .await;
        if let Err(e) = result {
            // Whatever it is now, the row says what the engine says.
            let state = match self.engine.container_inspect(w.container()).await {
                Ok(Some(c)) if c.status == ContainerStatus::Running => WorkspaceState::Running,
                Ok(Some(c)) if c.status == ContainerStatus::Paused => WorkspaceState::Paused,
                _ => WorkspaceState::Suspended,
            };
            self.store.set_workspace_state(&w.id, state, None)?;
            return Err(e);
        }
        self.pause.cpu.lock().unwrap_or_else(|e| e.into_inner()).remove(&w.id);
        self.egress_detach(&w.id);
        Ok(())
    }

    /// Brings a paused, suspended or stopped workspace back to running.
    pub async fn resume_workspace(&self, id: &str) -> Result<WorkspaceInfo> {
        let w = self.record_of(id)?;
        if w.state == WorkspaceState::Running {
            return Ok(w.into());
        }
        if !w.state.can_resume() {
            return Err(Self::conflict(
                &w,
                "only a paused, suspended or stopped workspace can be resumed",
            ));
        }
        self.resume(&w.id).await?;
        self.get_workspace(&w.id)
    }

    /// Resumes `id` (serialised with other transitions of it); a no-op when it runs.
    async fn resume(&self, id: &str) -> Result<()> {
        let lock = self.pause.lock_of(id);
        let _turn = lock.lock().await;
        let w = self.record_of(id)?;
        match w.state {
            WorkspaceState::Running => Ok(()),
            WorkspaceState::Paused => {
                for c in self.members(&w).await? {
                    self.engine.container_unpause(&c).await?;
                }
                self.store.set_workspace_state(&w.id, WorkspaceState::Running, None)?;
                self.store.touch_workspace(&w.id, now_ms())?;
                Ok(())
            }
            WorkspaceState::Suspended | WorkspaceState::Stopped => {
                self.boot(&w).await?;
                self.store.touch_workspace(&w.id, now_ms())?;
                Ok(())
            }
            _ => Err(Self::conflict(
                &w,
                "only a paused, suspended or stopped workspace can be resumed",
            )),
        }
    }

    /// Starts a halted workspace's container again: its volume mounted (a host reboot
    /// unmounts it), its egress proxy and firewall back, its agent awaited.
    pub(crate) async fn boot(&self, w: &WorkspaceRecord) -> Result<()> {
        self.mount_volume(w).await?;
        if w.network_policy.mode == NetworkMode::Proxy {
            self.egress_attach(&w.id, &w.network_policy, &w.secrets)?;
        }
        let container = w.container().to_string();
        self.engine.container_start(&container).await?;
        self.await_agent(&w.id).await;
        if let Some(net) = &w.network {
            // Rules live in the network namespace, which a restart makes anew.
            self.confine_bridge(&container, net).await?;
        }
        self.store.set_workspace_state(&w.id, WorkspaceState::Running, None)?;
        Ok(())
    }

    /// Mounts the workspace's data volume (with its environment's sub-volumes) unless it is
    /// mounted: before its container starts again.
    pub(crate) async fn mount_volume(&self, w: &WorkspaceRecord) -> Result<()> {
        let sub_volumes: Vec<String> = self
            .catalog
            .get(&w.environment)
            .map(|e| e.volumes.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default();
        self.volumes
            .prepare(
                std::path::Path::new(&w.volume_dir),
                w.limits.volume_size.bytes(),
                self.config.storage.volume_inodes(),
                &sub_volumes,
            )
            .await?;
        Ok(())
    }

    /// Before work on a workspace that is not running: resumes it when it was paused or
    /// suspended and `auto_resume` is on; else the 409 naming its state.
    pub(crate) async fn resume_for_use(&self, w: &WorkspaceRecord, to: &str) -> Result<()> {
        if w.state.resumes_on_use() && self.config.isolated_workspace.auto_resume {
            tracing::debug!(workspace = %w.id, state = %w.state, "resuming for {to}");
            return self.resume(&w.id).await;
        }
        let hint = if w.state.can_resume() { " (resume it first)" } else { "" };
        Err(ServiceError::Conflict(format!(
            "workspace '{}' is {}; it must be running to {to}{hint}",
            w.id, w.state
        )))
    }

    fn record_of(&self, id: &str) -> Result<WorkspaceRecord> {
        Ok(self.handle(id)?.record)
    }

    /// One pass of the idle policy over the running and paused workspaces (what `conductor
    /// serve` runs every [`idle_check_interval`]). Warm-pool members are left alone.
    pub async fn idle_check(&self) -> Result<IdleReport> {
        let policy = &self.config.isolated_workspace.cleanup;
        let mut report = IdleReport::default();
        if policy.idle_pause_after.is_none() && policy.idle_suspend_after.is_none() {
            return Ok(report);
        }
        let busy = self.busy_workspaces()?;
        let rows = self.store.list_workspaces(&WorkspaceFilter {
            states: vec![WorkspaceState::Running, WorkspaceState::Paused],
            ..Default::default()
        })?;
        for w in rows.into_iter().filter(|w| w.agent_id != crate::warm_pool::POOL_AGENT) {
            let cpu_percent = if w.state == WorkspaceState::Running {
                self.cpu_since_last_check(&w).await
            } else {
                None
            };
            let mut facts = IdleFacts {
                state: w.state,
                idle_secs: (now_ms() - w.last_used_at).max(0) as u64 / 1000,
                in_use: busy.contains(&w.id) || self.pause.in_flight(&w.id),
                cpu_percent,
            };
            if cpu_percent.is_some_and(|c| c >= conductor_core::lifecycle::IDLE_CPU_PERCENT) {
                // A working background job is use: the idle time starts again when it stops.
                let threshold = [policy.idle_pause_after, policy.idle_suspend_after]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(u64::MAX);
                if facts.idle_secs >= threshold {
                    report.busy.push(w.id.clone());
                }
                self.store.touch_workspace(&w.id, now_ms())?;
                facts.idle_secs = 0;
            }
            let Some(action) = idle_action(&facts, policy.idle_pause_after, policy.idle_suspend_after) else {
                continue;
            };
            let outcome = match action {
                IdleAction::Pause => self.idle_pause(&w).await,
                IdleAction::Suspend => self.idle_suspend(&w).await,
            };
            match outcome {
                Ok(true) if action == IdleAction::Pause => report.paused.push(w.id.clone()),
                Ok(true) => report.suspended.push(w.id.clone()),
                Ok(false) => {}
                Err(e) => tracing::warn!(workspace = %w.id, "idle {action:?} failed: {e}"),
            }
        }
        Ok(report)
    }

    /// The workspace's CPU use (percent of one CPU) since the previous reading, which this
    /// one replaces; `None` on the first reading or when it cannot be read.
    async fn cpu_since_last_check(&self, w: &WorkspaceRecord) -> Option<f64> {
        let ns = self.engine.container_cpu_ns(w.container()).await.ok()?;
        let now = Instant::now();
        let prev = self
            .pause
            .cpu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.id.clone(), (ns, now));
        let (prev_ns, at) = prev?;
        let wall = now.duration_since(at).as_nanos() as f64;
        (wall > 0.0).then(|| ns.saturating_sub(prev_ns) as f64 / wall * 100.0)
    }

    /// Pauses an idle workspace unless a request or task began meanwhile.
    async fn idle_pause(&self, w: &WorkspaceRecord) -> Result<bool> {
        let lock = self.pause.lock_of(&w.id);
        let _turn = lock.lock().await;
        let now = self.record_of(&w.id)?;
        if now.state != WorkspaceState::Running || now.last_used_at != w.last_used_at || self.pause.in_flight(&w.id) {
            return Ok(false);
        }
        self.store.set_workspace_state(&w.id, WorkspaceState::Paused, None)?;
        if let Err(e) = self.freeze(&now).await {
            self.store.set_workspace_state(&w.id, WorkspaceState::Running, None)?;
            return Err(e);
        }
        Ok(true)
    }

    async fn idle_suspend(&self, w: &WorkspaceRecord) -> Result<bool> {
        let lock = self.pause.lock_of(&w.id);
        let _turn = lock.lock().await;
        let now = self.record_of(&w.id)?;
        if !now.state.can_suspend() || now.last_used_at != w.last_used_at || self.pause.in_flight(&w.id) {
            return Ok(false);
        }
        if self.busy_workspaces()?.contains(&w.id) {
            return Ok(false);
        }
        self.suspend(&now).await?;
        Ok(true)
    }
}

/// Runs the idle check in `conductor serve` until the task is aborted; `None` when both
/// idle delays are off.
pub fn spawn_idle_check(conductor: Arc<Conductor>) -> Option<tokio::task::JoinHandle<()>> {
    let policy = &conductor.config.isolated_workspace.cleanup;
    let every = idle_check_interval(policy.idle_pause_after, policy.idle_suspend_after)?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match conductor.idle_check().await {
                Ok(r) if !r.paused.is_empty() || !r.suspended.is_empty() => {
                    tracing::info!("idle: paused {:?}, suspended {:?}", r.paused, r.suspended)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("idle check failed: {e}"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_runs_often_enough_for_the_shorter_delay() {
        assert_eq!(idle_check_interval(None, None), None);
        assert_eq!(idle_check_interval(Some(2), None), Some(Duration::from_secs(1)));
        assert_eq!(idle_check_interval(Some(60), Some(3600)), Some(Duration::from_secs(15)));
        assert_eq!(idle_check_interval(None, Some(86_400)), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_request_in_flight_counts_until_it_ends() {
        let rt = PauseRuntime::default();
        let a = rt.begin_use("w1");
        let b = rt.begin_use("w1");
        assert!(rt.in_flight("w1") && !rt.in_flight("w2"));
        drop(a);
        assert!(rt.in_flight("w1"));
        drop(b);
        assert!(!rt.in_flight("w1"));
    }
}
