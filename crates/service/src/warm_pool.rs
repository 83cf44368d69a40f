//! Warm pools: started, idle workspaces waiting per environment, so that a new workspace
//! costs a database update instead of a container start.
//!
//! (`pool.rs` is the storage pool of the snapshots; this is the pool of workspaces.)
//!
//! `isolated_workspace.warm_pool: {minimal: 2}` keeps two idle `minimal` workspaces. They are
//! ordinary ephemeral workspaces owned by the reserved agent [`POOL_AGENT`], made with the
//! configured defaults (limits, network policy, read-only root) and nothing else, so they
//! count against `max_containers` and show in `ws ls`.
//!
//! **Claiming.** [`Conductor::create_workspace`] first asks [`Conductor::warm_pool_first`]:
//! a request that a pool workspace satisfies exactly (`ephemeral`, an environment with a pool,
//! no custom limits, network, environment variables, ports, extra hosts, read-only root, and
//! no labels but a task's) takes the oldest live pool workspace of its environment: a
//! compare-and-set in the database gives it to the caller's agent under the name
//! `claude-agent-<agent>-<short id>`, and the container is renamed to match (Podman keeps id,
//! state and processes). Sandbox-mode tasks without sidecar services get their workspace
//! this way, and so does `conductor run`. What cannot change after creation:
//!
//! - labels (Podman's are immutable): `io.conductor.agent` stays `warm-pool` and the
//!   container carries `io.conductor.origin=warm-pool`, not the task label. The database is
//!   the truth about the owner; every command still gets `CONDUCTOR_AGENT_ID` set to the
//!   real agent;
//! - the volume stays under `isolated/agent_warm-pool/<workspace-id>/` (it is mounted) and is
//!   deleted with the workspace like any ephemeral volume.
//!
//! The saved container specification (used by snapshot restore) is updated to the new name,
//! agent label and variable.
//!
//! **Refilling.** The orchestrator runs [`keep_filled`] next to its workers (so
//! `conductor serve` does): every [`POLL`] it removes pool workspaces that died (their agent,
//! or else their container, does not answer) or are older than `cleanup.max_age_hours`, and
//! creates missing ones, one at a time, while fewer than `max_containers` workspaces exist.
//! A create that needs room when `max_containers` is reached removes an idle pool workspace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conductor_core::engine::{ContainerStatus, Progress, ProgressSink};
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::naming;
use conductor_store::{WorkspaceFilter, WorkspaceRecord};
use tokio::sync::watch;

use crate::agent_client;
use crate::workspaces::{CreateRequest, WorkspaceInfo};
use crate::{now_ms, Conductor, Result, ServiceError};

/// The agent that owns unclaimed pool workspaces (reserved: callers cannot use it).
pub const POOL_AGENT: &str = "warm-pool";
/// Label of containers made for the pool; it stays after a claim.
pub const LABEL_ORIGIN: &str = "io.conductor.origin";
const ORIGIN_POOL: &str = "warm-pool";
/// How often the pool is looked at.
pub const POLL: Duration = Duration::from_millis(250);
/// How often pool workspaces are checked for life.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);
/// After a failed create, how long an environment's pool waits before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

const LIVE: [WorkspaceState; 6] = WorkspaceState::LIVE;

/// What one pass over the pool did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefillReport {
    pub created: Vec<String>,
    /// Pool workspaces removed because they died or aged.
    pub replaced: Vec<String>,
    /// Environments whose refill failed, with the reason.
    pub failed: Vec<(String, String)>,
}

impl Conductor {
    fn pool_members(&self, environment: Option<&str>, states: Vec<WorkspaceState>) -> Result<Vec<WorkspaceRecord>> {
        Ok(self.store.list_workspaces(&WorkspaceFilter {
            agent_id: Some(POOL_AGENT.into()),
            environment: environment.map(str::to_string),
            states,
        })?)
    }

