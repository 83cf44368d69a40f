//! Snapshots of a workspace: its whole state at one instant, and restoring it.
//!
//! # What a snapshot holds
//!
//! A `podman commit` alone would miss the mounted volumes, so a snapshot has two parts,
//! taken together:
//!
//! - the container's root file system changes (installed packages, `/home`, `/tmp`,
//!   anything outside the volumes), committed as the image
//!   `localhost/conductor-snapshots/<workspace-id>:<name>-<n>`. Podman stores only the diff
//!   layer over the workspace's image, so it grows with what changed outside the volumes;
//! - a copy of the data volume image (`/workspace` and the named sub-volumes, see
//!   [`crate::volumes`]) at `<workspaces>/.snapshots/<workspace-id>/<snapshot-id>.img`. On
//!   the storage pool ([`crate::storage_pool`]) it is a reflink clone: ~50 ms and no space at first,
//!   then only the blocks either side rewrites are stored twice. Without the pool it is a
//!   full copy of the allocated blocks (time and space grow with the data).
//!
//! A running workspace is paused (cgroup freezer) while both are taken, and the volume's
//! ext4 is frozen with `fsfreeze` for the copy, which flushes it and leaves a clean journal:
//! both parts show the same instant and the copy mounts as is. The workspace then runs on;
//! the two are taken at once, so the pause lasts the longer of them, the commit (~150 ms on
//! an idle machine, more under load). The tag carries a suffix
//! from the snapshot's id so that an overwritten snapshot never moves a tag a container
//! runs on.
//!
//! # Restore
//!
//! Restoring replaces the container and the volume: it removes the container (and any
//! sidecar in its network namespace), unmounts the volume, puts a clone of the snapshot's
//! copy in place of `data.img`, mounts it, and creates the container again from the
//! snapshot's image with the specification it was first created with (same name, labels,
//! environment, limits, mounts, network, published ports, hardening), then starts it. That
//! specification is saved when the workspace is made, as
//! `<snapshots_path>/<workspace-id>/container.json`: it cannot be rebuilt from the
//! database, which does not keep the create request's environment variables, ports, extra
//! hosts or read-only flag. Files added after the snapshot are gone, deleted ones are back,
//! contents, owners and modes are as they were. A restore is refused while a task other
//! than the caller's runs in the workspace.
//!
//! # Crash safety
//!
//! - One operation per workspace at a time, across processes: each holds an exclusive
//!   `flock` on `<snapshots_path>/<workspace-id>/lock`. The kernel drops it when a process
//!   dies, which is how [`Conductor::reconcile`] tells an interrupted operation from one
//!   still in progress.
//! - A snapshot is recorded `creating` (with the names of its image and copy) before
//!   anything is made; the copy is written as `<id>.img.partial`, synced and renamed; the
//!   row becomes `complete` last. Reconcile deletes `creating` rows with whatever they made,
//!   thaws the volume and resumes the container, and finishes `deleting` rows. Only
//!   `complete` snapshots are listed or restorable. After an interrupted capture it also
//!   removes images left without a manifest: conductor's Podman service dies with it, and
//!   Podman 4.3 killed during a commit leaves such an image, which breaks every image
//!   listing on the host (`podman images` too) and a later commit of the same content.
//! - A restore first writes `restore.json` (the snapshot's id); every step is idempotent,
//!   so reconcile finishes an interrupted restore by running it again.
//!
//! # Retention
//!
//! After each new snapshot, `isolated_workspace.snapshots` applies: beyond
//! `max_per_workspace` the workspace's oldest snapshots go, then beyond `max_total_size`
//! (all workspaces, by reported size) the oldest anywhere go; the new one is never removed.
//! Removing a workspace without keeping its volume deletes its snapshots; keeping the volume
//! keeps them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conductor_core::engine::{ContainerSpec, ContainerStatus};
use conductor_core::lifecycle::{SnapshotState, WorkspaceState};
use conductor_core::task::rfc3339;
use conductor_core::{naming, validate};
use conductor_store::{SnapshotRecord, WorkspaceFilter, WorkspaceRecord};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use crate::storage_pool::CopyMethod;
use crate::volumes::{remove_file, DataVolume};
use crate::workspaces::WorkspaceInfo;
use crate::{now_ms, Conductor, Result, ServiceError};

