//! What a backend provides, and the one place a configuration's backend is chosen.
//!
//! A backend is more than its container engine. Besides the [`Engine`] (containers, images,
//! exec, networks: `core::engine`), the workflows need three things that today live on the
//! host beside Podman and on Kubernetes would live in the cluster:
//!
//! - a [`VolumeStore`]: each workspace's data volume, created with a size limit, attached,
//!   copied consistently for a snapshot, replaced by a snapshot's copy, made from such a copy
//!   (a fork), and removed;
//! - an [`AgentTransport`]: how the service reaches a workspace's in-workspace agent (a Unix
//!   socket in a bind-mounted host directory here; a port-forward on Kubernetes);
//! - a [`SourceUpload`]: how a task's `source` directory gets into the workspace (copied
//!   straight into the volume on the host here; a tar through the agent elsewhere).
//!
//! [`Backend`] bundles the four. [`connect`] builds the configured one; `host.rs` holds
//! today's host implementations. A second backend adds an arm to [`connect`] and its own
//! implementations of these traits; the workflows above take a [`Backend`]'s parts and do
//! not change (docs/architecture.md, "Seams inside the service").

mod host;
#[cfg(any(test, feature = "testing"))]
pub mod memory;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use conductor_core::config::DataPaths;
use conductor_core::engine::{Engine, Mount};
use conductor_core::volume::VolumeSpec;
use conductor_core::Config;
use conductor_engine_podman::{PodmanEngine, PodmanOptions, ServiceRole};
use conductor_store::WorkspaceRecord;

pub use host::{HostSourceUpload, HostVolumes, UnixAgentTransport};

use crate::agent_client::{AgentConn, AgentError};
use crate::storage_pool::CopyMethod;
use crate::volumes::DataVolume;
use crate::Result;

/// A workspace's data volume store: `/workspace` and its named sub-volumes, with a hard
/// size limit. A volume is named by its directory (`WorkspaceRecord::volume_dir`), which a
/// backend may treat as a key.
#[async_trait]
pub trait VolumeStore: Send + Sync + 'static {
    /// What backs the volumes, for logs and `doctor` (`loop-ext4`, `directory`).
    fn kind(&self) -> &'static str;
    /// The volume named `dir` as it is now (no side effect).
    fn open(&self, dir: &Path) -> DataVolume;
    /// Creates the volume the first time (`size_bytes`, `inodes`), attaches it for a
    /// container, and makes the sub-volumes.
    async fn prepare(
        &self,
        dir: &Path,
        size_bytes: u64,
        inodes: Option<u64>,
        sub_volumes: &[String],
    ) -> Result<DataVolume>;
    /// Detaches the volume; its data stays.
    async fn detach(&self, vol: &DataVolume) -> Result<()>;
    /// Detaches the volume and deletes its data.
    async fn destroy(&self, vol: &DataVolume) -> Result<()>;
    /// A consistent copy of the volume's data at `dst` (a snapshot), taken while writes are
    /// held (the caller pauses the container).
    async fn capture(&self, vol: &DataVolume, dst: &Path) -> Result<CopyMethod>;
    /// Releases what an interrupted [`capture`](Self::capture) may still hold (a frozen
    /// file system).
    async fn thaw(&self, vol: &DataVolume);
    /// Copies a snapshot's data `src` beside the volume, ready for [`replace`](Self::replace).
    async fn stage(&self, vol: &DataVolume, src: &Path) -> Result<()>;
    /// Puts the staged copy in place of the volume's data; the volume must be detached.
    async fn replace(&self, vol: &DataVolume) -> Result<()>;
    /// Makes a copy of `src` (another volume's [`capture`](Self::capture)) the data of the
    /// new volume `dir` (a fork), sharing blocks where the backend can;
    /// [`prepare`](Self::prepare) then attaches it.
    async fn create_from(&self, dir: &Path, src: &Path) -> Result<CopyMethod>;
    /// `(used, total)` bytes of an attached volume.
    fn usage(&self, vol: &DataVolume) -> Option<(u64, u64)>;
    /// The volumes under `root` that are attached now (reconcile detaches those no live
    /// workspace owns).
    fn attached_under(&self, root: &Path) -> Vec<PathBuf>;
}

