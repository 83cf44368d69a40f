//! Bringing the store and the engine back in agreement after a crash or a host reboot, and
//! the cleanup policy (age, count).
//!
//! - rows left `creating` or `removing` are finished: their resources are removed and the
//!   row becomes `failed` or `removed` (an interrupted fork is such rows: every copy it had
//!   recorded goes, see [`crate::fork`]);
//! - containers and networks with this instance's label that no live row owns are removed;
//! - data volumes still mounted without a live workspace are unmounted (data kept);
//! - live rows whose container vanished become `lost` and their network and volume are freed;
//! - running rows whose container stopped (reboot) become `stopped`;
//! - agent socket and egress socket directories of workspaces that hold no container are
//!   removed;
//! - first of all, interrupted snapshot operations are finished or undone
//!   ([`crate::snapshots`]).

use conductor_core::engine::ContainerStatus;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_store::WorkspaceFilter;
use serde::Serialize;

use std::path::Path;

use crate::{now_ms, Conductor, Result};

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
    /// Images an interrupted commit left without a manifest: removed.
    pub images_repaired: Vec<String>,
    /// Agent socket directories (`agents/<workspace-id>`) of workspaces that hold no
    /// container: removed.
    pub agent_dirs_removed: Vec<String>,
    /// Egress socket directories (`egress/<workspace-id>`) of workspaces that hold no
    /// container: removed.
    pub egress_dirs_removed: Vec<String>,
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
        report.images_repaired = repairs.images_repaired;
        let rows = self.store.list_workspaces(&WorkspaceFilter::default())?;
        for w in rows
            .iter()
            .filter(|w| matches!(w.state, WorkspaceState::Creating | WorkspaceState::Removing))
        {
            // An interrupted create keeps a persistent volume (it may hold the agent's data
            // from before) and deletes one made for this workspace alone (a fork's copy, an
            // ephemeral volume): nothing could use it again.
            let (keep, end) = if w.state == WorkspaceState::Removing {
                (None, WorkspaceState::Removed)
            } else {
                (Some(self.is_persistent_volume(w)), WorkspaceState::Failed)
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
        for id in self.agents.known() {
            if !live(&id) && !report.agent_dirs_removed.contains(&id) {
                self.agents.remove(&id);
                report.agent_dirs_removed.push(id);
            }
        }
        if let Ok(dirs) = std::fs::read_dir(self.paths.base.join("egress")) {
            for entry in dirs.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if !live(&id) {
                    self.egress_detach(&id);
                    report.egress_dirs_removed.push(id);
                }
            }
        }

        let in_use: Vec<std::path::PathBuf> = rows
            .iter()
            .filter(|w| w.state.holds_container())
            .map(|w| Path::new(&w.volume_dir).to_path_buf())
            .map(|p| p.canonicalize().unwrap_or(p))
            .collect();
        for dir in self.volumes.attached_under(&self.paths.workspaces) {
            let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if !in_use.contains(&canonical) {
                self.volumes.detach(&self.volumes.open(&dir)).await?;
                report.volumes_unmounted.push(dir.display().to_string());
            }
        }

        for w in rows.iter().filter(|w| {
            matches!(
                w.state,
                WorkspaceState::Running | WorkspaceState::Paused | WorkspaceState::Suspended | WorkspaceState::Stopped
            )
        }) {
            let cid = w.container();
            let Some(c) = self.engine.container_inspect(cid).await? else {
                self.release_resources(w, Some(true)).await?;
                self.store
                    .set_workspace_state(&w.id, WorkspaceState::Lost, Some("its container disappeared"))?;
                report.lost.push(w.id.clone());
                continue;
            };
            // The row follows the container where a crash fell between the two (see
            // `pause.rs`); a paused workspace whose container stopped (a host reboot) is
            // suspended: its files are there, its processes are not.
            let next = match (w.state, c.status) {
                (WorkspaceState::Running, ContainerStatus::Paused) => Some(WorkspaceState::Paused),
                (WorkspaceState::Running, ContainerStatus::Running) => None,
                (WorkspaceState::Running, _) => Some(WorkspaceState::Stopped),
                (WorkspaceState::Paused | WorkspaceState::Suspended, ContainerStatus::Running) => {
                    Some(WorkspaceState::Running)
                }
                (WorkspaceState::Suspended, ContainerStatus::Paused) => Some(WorkspaceState::Paused),
                (WorkspaceState::Paused, ContainerStatus::Paused) => None,
                (WorkspaceState::Paused, _) => Some(WorkspaceState::Suspended),
                _ => None,
            };
            if let Some(next) = next {
                self.store.set_workspace_state(&w.id, next, None)?;
                if next == WorkspaceState::Stopped {
                    report.stopped.push(w.id.clone());
                }
            }
        }
        Ok(report)
    }

    /// Applies `max_age_hours` and `max_containers`: removes workspaces idle for too long,
    /// then the least recently used ones beyond the count. `busy` workspaces are skipped.
    pub async fn cleanup(&self, busy: &[String]) -> Result<CleanupReport> {
        let mut report = CleanupReport::default();
        let policy = &self.config.isolated_workspace.cleanup;
        let live = [
            WorkspaceState::Running,
            WorkspaceState::Paused,
            WorkspaceState::Suspended,
            WorkspaceState::Stopped,
        ];
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

/// Reconcile's decisions on the in-memory backend; `tests/workspaces.rs` proves them
/// against real Podman after a real crash.
#[cfg(test)]
mod tests {
    use conductor_core::engine::{ContainerStatus, NetworkSpec};
    use conductor_core::lifecycle::WorkspaceState;
    use conductor_core::naming;

    use crate::backend::memory::{env, MemoryEngine};
    use crate::workspaces::CreateRequest;

    fn create(agent: &str) -> CreateRequest {
        CreateRequest {
            agent_id: agent.into(),
            environment: "minimal".into(),
            ..Default::default()
        }
    }

    fn quiet() -> conductor_core::engine::ProgressSink {
        std::sync::Arc::new(|_| {})
    }

    #[tokio::test]
    async fn orphans_go_dependants_first_and_live_workspaces_stay() {
        let e = env("", MemoryEngine::default());
        let live = e.c.create_workspace(create("a1"), quiet()).await.unwrap();
        let spec = e.engine.containers()[0].spec.clone();
        // A crash left a workspace with no row, its sidecar, and its network.
        let mut orphan = spec.clone();
        orphan.name = "claude-agent-a2-orphan".into();
        orphan.labels.insert(naming::LABEL_WORKSPACE.into(), "ws-gone".into());
        let mut sidecar = orphan.clone();
        sidecar.name = "claude-agent-a2-orphan-postgres".into();
        sidecar.labels.insert(naming::LABEL_ROLE.into(), "service".into());
        e.engine.add_container(orphan, ContainerStatus::Running);
        e.engine.add_container(sidecar, ContainerStatus::Running);
        // Not this instance's: never touched.
        let mut foreign = spec.clone();
        foreign.name = "someone-else".into();
        foreign
            .labels
            .insert(naming::LABEL_INSTANCE.into(), "another-instance".into());
        e.engine.add_container(foreign, ContainerStatus::Running);
        e.engine
            .network_create_for_test(NetworkSpec {
                name: "claude-dev-net-ws-gone".into(),
                internal: false,
                dns: true,
                subnet: None,
                mtu: None,
                driver: "bridge".into(),
                labels: naming::workspace_labels(&e.c.instance, "ws-gone", "a2", "minimal"),
            })
            .await;

        let report = e.c.reconcile().await.unwrap();
        assert_eq!(
            report.orphans_removed,
            vec!["claude-agent-a2-orphan-postgres", "claude-agent-a2-orphan"],
            "the sidecar goes before the workspace whose namespace it joins"
        );
        assert_eq!(report.networks_removed, vec!["claude-dev-net-ws-gone"]);
        let names: Vec<String> = e.engine.containers().into_iter().map(|c| c.spec.name).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"someone-else".to_string()));
        assert_eq!(
            e.c.store.get_workspace(&live.id).unwrap().unwrap().state,
            WorkspaceState::Running
        );
    }

    #[tokio::test]
    async fn a_vanished_container_is_lost_and_a_stopped_one_is_stopped() {
        let e = env("", MemoryEngine::default());
        let gone = e.c.create_workspace(create("a1"), quiet()).await.unwrap();
        let halted = e.c.create_workspace(create("a2"), quiet()).await.unwrap();
        let row = |id: &str| e.c.store.get_workspace(id).unwrap().unwrap();
        e.engine.forget_container(row(&gone.id).container());
        e.engine
            .set_status(row(&halted.id).container(), ContainerStatus::Exited);

        let report = e.c.reconcile().await.unwrap();
        assert_eq!(report.lost, vec![gone.id.clone()]);
        assert_eq!(report.stopped, vec![halted.id.clone()]);
        assert_eq!(row(&gone.id).state, WorkspaceState::Lost);
        assert_eq!(row(&halted.id).state, WorkspaceState::Stopped);
        // A second pass finds nothing more to do.
        let again = e.c.reconcile().await.unwrap();
        assert!(again.lost.is_empty() && again.stopped.is_empty() && again.orphans_removed.is_empty());
    }

    #[tokio::test]
    async fn an_interrupted_create_ends_failed_and_an_interrupted_removal_ends_removed() {
        let e = env("", MemoryEngine::default());
        let creating = e.c.create_workspace(create("a1"), quiet()).await.unwrap();
        let removing = e.c.create_workspace(create("a2"), quiet()).await.unwrap();
        e.c.store
            .set_workspace_state(&creating.id, WorkspaceState::Creating, None)
            .unwrap();
        e.c.store
            .set_workspace_state(&removing.id, WorkspaceState::Removing, None)
            .unwrap();

        let report = e.c.reconcile().await.unwrap();
        assert_eq!(report.finished.len(), 2, "{report:?}");
        let row = |id: &str| e.c.store.get_workspace(id).unwrap().unwrap();
        assert_eq!(row(&creating.id).state, WorkspaceState::Failed);
        assert!(row(&creating.id).error.unwrap_or_default().contains("interrupted"));
        assert_eq!(row(&removing.id).state, WorkspaceState::Removed);
        assert!(e.engine.containers().is_empty(), "both containers are removed");
    }

    /// A crash between the row and the engine during pause, suspend or resume, and a host
    /// reboot under a paused workspace: the row follows the container.
    #[tokio::test]
    async fn paused_and_suspended_rows_follow_their_containers() {
        let e = env("", MemoryEngine::default());
        let row = |id: &str| e.c.store.get_workspace(id).unwrap().unwrap();
        let mk = |agent: &'static str| e.c.create_workspace(create(agent), quiet());
        let (rebooted, resumed, frozen, suspended) = (
            mk("p1").await.unwrap(),
            mk("p2").await.unwrap(),
            mk("p3").await.unwrap(),
            mk("p4").await.unwrap(),
        );
        let set = |id: &str, s: WorkspaceState| e.c.store.set_workspace_state(id, s, None).unwrap();
        // Paused, then the host rebooted: the container exited.
        set(&rebooted.id, WorkspaceState::Paused);
        e.engine
            .set_status(row(&rebooted.id).container(), ContainerStatus::Exited);
        // A resume that started the container but crashed before writing the row.
        set(&resumed.id, WorkspaceState::Suspended);
        // A pause whose row write was lost (the container is paused, the row says running).
        e.engine
            .set_status(row(&frozen.id).container(), ContainerStatus::Paused);
        // A suspended one that stays so.
        set(&suspended.id, WorkspaceState::Suspended);
        e.engine
            .set_status(row(&suspended.id).container(), ContainerStatus::Exited);

        let report = e.c.reconcile().await.unwrap();
        assert_eq!(row(&rebooted.id).state, WorkspaceState::Suspended);
        assert_eq!(row(&resumed.id).state, WorkspaceState::Running);
        assert_eq!(row(&frozen.id).state, WorkspaceState::Paused);
        assert_eq!(row(&suspended.id).state, WorkspaceState::Suspended);
        assert!(report.stopped.is_empty() && report.lost.is_empty(), "{report:?}");
        assert_eq!(e.engine.containers().len(), 4, "nothing removed");
    }
}
