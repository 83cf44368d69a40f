//! Forks: N new workspaces from one workspace's state, at this instant or at one of its
//! snapshots.
//!
//! # What a fork is
//!
//! Each copy is a workspace of its own: its own id, container
//! (`claude-agent-<agent>-<short id>`), network namespace (and bridge in `egress` mode),
//! agent socket, egress socket (proxy mode), published host ports, limits and data volume
//! (an ext4 image of its own, hence its own quota). What it starts with is the source's:
//!
//! - the root file system changes, as an image: the capture commits the source once, and
//!   each copy runs on its own name for that image
//!   (`localhost/conductor-snapshots/<fork-id>:fork`), so removing a copy drops its name and
//!   the layer goes with the last one;
//! - `/workspace` and the named sub-volumes, as a reflink clone of the captured volume
//!   image on the storage pool ([`crate::storage_pool`]): no data is copied, and the copies
//!   share blocks with the source and each other until one side writes them;
//! - the container specification saved at the source's creation (`container.json`, see
//!   [`crate::snapshots`]) with the identity swapped ([`conductor_core::fork::derive_spec`]):
//!   the environment variables (and the request's `env` over them), extra hosts, read-only
//!   root, hardening; and the source's environment, network policy and secrets.
//!
//! A request may choose the copies' agent (`agent_id`), add or change variables (`env`)
//! and change the memory, CPU and process limits within the configured maxima. The volume
//! size is the source's (the copy is its file system). The count is bounded by
//! `isolated_workspace.fork.max_count` and by the room `cleanup.max_containers` leaves.
//!
//! # The capture
//!
//! Without `snapshot`, the state is captured once, exactly as a snapshot is taken
//! ([`Conductor::capture_parts`]): the source is paused (cgroup freezer) and its volume
//! frozen while the volume image is cloned and the root file system committed, then
//! resumed; the copies are made afterwards, while it runs. The pause is what the capture
//! takes (~150–200 ms: the commit is most of it) and does not grow with the count. The
//! capture is recorded as a hidden snapshot of the source (name `.fork-<id>`, never listed)
//! while the fork runs, and deleted at the end. With `snapshot`, the snapshot's image and
//! volume copy are used and the source is not touched. Either way the source's snapshot
//! lock is held throughout, so no snapshot, restore or removal of it interleaves.
//!
//! # All or nothing
//!
//! A fork makes all its copies or none. Every copy is recorded `creating` (in one
//! transaction) before anything is made; the copies are made concurrently; when all run,
//! they become `running` in one transaction (which fails if one of them was removed
//! meanwhile). If any copy fails, every copy is removed (container, network, volume, image
//! name, sockets) and recorded `failed` with the error, and the request fails with the
//! first error. After a crash (`kill -9` in the middle), reconcile finds the copies still
//! `creating` and removes them like any interrupted create, and discards the hidden
//! capture (resuming and thawing the source if the crash came during the pause): no
//! half-made fork survives a restart. We chose this over a per-copy result because a
//! caller asking for N copies (N parallel attempts at a task) has no use for fewer without
//! being told which, and partial results would leave it to clean up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conductor_core::config::NetworkMode;
use conductor_core::engine::{ContainerSpec, NetworkAttachment, ResourceLimits};
use conductor_core::fork::{check_count, check_room, derive_spec, ForkIdentity};
use conductor_core::lifecycle::{SnapshotState, WorkspaceState};
use conductor_core::resources::{LimitOverrides, WorkspaceLimits};
use conductor_core::{naming, validate};
use conductor_store::{SnapshotRecord, WorkspaceFilter, WorkspaceRecord};
use serde::Serialize;

use crate::snapshots::SNAPSHOT_REPOSITORY;
use crate::workspaces::{allocate_ports, WorkspaceInfo, LIVE_STATES};
use crate::{now_ms, Conductor, Result, ServiceError};

/// Name prefix of the hidden snapshot recording a fork's capture (a name no caller can
/// give: it does not start with a letter or digit).
const CAPTURE_PREFIX: &str = ".fork-";