/// How the service reaches a workspace's in-workspace agent.
#[async_trait]
pub trait AgentTransport: Send + Sync + 'static {
    /// Whether workspaces get the agent here (a binary, and what its transport needs).
    fn available(&self, config: &Config) -> bool;
    /// What the workspace's container needs to run the agent as PID 1 (its mounts and
    /// entrypoint); `None` when the agent cannot run here (exec then goes through the engine).
    fn container_setup(&self, config: &Config, workspace_id: &str) -> Result<Option<(Vec<Mount>, Vec<String>)>>;
    /// Waits for the agent of a just-started workspace and records which process it is;
    /// false when it does not answer in a few seconds.
    async fn wait_ready(&self, workspace_id: &str) -> bool;
    /// Whether the agent's transport was set up for this workspace (it ran with the agent).
    fn is_set_up(&self, workspace_id: &str) -> bool;
    /// A connection to the workspace's agent, past `hello`, only to the agent recorded by
    /// [`wait_ready`](Self::wait_ready).
    async fn connect(&self, workspace_id: &str) -> Result<AgentConn, AgentError>;
    /// Forgets the workspace's transport (its socket directory here).
    fn remove(&self, workspace_id: &str);
    /// The ids of workspaces that have transport state, for reconcile to sweep.
    fn known(&self) -> Vec<String>;
}

/// Where long work says what it is doing (a task's log).
pub trait Progress: Send + Sync {
    fn note(&self, line: &str);
}

/// How a task's `source` gets into its workspace.
#[async_trait]
pub trait SourceUpload: Send + Sync + 'static {
    /// Copies the host directory `source` to `/workspace/src` of `ws` (or wherever the
    /// environment's `volumes` put that path), or creates that directory empty; what it
    /// does is told to `progress`.
    async fn place(
        &self,
        ws: &WorkspaceRecord,
        vol: &DataVolume,
        env_volumes: &[VolumeSpec],
        source: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<()>;
}

/// A backend's parts.
#[derive(Clone)]
pub struct Backend {
    pub engine: Arc<dyn Engine>,
    pub volumes: Arc<dyn VolumeStore>,
    pub agents: Arc<dyn AgentTransport>,
    pub sources: Arc<dyn SourceUpload>,
}

impl Backend {
    /// `engine` with the host implementations of the other seams (what Podman uses; tests
    /// that bring their own engine connection use this too).
    pub fn host(engine: Arc<dyn Engine>, paths: &DataPaths) -> Backend {
        Backend {
            engine,
            volumes: Arc::new(HostVolumes),
            agents: Arc::new(UnixAgentTransport::new(paths)),
            sources: Arc::new(HostSourceUpload),
        }
    }
}

/// Connects the backend `config` names, for a process in `role`.
pub async fn connect(config: &Config, paths: &DataPaths, role: ServiceRole) -> Result<Backend> {
    Ok(Backend::host(connect_engine(config, paths, role).await?, paths))
}

/// Connects the engine `config` names, for a process in `role`.
pub async fn connect_engine(config: &Config, paths: &DataPaths, role: ServiceRole) -> Result<Arc<dyn Engine>> {
    if config.engine.backend == conductor_core::config::EngineBackend::Kubernetes {
        // The cluster's engine exists (conductor_engine_kube::KubeEngine), but the other
        // seams of a backend (data volume, agent transport, source upload) have host
        // implementations only: serving workspaces from a cluster would half work.
        return Err(crate::ServiceError::invalid(
            "engine",
            "the kubernetes backend renders and checks (conductor kube render, conductor doctor); \
             serving workspaces on a cluster is not available yet (docs/kubernetes.md, \"What works in which mode\")",
        ));
    }
    let engine = PodmanEngine::connect(PodmanOptions {
        socket_path: config
            .podman_config
            .socket_path
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        data_dir: paths.base.clone(),
        runtime: config.podman_config.runtime,
        role,
    })
    .await?;
    Ok(Arc::new(engine))
}