    /// Whether a pool workspace is alive: its agent answers, or (without an agent) its
    /// container runs.
    async fn pool_member_alive(&self, w: &WorkspaceRecord) -> bool {
        if self.agents.connect(&w.id).await.is_ok() {
            return true;
        }
        if agent_client::binary(&self.config).is_some() {
            return false;
        }
        let container = w.container();
        matches!(
            self.engine.container_inspect(container).await,
            Ok(Some(c)) if c.status == ContainerStatus::Running
        )
    }

    /// Whether a workspace was made for the pool (claimed or not): its volume lives in the
    /// pool's directory.
    pub(crate) fn born_in_warm_pool(&self, w: &WorkspaceRecord) -> bool {
        std::path::Path::new(&w.volume_dir).starts_with(self.paths.workspaces.join(naming::agent_dir(POOL_AGENT)))
    }

    /// Whether a pool workspace is exactly what `req` asks for.
    fn fits_pool(&self, req: &CreateRequest) -> bool {
        req.ephemeral
            && self
                .config
                .isolated_workspace
                .warm_pool
                .get(&req.environment)
                .is_some_and(|n| *n > 0)
            && req.limits == Default::default()
            && req.network.is_none()
            && !req.readonly_rootfs
            && req.env.is_empty()
            && req.ports.is_empty()
            && req.extra_hosts.is_empty()
            && req.secrets.is_empty()
            && req.labels.keys().all(|k| k == naming::LABEL_TASK)
    }

    /// Called first by `create_workspace`: hands out a pool workspace when one fits `req`,
    /// and otherwise makes room at `max_containers` by removing an idle pool workspace.
    /// Refuses the reserved agent id to callers other than the pool itself.
    pub(crate) async fn warm_pool_first(&self, req: &CreateRequest) -> Result<Option<WorkspaceInfo>> {
        let from_pool = req.labels.get(LABEL_ORIGIN).map(String::as_str) == Some(ORIGIN_POOL);
        if req.agent_id == POOL_AGENT || from_pool {
            return if req.agent_id == POOL_AGENT && from_pool {
                Ok(None)
            } else {
                Err(ServiceError::invalid(
                    "agent_id",
                    format!("{POOL_AGENT:?} is reserved for the warm pool"),
                ))
            };
        }
        if self.fits_pool(req) {
            if let Some(w) = self.claim_warm(req).await? {
                return Ok(Some(w));
            }
        }
        let live = self.store.list_workspaces(&WorkspaceFilter {
            states: LIVE.to_vec(),
            ..Default::default()
        })?;
        let max = self.config.isolated_workspace.cleanup.max_containers as usize;
        if live.len() >= max {
            if let Some(idle) = live
                .iter()
                .find(|w| w.agent_id == POOL_AGENT && w.state == WorkspaceState::Running)
            {
                tracing::info!(workspace = %idle.id, "max_containers reached: removing an idle warm-pool workspace");
                self.remove_workspace(&idle.id, Some(false)).await?;
            }
        }
        Ok(None)
    }

    /// Gives the oldest live pool workspace of the request's environment to its agent.
    async fn claim_warm(&self, req: &CreateRequest) -> Result<Option<WorkspaceInfo>> {
        for m in self.pool_members(Some(&req.environment), vec![WorkspaceState::Running])? {
            if !self.pool_member_alive(&m).await {
                continue; // the refill replaces it
            }
            let name = naming::workspace_container(&req.agent_id, &m.id);
            if !self
                .store
                .reassign_workspace(&m.id, POOL_AGENT, &req.agent_id, &name, now_ms())?
            {
                continue; // claimed by someone else meanwhile
            }
            let container = m.container();
            if let Err(e) = self.engine.container_rename(container, &name).await {
                // The workspace works under its old name; only `podman ps` shows it.
                tracing::warn!(workspace = %m.id, "renaming the claimed warm-pool container failed: {e}");
            }
            if let Err(e) = self.record_claim_in_spec(&m.id, &name, &req.agent_id) {
                tracing::warn!(workspace = %m.id, "updating the saved container spec failed: {e}");
            }
            tracing::debug!(workspace = %m.id, agent = %req.agent_id, "claimed from the warm pool");
            return self.get_workspace(&m.id).map(Some);
        }
        Ok(None)
    }