/// What a caller may choose about a fork.
#[derive(Debug, Clone, Default)]
pub struct ForkRequest {
    /// How many copies (1 ..= `isolated_workspace.fork.max_count`).
    pub count: u32,
    /// Fork from this snapshot of the source instead of its state now.
    pub snapshot: Option<String>,
    /// The copies' agent; the source's when `None`.
    pub agent_id: Option<String>,
    /// Variables set over the source's (the create request's rules).
    pub env: BTreeMap<String, String>,
    /// Memory, CPU and process limits over the source's, within the configured maxima; a
    /// volume size, if given, must be the source's.
    pub limits: LimitOverrides,
}

/// The copies a fork made.
#[derive(Debug, Clone, Serialize)]
pub struct ForkOutcome {
    /// The workspace forked.
    pub source_id: String,
    /// The snapshot forked from, if one was named.
    pub snapshot: Option<String>,
    /// How long the source was paused for the capture (none when forking from a snapshot
    /// or a stopped workspace).
    pub paused_ms: Option<u64>,
    /// The whole fork, from the request to the last copy running.
    pub took_ms: u64,
    /// The new workspaces, running.
    pub workspaces: Vec<WorkspaceInfo>,
}

/// Where the copies' state comes from.
struct Origin {
    /// The image holding the root file system changes.
    image: String,
    /// The volume image copy.
    data: PathBuf,
    /// The hidden snapshot recording a capture, deleted at the end.
    capture: Option<SnapshotRecord>,
    paused: Option<Duration>,
}

/// One copy being made.
struct Copy {
    /// Its row as recorded, updated with what it got (container id, network).
    record: WorkspaceRecord,
    /// (container port, host port).
    ports: Vec<(u16, u16)>,
}

fn resource_limits(l: &WorkspaceLimits) -> ResourceLimits {
    ResourceLimits {
        memory_bytes: l.memory.bytes(),
        nano_cpus: l.cpu.nano_cpus(),
        pids: l.pids,
        nofile: l.nofile,
        nproc: l.nproc,
    }
}

