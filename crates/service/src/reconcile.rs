//! Bringing the store and the engine back in agreement after a crash or a host reboot, and
//! the cleanup policy (age, count).
//!
//! - rows left `creating` or `removing` are finished: their resources are removed and the
//!   row becomes `failed` or `removed`;
//! - containers and networks with this instance's label that no live row owns are removed;
//! - data volumes still mounted without a live workspace are unmounted (data kept);
//! - live rows whose container vanished become `lost` and their network and volume are freed;
//! - running rows whose container stopped (reboot) become `stopped`;
//! - agent socket directories of workspaces that hold no container are removed;
//! - first of all, interrupted snapshot operations are finished or undone
//!   ([`crate::snapshots`]).

use conductor_core::engine::ContainerStatus;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_store::WorkspaceFilter;
use serde::Serialize;

use std::path::Path;

use crate::volumes::{self, DataVolume};
use crate::{agent_client, host, now_ms, Conductor, Result};

/// What a reconcile pass did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileReport {
    pub finished: Vec<String>,
    pub orphans_removed: Vec<String>,
    pub networks_removed: Vec<String>,
    /// Data volumes that were mounted without a live workspace (unmounted; data kept).
    pub volumes_unmounted: Vec<String>,
    pub lost: Vec<String>,
    pub stopped: Vec<String>,
    /// Snapshots (`<workspace>/<name>`) whose creation or deletion was interrupted: removed.
    pub snapshots_discarded: Vec<String>,
    /// Restores (`<workspace>/<name>`) that were interrupted: finished.
    pub restores_finished: Vec<String>,
    /// Agent socket directories (`agents/<workspace-id>`) of workspaces that hold no
    /// container: removed.
    pub agent_dirs_removed: Vec<String>,
}

/// What a cleanup pass removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CleanupReport {
    pub expired: Vec<String>,
    pub over_count: Vec<String>,
}

impl Conductor {
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let repairs = self.reconcile_snapshots().await?;
        report.snapshots_discarded = repairs.discarded;
        report.restores_finished = repairs.restored;
        let rows = self.store.list_workspaces(&WorkspaceFilter::default())?;
        for w in rows
            .iter()
            .filter(|w| matches!(w.state, WorkspaceState::Creating | WorkspaceState::Removing))
        {
            let (keep, end) = if w.state == WorkspaceState::Removing {
                (None, WorkspaceState::Removed)
            } else {
                (Some(true), WorkspaceState::Failed)
            };
            self.release_resources(w, keep).await?;
            let note = (end == WorkspaceState::Failed).then_some("creation was interrupted by a restart of conductor");
            self.store.set_workspace_state(&w.id, end, note)?;
            report.finished.push(w.id.clone());
        }

        let rows = self.store.list_workspaces(&WorkspaceFilter::default())?;
        let live = |id: &str| rows.iter().any(|w| w.id == id && w.state.holds_container());
        let containers = self
            .engine
            .container_list(&[(naming::LABEL_INSTANCE, Some(self.instance.as_str()))])
            .await?;
        // Dependants before the containers whose network namespace they join: sidecars
        // (which join their workspace), then workspaces, then holders.
        let mut orphans: Vec<_> = containers
            .iter()
            .filter(|c| !c.labels.get(naming::LABEL_WORKSPACE).is_some_and(|id| live(id)))
            .collect();
        orphans.sort_by_key(|c| match c.labels.get(naming::LABEL_ROLE).map(String::as_str) {
            Some("service") => 0,
            Some("holder") => 2,
            _ => 1,
        });
        for c in orphans {
            self.engine.container_remove(&c.id).await?;
            report.orphans_removed.push(c.name.clone());
        }
        for n in self
            .engine
            .network_list(&[(naming::LABEL_INSTANCE, Some(self.instance.as_str()))])
            .await?
        {
            if !n.labels.get(naming::LABEL_WORKSPACE).is_some_and(|id| live(id)) {
                self.engine.network_remove(&n.name).await?;
                report.networks_removed.push(n.name);
            }
        }

        // A crash between making a workspace's agent directory and recording its container
        // leaves the directory behind.
        if let Ok(dirs) = std::fs::read_dir(self.paths.base.join("agents")) {
            for entry in dirs.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".server.tmp") {
                    let _ = std::fs::remove_file(entry.path());
                    continue;
                }
                // `<id>/` (the socket) and `<id>.server` (which process the agent is).
                let id = name.strip_suffix(".server").unwrap_or(&name).to_string();
                if !live(&id) && !report.agent_dirs_removed.contains(&id) {
                    agent_client::remove_dir(&self.paths, &id);
                    report.agent_dirs_removed.push(id);
                }
            }
        }

        let in_use: Vec<std::path::PathBuf> = rows
            .iter()
            .filter(|w| w.state.holds_container())
            .map(|w| DataVolume::at(Path::new(&w.volume_dir)).mountpoint())
            .map(|p| p.canonicalize().unwrap_or(p))
            .collect();
        for mnt in host::mounts_under(&self.paths.workspaces) {
            if mnt.file_name().is_some_and(|n| n == "mnt") && !in_use.contains(&mnt) {
                if let Some(dir) = mnt.parent() {
                    volumes::unmount(&DataVolume::at(dir)).await?;
                    report.volumes_unmounted.push(dir.display().to_string());
                }
            }
        }

        for w in rows
            .iter()
            .filter(|w| matches!(w.state, WorkspaceState::Running | WorkspaceState::Stopped))
        {
            let cid = w.container();
            match self.engine.container_inspect(cid).await? {
                None => {
                    self.release_resources(w, Some(true)).await?;
                    self.store
                        .set_workspace_state(&w.id, WorkspaceState::Lost, Some("its container disappeared"))?;
                    report.lost.push(w.id.clone());
                }
                Some(c) if w.state == WorkspaceState::Running && c.status != ContainerStatus::Running => {
                    self.store.set_workspace_state(&w.id, WorkspaceState::Stopped, None)?;
                    report.stopped.push(w.id.clone());
                }
                Some(_) => {}
            }
        }
        Ok(report)
    }

    /// Applies `max_age_hours` and `max_containers`: removes workspaces idle for too long,
    /// then the least recently used ones beyond the count. `busy` workspaces are skipped.
    pub async fn cleanup(&self, busy: &[String]) -> Result<CleanupReport> {
        let mut report = CleanupReport::default();
        let policy = &self.config.isolated_workspace.cleanup;
        let live = [WorkspaceState::Running, WorkspaceState::Stopped];
        let mut rows = self.store.list_workspaces(&WorkspaceFilter {
            states: live.to_vec(),
            ..Default::default()
        })?;
        rows.sort_by_key(|w| w.last_used_at);
        let now = now_ms();
        let max_age_ms = (policy.max_age_hours as i64).saturating_mul(3_600_000);
        let mut remaining = rows.len();
        for w in &rows {
            if busy.contains(&w.id) {
                continue;
            }
            let expired = policy.max_age_hours > 0 && now - w.last_used_at > max_age_ms;
            let over = remaining > policy.max_containers as usize;
            if expired || over {
                self.remove_workspace(&w.id, None).await?;
                remaining -= 1;
                if expired {
                    report.expired.push(w.id.clone());
                } else {
                    report.over_count.push(w.id.clone());
                }
            }
        }
        Ok(report)
    }
}