    /// Keeps the saved container specification (what a snapshot restore re-creates) in line
    /// with the claim: the new name, agent label and `CONDUCTOR_AGENT_ID`.
    fn record_claim_in_spec(&self, id: &str, name: &str, agent: &str) -> Result<()> {
        let mut spec = self.load_container_spec(id)?;
        spec.name = name.to_string();
        spec.labels.insert(naming::LABEL_AGENT.into(), agent.to_string());
        for (k, v) in spec.env.iter_mut() {
            if k == "CONDUCTOR_AGENT_ID" {
                *v = agent.to_string();
            }
        }
        self.save_container_spec(id, &spec)
    }

    /// One pass over the warm pool: removes dead (when `check_liveness`) and aged members,
    /// then creates the missing ones while `max_containers` allows.
    pub async fn refill_warm_pool(&self, check_liveness: bool) -> Result<RefillReport> {
        self.refill_warm_pool_except(check_liveness, &Default::default()).await
    }

    async fn refill_warm_pool_except(
        &self,
        check_liveness: bool,
        skip: &BTreeMap<String, Instant>,
    ) -> Result<RefillReport> {
        let mut report = RefillReport::default();
        let max_age_ms = i64::try_from(self.config.isolated_workspace.cleanup.max_age_hours)
            .unwrap_or(i64::MAX / 3_600_000)
            .saturating_mul(3_600_000);
        for m in self.pool_members(None, LIVE.to_vec())? {
            let aged = max_age_ms > 0 && now_ms() - m.created_at > max_age_ms;
            let dead = match m.state {
                WorkspaceState::Running => check_liveness && !self.pool_member_alive(&m).await,
                // Not ready for a claim (someone stopped, paused or suspended it).
                WorkspaceState::Stopped | WorkspaceState::Paused | WorkspaceState::Suspended => true,
                _ => false,
            };
            if aged || dead {
                tracing::info!(workspace = %m.id, aged, dead, "replacing a warm-pool workspace");
                self.remove_workspace(&m.id, Some(false)).await?;
                report.replaced.push(m.id);
            }
        }
        let max = self.config.isolated_workspace.cleanup.max_containers as usize;
        for (env, want) in &self.config.isolated_workspace.warm_pool {
            if skip.contains_key(env) {
                continue;
            }
            loop {
                let have = self
                    .pool_members(Some(env), vec![WorkspaceState::Creating, WorkspaceState::Running])?
                    .len();
                let live = self
                    .store
                    .list_workspaces(&WorkspaceFilter {
                        states: LIVE.to_vec(),
                        ..Default::default()
                    })?
                    .len();
                if have >= *want as usize || live >= max {
                    break;
                }
                let req = CreateRequest {
                    agent_id: POOL_AGENT.into(),
                    environment: env.clone(),
                    ephemeral: true,
                    labels: [(LABEL_ORIGIN.to_string(), ORIGIN_POOL.to_string())].into(),
                    ..Default::default()
                };
                let quiet: ProgressSink = Arc::new(|_: Progress| {});
                match self.create_workspace(req, quiet).await {
                    Ok(w) => report.created.push(w.id),
                    Err(e) => {
                        report.failed.push((env.clone(), e.to_string()));
                        break;
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Keeps the warm pool filled until `stop` turns true. Runs beside the orchestrator's
/// workers; returns at once when no pool is configured.
pub async fn keep_filled(c: Arc<Conductor>, mut stop: watch::Receiver<bool>) {
    if c.config.isolated_workspace.warm_pool.values().all(|n| *n == 0) {
        return;
    }
    let mut last_liveness = Instant::now();
    let mut paused: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let check = last_liveness.elapsed() >= LIVENESS_EVERY;
        if check {
            last_liveness = Instant::now();
        }
        paused.retain(|_, until| *until > Instant::now());
        match c.refill_warm_pool_except(check, &paused).await {
            Ok(r) => {
                for (env, why) in r.failed {
                    tracing::warn!("warm pool of {env}: cannot create a workspace: {why}");
                    paused.insert(env, Instant::now() + RETRY_AFTER);
                }
            }
            Err(e) => tracing::warn!("warm pool: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => {}
        }
    }
}