/// Repository of the images holding snapshots' root file systems.
pub const SNAPSHOT_REPOSITORY: &str = "localhost/conductor-snapshots";
/// Label naming the snapshot on its image.
const LABEL_SNAPSHOT: &str = "io.conductor.snapshot";
/// Directory under the workspaces path holding the volume copies (on the pool).
const DATA_DIR: &str = ".snapshots";
/// Files in `<snapshots_path>/<workspace-id>/`.
const SPEC_FILE: &str = "container.json";
const RESTORE_MARKER: &str = "restore.json";
const LOCK_FILE: &str = "lock";
/// How long removing a workspace waits for a snapshot operation on it to end.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A snapshot as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub workspace_id: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Allocated bytes of the volume copy plus the size of the root file system layer. Blocks
    /// a reflinked copy still shares with the workspace or other snapshots are counted in
    /// full, so this is an upper bound of what deleting the snapshot frees.
    pub size_bytes: u64,
    pub state: SnapshotState,
}

impl From<&SnapshotRecord> for SnapshotInfo {
    fn from(r: &SnapshotRecord) -> Self {
        SnapshotInfo {
            name: r.name.clone(),
            workspace_id: r.workspace_id.clone(),
            created_at: rfc3339(r.created_at),
            size_bytes: r.bytes,
            state: r.state,
        }
    }
}

/// What [`Conductor::reconcile`] did about snapshots.
#[derive(Debug, Default)]
pub(crate) struct SnapshotRepairs {
    /// `<workspace-id>/<name>` of unfinished snapshots removed (interrupted creations and
    /// deletions).
    pub discarded: Vec<String>,
    /// `<workspace-id>/<name>` of interrupted restores finished.
    pub restored: Vec<String>,
    /// Ids of images an interrupted commit left unreadable, removed.
    pub images_repaired: Vec<String>,
}

/// An exclusive hold on one workspace's snapshots, released when dropped.
pub(crate) struct OpLock {
    _lock: Flock<File>,
}

fn partial(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    p.into()
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial(path);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| ServiceError::host(format!("write {}", path.display()), e))
}

/// Flushes a file and the directory entry naming it.
fn sync_file(path: &Path) -> Result<()> {
    let sync = |p: &Path| File::open(p).and_then(|f| f.sync_all());
    sync(path)
        .and_then(|()| path.parent().map_or(Ok(()), sync))
        .map_err(|e| ServiceError::host(format!("sync {}", path.display()), e))
}

impl Conductor {
    /// `<workspaces>/.snapshots/<workspace-id>`: the volume copies.
    pub(crate) fn snapshot_data_dir(&self, workspace_id: &str) -> PathBuf {
        self.paths.workspaces.join(DATA_DIR).join(workspace_id)
    }

    /// `<snapshots_path>/<workspace-id>`: the container specification, the lock and the
    /// restore marker.
    fn snapshot_meta_dir(&self, workspace_id: &str) -> PathBuf {
        self.paths.snapshots.join(workspace_id)
    }

    /// Records the specification a workspace's container was created with, so a restore
    /// can create it again (called once the container runs).
    pub(crate) fn save_container_spec(&self, workspace_id: &str, spec: &ContainerSpec) -> Result<()> {
        let dir = self.snapshot_meta_dir(workspace_id);
        std::fs::create_dir_all(&dir).map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
        let json = serde_json::to_vec_pretty(spec).map_err(|e| ServiceError::host("encode the container spec", e))?;
        write_atomic(&dir.join(SPEC_FILE), &json)
    }