impl Conductor {
    /// Forks `source` (its id or container name, or an agent id with a single live
    /// workspace) into `req.count` new running workspaces; see the module documentation.
    pub async fn fork_workspace(&self, source: &str, req: ForkRequest) -> Result<ForkOutcome> {
        let begin = Instant::now();
        check_count(req.count, self.config.isolated_workspace.fork.max_count)
            .map_err(|m| ServiceError::invalid("count", m))?;
        if let Some(a) = &req.agent_id {
            validate::agent_id(a).map_err(|m| ServiceError::invalid("agent_id", m))?;
        }
        if let Some(s) = &req.snapshot {
            validate::snapshot_name(s).map_err(|m| ServiceError::invalid("snapshot", m))?;
        }
        let w = self.snapshot_target(source)?;
        if !w.state.can_fork() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; only a running or stopped workspace can be forked",
                w.id, w.state
            )));
        }
        let vol = self.volumes.open(Path::new(&w.volume_dir));
        if !vol.limited {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' has no volume image (conductor makes one only when it runs as root), so it cannot be forked",
                w.id
            )));
        }
        let spec = self.load_container_spec(&w.id)?;
        for (k, v) in &req.env {
            validate::user_env(k, v).map_err(|m| ServiceError::invalid(format!("env.{k}"), m))?;
            if let Some(b) = w
                .secrets
                .iter()
                .find(|b| conductor_core::secrets::env_var(&b.name) == *k)
            {
                return Err(ServiceError::invalid(
                    format!("env.{k}"),
                    format!(
                        "is the placeholder variable of secret {:?}, which conductor sets",
                        b.name
                    ),
                ));
            }
        }
        let limits = w
            .limits
            .fork(&self.config, &req.limits)
            .map_err(|e| ServiceError::invalid(format!("limits.{}", e.field), e.message))?;
        if w.network_policy.mode == NetworkMode::Proxy && !self.agents.available(&self.config) {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is in proxy mode, which needs the in-workspace agent (isolated_workspace.agent_containers.agent_binary)",
                w.id
            )));
        }
        let live = self
            .store
            .list_workspaces(&WorkspaceFilter {
                states: LIVE_STATES.to_vec(),
                ..Default::default()
            })?
            .len();
        check_room(req.count, live, self.config.isolated_workspace.cleanup.max_containers)
            .map_err(ServiceError::Exhausted)?;
        let port_range = self
            .config
            .port_range()
            .map_err(|m| ServiceError::invalid("podman_config.container_port_range", m))?;

        let _lock = self.lock_now(&w.id)?;
        let named = match &req.snapshot {
            Some(name) => Some(
                self.store
                    .get_snapshot_by_name(&w.id, name)?
                    .filter(|s| s.state == SnapshotState::Complete)
                    .ok_or_else(|| {
                        ServiceError::invalid("snapshot", format!("workspace '{}' has no snapshot '{name}'", w.id))
                    })?,
            ),
            None => None,
        };

        // Intent first: every copy `creating`, in one transaction.
        let agent = req.agent_id.clone().unwrap_or_else(|| w.agent_id.clone());
        let container_ports: Vec<u16> = spec.published_ports.iter().map(|(c, _)| *c).collect();
        let mut next_port = port_range.0;
        let now = now_ms();
        let mut copies = Vec::new();
        for _ in 0..req.count {
            let id = format!("ws-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            // Chosen one after the other, so that no two copies pick the same free port.
            let ports = allocate_ports(&container_ports, (next_port, port_range.1))?;
            if let Some(last) = ports.iter().map(|(_, h)| *h).max() {
                next_port = last.saturating_add(1);
            }
            copies.push(Copy {
                record: WorkspaceRecord {
                    container_name: naming::workspace_container(&agent, &id),
                    volume_dir: self
                        .paths
                        .workspaces
                        .join(naming::agent_dir(&agent))
                        .join(&id)
                        .display()
                        .to_string(),
                    image: format!("{SNAPSHOT_REPOSITORY}/{id}:fork"),
                    id,
                    agent_id: agent.clone(),
                    environment: w.environment.clone(),
                    container_id: None,
                    network: None,
                    network_policy: w.network_policy.clone(),
                    state: WorkspaceState::Creating,
                    limits: limits.clone(),
                    created_at: now,
                    last_used_at: now,
                    error: None,
                    secrets: w.secrets.clone(),
                },
                ports,
            });
        }
        let rows: Vec<WorkspaceRecord> = copies.iter().map(|c| c.record.clone()).collect();
        self.store.insert_workspaces(&rows)?;
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        self.store.record_forks(&w.id, &ids)?;

        let origin = match named {
            Some(s) => match (&s.rootfs_image, &s.data_ref) {
                (Some(image), Some(data)) => Ok(Origin {
                    image: image.clone(),
                    data: PathBuf::from(data),
                    capture: None,
                    paused: None,
                }),
                _ => Err(ServiceError::host(
                    "fork from a snapshot",
                    "the snapshot names no image or copy",
                )),
            },
            None => self.capture_for_fork(&w, &vol).await,
        };
        let origin = match origin {
            Ok(o) => o,
            Err(e) => {
                self.discard_copies(&copies, &e).await;
                return Err(e);
            }
        };

        let sub_volumes: Vec<String> = self
            .catalog
            .get(&w.environment)
            .map(|e| e.volumes.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default();
        // One after the other: Podman 4.3 loses a name when two are added to one image at
        // once (seen as "image not found" when the copy's container is created).
        let mut tagged = Ok(());
        for c in &copies {
            tagged = self.engine.image_tag(&origin.image, &c.record.image).await;
            if tagged.is_err() {
                break;
            }
        }
        let tagged_at = begin.elapsed();
        let made: Vec<Result<()>> = match tagged {
            Ok(()) => {
                let make = futures_util::future::join_all(
                    copies
                        .iter_mut()
                        .map(|c| self.make_copy(c, &w, &spec, &req.env, &origin, &sub_volumes)),
                );
                // Every copy has its own name for the image now: the capture's goes meanwhile.
                let untag = async {
                    match &origin.capture {
                        Some(capture) => self.drop_capture_image(capture).await,
                        None => Ok(()),
                    }
                };
                let (made, untagged) = tokio::join!(make, untag);
                if let Err(e) = untagged {
                    tracing::warn!(source = %w.id, error = %e, "removing a fork's capture image failed; reconcile retries");
                }
                made
            }
            Err(e) => vec![Err(e.into())],
        };
        let made_at = begin.elapsed();
        let failure = made
            .into_iter()
            .zip(&copies)
            .filter_map(|(r, c)| r.err().map(|e| (c.record.id.clone(), e)))
            .next();
        let ids: Vec<String> = copies.iter().map(|c| c.record.id.clone()).collect();
        let result = match failure {
            Some((id, e)) => {
                tracing::warn!(source = %w.id, copy = %id, error = %e, "a fork's copy failed; removing all copies");
                Err(e)
            }
            None => match self.store.start_created_workspaces(&ids) {
                Ok(true) => Ok(()),
                Ok(false) => Err(ServiceError::Conflict(format!(
                    "a copy of workspace '{}' was removed while the fork made it; no copy was kept",
                    w.id
                ))),
                Err(e) => Err(e.into()),
            },
        };
        if let Err(e) = &result {
            self.discard_copies(&copies, e).await;
        }
        if let Some(capture) = &origin.capture {
            // Its image is gone already (unless tagging failed): the copy and the row remain.
            let mut rest = capture.clone();
            if result.is_ok() {
                rest.rootfs_image = None;
            }
            if let Err(e) = self.remove_snapshot(&rest, false).await {
                tracing::warn!(source = %w.id, error = %e, "removing a fork's capture failed; reconcile retries");
            }
        }
        result?;

        let paused_ms = origin.paused.map(|d| d.as_millis() as u64);
        let took_ms = begin.elapsed().as_millis() as u64;
        tracing::info!(
            source = %w.id, count = req.count, snapshot = ?req.snapshot, ?paused_ms,
            captured_and_tagged_ms = tagged_at.as_millis() as u64, copies_made_ms = made_at.as_millis() as u64, took_ms,
            "workspace forked"
        );
        Ok(ForkOutcome {
            source_id: w.id.clone(),
            snapshot: req.snapshot,
            paused_ms,
            took_ms,
            workspaces: ids.iter().map(|id| self.get_workspace(id)).collect::<Result<_>>()?,
        })
    }

    /// Captures the source as a hidden snapshot (recorded `creating` first, so that a
    /// crash during the pause is undone by reconcile).
    async fn capture_for_fork(&self, w: &WorkspaceRecord, vol: &crate::volumes::DataVolume) -> Result<Origin> {
        let id = format!("snap-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.snapshot_data_dir(&w.id);
        std::fs::create_dir_all(&dir).map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
        let record = SnapshotRecord {
            rootfs_image: Some(format!("{SNAPSHOT_REPOSITORY}/{}:fork-{}", w.id, &id[5..])),
            data_ref: Some(dir.join(format!("{id}.img")).display().to_string()),
            name: format!("{CAPTURE_PREFIX}{}", &id[5..]),
            id,
            workspace_id: w.id.clone(),
            state: SnapshotState::Creating,
            bytes: 0,
            created_at: now_ms(),
        };
        self.store.insert_snapshot(&record)?;
        let (image, data) = (
            record.rootfs_image.clone().unwrap_or_default(),
            PathBuf::from(record.data_ref.clone().unwrap_or_default()),
        );
        match self.capture_parts(w, vol, &image, &data, &record.name, false).await {
            Ok((method, paused)) => {
                tracing::info!(workspace = %w.id, copy = method.as_str(), paused_ms = paused.as_millis(), "captured for a fork");
                Ok(Origin {
                    image,
                    data,
                    capture: Some(record),
                    paused: Some(paused),
                })
            }
            Err(e) => {
                if let Err(cleanup) = self.remove_snapshot(&record, false).await {
                    tracing::warn!(workspace = %w.id, error = %cleanup, "removing a failed fork capture failed; reconcile retries");
                }
                Err(e)
            }
        }
    }

    /// Removes the capture's own name for the committed image (the copies keep theirs).
    async fn drop_capture_image(&self, capture: &SnapshotRecord) -> Result<()> {
        match &capture.rootfs_image {
            Some(image) => match self.engine.image_remove(image).await {
                Err(e) if !e.is_not_found() => Err(e.into()),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Makes one copy up to a started container (its row stays `creating`).
    async fn make_copy(
        &self,
        copy: &mut Copy,
        source: &WorkspaceRecord,
        source_spec: &ContainerSpec,
        user_env: &BTreeMap<String, String>,
        origin: &Origin,
        sub_volumes: &[String],
    ) -> Result<()> {
        let r = &mut copy.record;
        let dir = PathBuf::from(&r.volume_dir);
        let method = self.volumes.create_from(&dir, &origin.data).await?;
        tracing::debug!(workspace = %r.id, copy = method.as_str(), "fork volume");
        self.volumes
            .prepare(
                &dir,
                r.limits.volume_size.bytes(),
                self.config.storage.volume_inodes(),
                sub_volumes,
            )
            .await?;

        let mut labels = naming::workspace_labels(&self.instance, &r.id, &r.agent_id, &r.environment);
        let network = match r.network_policy.mode {
            NetworkMode::Isolated | NetworkMode::Proxy => NetworkAttachment::None,
            NetworkMode::Egress => {
                let name = naming::workspace_network(&self.config.podman_config.network.name, &r.id);
                self.create_network(&name, labels.clone()).await?;
                r.network = Some(name.clone());
                NetworkAttachment::Network(name)
            }
        };
        labels.insert(naming::LABEL_ROLE.into(), "workspace".into());
        labels.insert(naming::LABEL_FORK_OF.into(), source.id.clone());

        let mut env: Vec<(String, String)> = vec![
            ("CONDUCTOR_WORKSPACE_ID".into(), r.id.clone()),
            ("CONDUCTOR_AGENT_ID".into(), r.agent_id.clone()),
        ];
        env.extend(user_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut replace_mounts = Vec::new();
        // The copy runs the agent when its source did (the same mount targets).
        let agent = match self.agents.container_setup(&self.config, &r.id)? {
            Some((mounts, _))
                if mounts
                    .iter()
                    .all(|m| source_spec.mounts.iter().any(|s| s.target() == m.target())) =>
            {
                replace_mounts.extend(mounts);
                true
            }
            Some(_) => {
                self.agents.remove(&r.id);
                false
            }
            None => false,
        };
        if r.network_policy.mode == NetworkMode::Proxy {
            if !agent {
                return Err(ServiceError::Conflict(format!(
                    "workspace '{}' runs without the in-workspace agent, which proxy mode needs; it cannot be forked",
                    source.id
                )));
            }
            let egress = self.egress_container_setup(&r.id)?;
            replace_mounts.push(egress.mount);
            env.extend(egress.env);
            if !r.secrets.is_empty() {
                env.extend(
                    r.secrets
                        .iter()
                        .map(|b| (conductor_core::secrets::env_var(&b.name), b.placeholder.clone())),
                );
                env.extend(self.secrets_trust_setup(&r.id)?);
            }
            self.egress_attach(&r.id, &r.network_policy, &r.secrets)?;
        }
        let spec = derive_spec(
            source_spec,
            &ForkIdentity {
                name: r.container_name.clone(),
                image: r.image.clone(),
                labels,
                hostname: naming::short_id(&r.id).to_string(),
                env,
                rebase: vec![(PathBuf::from(&source.volume_dir), dir)],
                replace_mounts,
                network,
                published_ports: copy.ports.clone(),
                limits: resource_limits(&r.limits),
            },
        );
        let cid = self.engine.container_create(&spec).await?;
        r.container_id = Some(cid.clone());
        self.engine.container_start(&cid).await?;
        if let Some(net) = &r.network {
            self.confine_bridge(&cid, net).await?;
        }
        if agent && !self.agents.wait_ready(&r.id).await {
            tracing::warn!(workspace = %r.id, "the workspace agent does not answer; exec uses podman");
        }
        self.save_container_spec(&r.id, &spec)?;
        self.store.set_workspace_container(&r.id, &cid, r.network.as_deref())?;
        Ok(())
    }

    /// Removes every copy of a failed fork and records it `failed` with `error`; a copy
    /// whose removal fails stays `creating`, for reconcile to finish.
    async fn discard_copies(&self, copies: &[Copy], error: &ServiceError) {
        let note = format!("the fork failed: {error}");
        let removed =
            futures_util::future::join_all(copies.iter().map(|c| self.release_resources(&c.record, Some(false)))).await;
        for (c, r) in copies.iter().zip(removed) {
            let recorded = match r {
                Ok(()) => self
                    .store
                    .set_workspace_state(&c.record.id, WorkspaceState::Failed, Some(&note)),
                Err(e) => {
                    tracing::warn!(workspace = %c.record.id, error = %e, "removing a failed fork's copy failed; reconcile retries");
                    Ok(())
                }
            };
            if let Err(e) = recorded {
                tracing::warn!(workspace = %c.record.id, error = %e, "recording a failed fork's copy failed");
            }
        }
    }
}