    pub(crate) fn load_container_spec(&self, workspace_id: &str) -> Result<ContainerSpec> {
        let path = self.snapshot_meta_dir(workspace_id).join(SPEC_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ServiceError::Conflict(format!(
                    "workspace '{workspace_id}' was created before snapshots were supported and cannot be restored; create a new workspace"
                ))
            } else {
                ServiceError::host(format!("read {}", path.display()), e)
            }
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ServiceError::host(format!("decode {}", path.display()), e))
    }

    /// Takes the workspace's snapshot lock, or `None` when another operation holds it.
    fn try_lock(&self, workspace_id: &str) -> Result<Option<OpLock>> {
        let dir = self.snapshot_meta_dir(workspace_id);
        std::fs::create_dir_all(&dir).map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
        let path = dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ServiceError::host(format!("open {}", path.display()), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(OpLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(ServiceError::host(format!("lock {}", path.display()), e)),
        }
    }

    /// Takes the lock or fails with a conflict naming the workspace.
    pub(crate) fn lock_now(&self, workspace_id: &str) -> Result<OpLock> {
        self.try_lock(workspace_id)?.ok_or_else(|| {
            ServiceError::Conflict(format!(
                "a snapshot or restore of workspace '{workspace_id}' is in progress; try again when it has finished"
            ))
        })
    }

    /// Takes the lock, waiting up to [`LOCK_WAIT`] for an operation in progress.
    async fn lock_wait(&self, workspace_id: &str) -> Result<OpLock> {
        let begin = Instant::now();
        loop {
            if let Some(lock) = self.try_lock(workspace_id)? {
                return Ok(lock);
            }
            if begin.elapsed() > LOCK_WAIT {
                return self.lock_now(workspace_id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A workspace id or container name, or an agent id naming its single live workspace.
    pub(crate) fn snapshot_target(&self, workspace: &str) -> Result<WorkspaceRecord> {
        match self.handle(workspace) {
            Ok(handle) => Ok(handle.record),
            Err(ServiceError::NotFound { .. }) => {
                let live = self.store.list_workspaces(&WorkspaceFilter {
                    agent_id: Some(workspace.to_string()),
                    states: vec![
                        WorkspaceState::Running,
                        WorkspaceState::Paused,
                        WorkspaceState::Suspended,
                        WorkspaceState::Stopped,
                    ],
                    ..Default::default()
                })?;
                match live.len() {
                    0 => Err(ServiceError::not_found(format!("workspace '{workspace}'"))),
                    1 => Ok(live.into_iter().next().expect("one workspace")),
                    n => Err(ServiceError::invalid(
                        "workspace",
                        format!(
                            "agent '{workspace}' has {n} live workspaces ({}); name one by its id",
                            live.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    )),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `s`'s image is the one the workspace's container runs (after a restore).
    fn image_in_use(&self, s: &SnapshotRecord) -> Result<bool> {
        let Some(image) = &s.rootfs_image else { return Ok(false) };
        Ok(self
            .store
            .get_workspace(&s.workspace_id)?
            .is_some_and(|w| w.state.holds_container() && w.image == *image))
    }

    /// Takes a snapshot of a workspace (`workspace`: its id or container name, or an agent
    /// id with a single live workspace). A running workspace is paused while it is taken
    /// and keeps running. An existing `name` is a conflict unless `overwrite`.
    pub async fn create_snapshot(&self, workspace: &str, name: &str, overwrite: bool) -> Result<SnapshotInfo> {
        validate::snapshot_name(name).map_err(|m| ServiceError::invalid("name", m))?;
        let w = self.snapshot_target(workspace)?;
        if !w.state.can_snapshot() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; only a running or stopped workspace can be snapshotted",
                w.id, w.state
            )));
        }
        let vol = self.volumes.open(Path::new(&w.volume_dir));
        if !vol.limited {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' has no volume image (conductor makes one only when it runs as root), so it cannot be snapshotted",
                w.id
            )));
        }
        let _lock = self.lock_now(&w.id)?;
        if let Some(old) = self.store.get_snapshot_by_name(&w.id, name)? {
            // A row that is not complete is left over by a crash: we hold the lock.
            if old.state == SnapshotState::Complete && !overwrite {
                return Err(ServiceError::Conflict(format!(
                    "workspace '{}' already has a snapshot '{name}'; ask for overwrite to replace it",
                    w.id
                )));
            }
            let keep_image = self.image_in_use(&old)?;
            self.remove_snapshot(&old, keep_image).await?;
        }

        let id = format!("snap-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.snapshot_data_dir(&w.id);
        std::fs::create_dir_all(&dir).map_err(|e| ServiceError::host(format!("create {}", dir.display()), e))?;
        let record = SnapshotRecord {
            rootfs_image: Some(format!("{SNAPSHOT_REPOSITORY}/{}:{name}-{}", w.id, &id[5..])),
            data_ref: Some(dir.join(format!("{id}.img")).display().to_string()),
            id,
            workspace_id: w.id.clone(),
            name: name.to_string(),
            state: SnapshotState::Creating,
            bytes: 0,
            created_at: now_ms(),
        };
        self.store.insert_snapshot(&record)?;
        match self.capture(&w, &vol, &record).await {
            Ok(bytes) => {
                self.store
                    .set_snapshot_state(&record.id, SnapshotState::Complete, Some(bytes))?;
                self.apply_retention(&record).await?;
                let done = self
                    .store
                    .get_snapshot_by_name(&w.id, name)?
                    .ok_or_else(|| ServiceError::not_found(format!("snapshot '{name}'")))?;
                Ok(SnapshotInfo::from(&done))
            }
            Err(e) => {
                if let Err(cleanup) = self.remove_snapshot(&record, false).await {
                    tracing::warn!(snapshot = %record.id, error = %cleanup, "removing a failed snapshot failed; reconcile retries");
                }
                Err(e)
            }
        }
    }

    /// Pauses, copies the volume, commits, resumes; then makes the copy final and returns
    /// the snapshot's size.
    async fn capture(&self, w: &WorkspaceRecord, vol: &DataVolume, s: &SnapshotRecord) -> Result<u64> {
        let (Some(image), Some(data)) = (&s.rootfs_image, &s.data_ref) else {
            return Err(ServiceError::host(
                "capture a snapshot",
                "the snapshot names no image or copy",
            ));
        };
        let data = PathBuf::from(data);
        let (method, paused) = self.capture_parts(w, vol, image, &data, &s.name, true).await?;
        let paused_ms = paused.as_millis();
        let allocated = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(&data).map_err(|e| ServiceError::host(format!("stat {}", data.display()), e))?,
        ) * 512;
        let layer = self
            .image_size(image)
            .await?
            .saturating_sub(self.image_size(&w.image).await?);
        tracing::info!(
            workspace = %w.id, snapshot = %s.name, copy = method.as_str(), paused_ms, volume_bytes = allocated, layer_bytes = layer,
            "snapshot taken"
        );
        Ok(allocated + layer)
    }

    /// The capture itself, shared by snapshots and forks ([`crate::fork`]): pauses a running
    /// workspace, copies its volume to `data` (through `<data>.partial`, renamed, and synced
    /// first when `durable`: a fork's capture lives only for the fork) with its file system
    /// frozen, commits its root file system as `image` (labelled with `name`), and resumes
    /// it. Returns how the volume was copied and how long the workspace was paused.
    pub(crate) async fn capture_parts(
        &self,
        w: &WorkspaceRecord,
        vol: &DataVolume,
        image: &str,
        data: &Path,
        name: &str,
        durable: bool,
    ) -> Result<(CopyMethod, Duration)> {
        let container = w.container();
        let running = w.state == WorkspaceState::Running;
        let begin = Instant::now();
        if running {
            self.engine.container_pause(container).await?;
        }
        // The volume copy and the commit (which leaves bind mounts out) touch different file
        // systems: made at once, the pause lasts the longer of the two, not their sum.
        let mut labels = naming::workspace_labels(&self.instance, &w.id, &w.agent_id, &w.environment);
        labels.insert(LABEL_SNAPSHOT.to_string(), name.to_string());
        let part = partial(data);
        let (copied, committed) = tokio::join!(
            self.volumes.capture(vol, &part),
            self.engine.image_commit(container, image, labels)
        );
        let captured = committed.map_err(ServiceError::from).and(copied);
        if running {
            let resumed = self.engine.container_unpause(container).await;
            if captured.is_ok() {
                resumed?;
            } else if let Err(e) = resumed {
                tracing::error!(workspace = %w.id, error = %e, "resuming the workspace after a failed capture failed");
            }
        }
        let method = captured?;
        let paused = begin.elapsed();
        if durable {
            sync_file(&part)?;
        }
        std::fs::rename(&part, data).map_err(|e| ServiceError::host(format!("rename {}", part.display()), e))?;
        Ok((method, paused))
    }

    async fn image_size(&self, reference: &str) -> Result<u64> {
        Ok(self.engine.image_inspect(reference).await?.map_or(0, |i| i.size_bytes))
    }

    /// The workspace's complete snapshots, oldest first.
    pub fn list_snapshots(&self, workspace: &str) -> Result<Vec<SnapshotInfo>> {
        let w = self.snapshot_target(workspace)?;
        Ok(self
            .store
            .list_snapshots(&w.id, true)?
            .iter()
            .map(SnapshotInfo::from)
            .collect())
    }

    /// Deletes a snapshot: its image (unless the workspace's container runs on it since a
    /// restore; it goes with the container), its volume copy and its record.
    pub async fn delete_snapshot(&self, workspace: &str, name: &str) -> Result<()> {
        validate::snapshot_name(name).map_err(|m| ServiceError::invalid("name", m))?;
        let w = self.snapshot_target(workspace)?;
        let _lock = self.lock_now(&w.id)?;
        let s = self
            .store
            .get_snapshot_by_name(&w.id, name)?
            .ok_or_else(|| ServiceError::not_found(format!("snapshot '{name}' of workspace '{}'", w.id)))?;
        let keep_image = self.image_in_use(&s)?;
        self.remove_snapshot(&s, keep_image).await
    }

    /// Removes what a snapshot made, then its record (the caller holds the lock). Marked
    /// `deleting` first, so an interruption is finished by reconcile.
    pub(crate) async fn remove_snapshot(&self, s: &SnapshotRecord, keep_image: bool) -> Result<()> {
        if s.state != SnapshotState::Deleting {
            self.store.set_snapshot_state(&s.id, SnapshotState::Deleting, None)?;
        }
        if let Some(data) = &s.data_ref {
            remove_file(Path::new(data))?;
            remove_file(&partial(Path::new(data)))?;
        }
        if let (Some(image), false) = (&s.rootfs_image, keep_image) {
            match self.engine.image_remove(image).await {
                Err(e) if !e.is_not_found() => return Err(e.into()),
                _ => {}
            }
        }
        self.store.delete_snapshot(&s.id)?;
        Ok(())
    }

    /// Removes the oldest snapshots beyond `isolated_workspace.snapshots`, never `new`.
    async fn apply_retention(&self, new: &SnapshotRecord) -> Result<()> {
        let policy = &self.config.isolated_workspace.snapshots;
        let mine = self.store.list_snapshots(&new.workspace_id, true)?;
        let excess = mine.len().saturating_sub(policy.max_per_workspace as usize);
        for s in mine.iter().filter(|s| s.id != new.id).take(excess) {
            tracing::info!(workspace = %s.workspace_id, snapshot = %s.name, "removed by retention (max_per_workspace)");
            let keep_image = self.image_in_use(s)?;
            self.remove_snapshot(s, keep_image).await?;
        }
        let all = self.store.list_snapshots_in_state(SnapshotState::Complete)?;
        let mut total: u64 = all.iter().map(|s| s.bytes).sum();
        for s in all.iter().filter(|s| s.id != new.id) {
            if total <= policy.max_total_size.bytes() {
                break;
            }
            // Another workspace's snapshot: only when no operation runs there.
            let _other = if s.workspace_id == new.workspace_id {
                None
            } else {
                match self.try_lock(&s.workspace_id)? {
                    Some(lock) => Some(lock),
                    None => continue,
                }
            };
            tracing::info!(workspace = %s.workspace_id, snapshot = %s.name, "removed by retention (max_total_size)");
            let keep_image = self.image_in_use(s)?;
            self.remove_snapshot(s, keep_image).await?;
            total = total.saturating_sub(s.bytes);
        }
        Ok(())
    }

    /// Restores a workspace to a snapshot; refused while a task runs in it. The workspace
    /// runs afterwards, whether it ran before or not.
    pub async fn restore_snapshot(&self, workspace: &str, name: &str) -> Result<WorkspaceInfo> {
        self.restore(workspace, name, None).await
    }

    /// [`restore_snapshot`](Self::restore_snapshot) for the task `task_id`, which may itself
    /// be running in the workspace (hybrid mode's `restore_on_error`). Its sidecars are
    /// removed with the container: call it after the task's services are done.
    pub async fn restore_snapshot_for_task(&self, workspace: &str, name: &str, task_id: &str) -> Result<WorkspaceInfo> {
        self.restore(workspace, name, Some(task_id)).await
    }

    async fn restore(&self, workspace: &str, name: &str, task_id: Option<&str>) -> Result<WorkspaceInfo> {
        validate::snapshot_name(name).map_err(|m| ServiceError::invalid("name", m))?;
        let w = self.snapshot_target(workspace)?;
        if !w.state.can_restore() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is {}; only a running or stopped workspace can be restored",
                w.id, w.state
            )));
        }
        let busy: Vec<String> = self
            .store
            .running_tasks()?
            .into_iter()
            .filter(|t| t.workspace_id.as_deref() == Some(w.id.as_str()) && Some(t.id.as_str()) != task_id)
            .map(|t| t.id)
            .collect();
        if !busy.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "workspace '{}' is running task {}; restore it when the task has finished",
                w.id,
                busy.join(", ")
            )));
        }
        let _lock = self.lock_now(&w.id)?;
        let s = self
            .store
            .get_snapshot_by_name(&w.id, name)?
            .filter(|s| s.state.can_restore())
            .ok_or_else(|| ServiceError::not_found(format!("snapshot '{name}' of workspace '{}'", w.id)))?;
        // Checked before anything changes.
        self.load_container_spec(&w.id)?;
        let marker = self.snapshot_meta_dir(&w.id).join(RESTORE_MARKER);
        write_atomic(
            &marker,
            serde_json::json!({ "snapshot_id": s.id }).to_string().as_bytes(),
        )?;
        let begin = Instant::now();
        self.restore_locked(&w, &s).await?;
        remove_file(&marker)?;
        tracing::info!(workspace = %w.id, snapshot = %s.name, ms = begin.elapsed().as_millis(), "snapshot restored");
        self.get_workspace(&w.id)
    }

    /// The restore itself; every step may run again after an interruption.
    async fn restore_locked(&self, w: &WorkspaceRecord, s: &SnapshotRecord) -> Result<()> {
        let (Some(image), Some(data)) = (&s.rootfs_image, &s.data_ref) else {
            return Err(ServiceError::host(
                "restore a snapshot",
                "the snapshot names no image or copy",
            ));
        };
        let mut spec = self.load_container_spec(&w.id)?;
        spec.image = image.clone();
        let vol = self.volumes.open(Path::new(&w.volume_dir));
        self.volumes.stage(&vol, Path::new(data)).await?;

        // Sidecars join the container's network namespace: they go first.
        let dependants = self
            .engine
            .container_list(&[(naming::LABEL_WORKSPACE, Some(w.id.as_str()))])
            .await?;
        for c in dependants
            .iter()
            .filter(|c| c.labels.get(naming::LABEL_ROLE).map(String::as_str) == Some("service"))
        {
            self.engine.container_remove(&c.id).await?;
        }
        // By name: also removes a container an interrupted restore made.
        self.engine.container_remove(&w.container_name).await?;
        self.volumes.detach(&vol).await?;
        self.volumes.replace(&vol).await?;
        self.mount_volume(w).await?;
        let cid = self.engine.container_create(&spec).await?;
        self.engine.container_start(&cid).await?;
        self.await_agent(&w.id).await;
        self.store.set_workspace_container(&w.id, &cid, w.network.as_deref())?;
        self.store.set_workspace_image(&w.id, image)?;
        self.store.set_workspace_state(&w.id, WorkspaceState::Running, None)?;
        self.store.touch_workspace(&w.id, now_ms())?;
        if w.image != *image {
            self.drop_snapshot_image(&w.id, &w.image).await;
        }
        Ok(())
    }

    /// Removes an image the workspace's container ran on after a restore, once neither a
    /// container nor a snapshot needs it. Failures are logged: a left-over image costs
    /// space, not correctness.
    async fn drop_snapshot_image(&self, workspace_id: &str, image: &str) {
        if !image.starts_with(&format!("{SNAPSHOT_REPOSITORY}/")) {
            return;
        }
        let needed = match self.store.list_snapshots(workspace_id, false) {
            Ok(rows) => rows.iter().any(|s| s.rootfs_image.as_deref() == Some(image)),
            Err(_) => true,
        };
        if !needed {
            if let Err(e) = self.engine.image_remove(image).await {
                if !e.is_not_found() {
                    tracing::warn!(image, error = %e, "removing a former snapshot image failed");
                }
            }
        }
    }

    /// Part of removing a workspace (its container is gone): without `keep`, deletes its
    /// snapshots and their files; the image a restore left it on goes in any case unless
    /// a kept snapshot holds it.
    pub(crate) async fn release_snapshots(&self, w: &WorkspaceRecord, keep: bool) -> Result<()> {
        if !keep {
            let lock = self.lock_wait(&w.id).await?;
            for s in self.store.list_snapshots(&w.id, false)? {
                self.remove_snapshot(&s, false).await?;
            }
            for dir in [self.snapshot_data_dir(&w.id), self.snapshot_meta_dir(&w.id)] {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| ServiceError::host(format!("remove {}", dir.display()), e))?;
                }
            }
            drop(lock);
        }
        self.drop_snapshot_image(&w.id, &w.image).await;
        Ok(())
    }

    /// Crash recovery, run first by [`Conductor::reconcile`]: finishes interrupted restores,
    /// removes snapshots left `creating` (thawing and resuming their workspace) and finishes
    /// `deleting` ones. Operations still running in another process are left alone.
    pub(crate) async fn reconcile_snapshots(&self) -> Result<SnapshotRepairs> {
        let mut repairs = SnapshotRepairs::default();
        let dirs = match std::fs::read_dir(&self.paths.snapshots) {
            Ok(d) => d.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        for dir in dirs {
            let marker = dir.join(RESTORE_MARKER);
            let Some(workspace_id) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !marker.exists() {
                continue;
            }
            let Some(_lock) = self.try_lock(workspace_id)? else {
                continue;
            };
            let wanted: Option<String> = std::fs::read(&marker)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["snapshot_id"].as_str().map(str::to_string));
            let w = self.store.get_workspace(workspace_id)?;
            let s = self
                .store
                .list_snapshots(workspace_id, true)?
                .into_iter()
                .find(|s| Some(&s.id) == wanted.as_ref());
            if let (Some(w), Some(s)) = (w, s) {
                if w.state.can_restore() {
                    if let Err(e) = self.restore_locked(&w, &s).await {
                        // The marker stays: the next reconcile tries again.
                        tracing::error!(workspace = %w.id, snapshot = %s.name, error = %e, "finishing an interrupted restore failed");
                        continue;
                    }
                    repairs.restored.push(format!("{}/{}", w.id, s.name));
                }
            }
            remove_file(&marker)?;
        }
        let mut interrupted_capture = false;
        for state in [SnapshotState::Creating, SnapshotState::Deleting] {
            for s in self.store.list_snapshots_in_state(state)? {
                let Some(_lock) = self.try_lock(&s.workspace_id)? else {
                    continue;
                };
                // Re-read under the lock: the operation may have ended meanwhile.
                let Some(s) = self
                    .store
                    .get_snapshot_by_name(&s.workspace_id, &s.name)?
                    .filter(|now| now.id == s.id && now.state == state)
                else {
                    continue;
                };
                if state == SnapshotState::Creating {
                    self.thaw(&s.workspace_id).await?;
                    interrupted_capture = true;
                }
                let keep_image = self.image_in_use(&s)?;
                self.remove_snapshot(&s, keep_image).await?;
                repairs.discarded.push(format!("{}/{}", s.workspace_id, s.name));
            }
        }
        if interrupted_capture {
            // The capture's commit may have been cut short with Podman's service.
            match self.engine.image_repair().await {
                Ok(ids) => repairs.images_repaired = ids,
                // Best effort: the next reconcile after an interrupted capture tries again,
                // and a commit meeting such an image removes it.
                Err(e) => tracing::warn!(error = %e, "looking for images an interrupted commit left failed"),
            }
            for id in &repairs.images_repaired {
                tracing::warn!(image = %id, "removed an image an interrupted commit left without a manifest");
            }
        }
        Ok(repairs)
    }

    /// Undoes what an interrupted capture may have left: a frozen volume, a paused container.
    async fn thaw(&self, workspace_id: &str) -> Result<()> {
        let Some(w) = self.store.get_workspace(workspace_id)? else {
            return Ok(());
        };
        self.volumes.thaw(&self.volumes.open(Path::new(&w.volume_dir))).await;
        let container = w.container();
        if let Some(c) = self.engine.container_inspect(container).await? {
            if c.status == ContainerStatus::Paused {
                self.engine.container_unpause(container).await?;
            }
        }
        Ok(())
    }
}
