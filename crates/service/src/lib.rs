//! The conductor application layer.
//!
//! [`Conductor`] owns the configuration, the store, the engine and the environment catalog
//! and offers the workflows the CLI and the HTTP API call: building images, creating and
//! driving workspaces, reconciling after a crash. Each workflow asks the core for decisions,
//! records intent in the store before acting on the engine, and records the outcome after,
//! so a crash at any point leaves something the reconciler can finish or undo.

pub mod agent_client;
pub mod backend;
pub mod bootstrap;
pub mod channel;
pub mod config_file;
pub mod doctor;
pub mod egress;
pub mod error;
pub mod exec;
pub mod files;
mod firewall;
pub mod fork;
pub mod handle;
pub mod host;
pub mod images;
pub mod instance_lock;
pub mod kube;
pub mod liveness;
pub mod maintenance;
mod orchestrator;
pub mod pause;
pub mod process;
pub mod reconcile;
pub mod secrets;
pub mod sidecars;
pub mod snapshots;
pub mod storage_pool;
pub mod streams;
pub mod tasks;
pub mod volumes;
pub mod warm_pool;
pub mod workspaces;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use conductor_core::config::DataPaths;
use conductor_core::engine::Engine;
use conductor_core::environment::Catalog;
use conductor_core::Config;
pub use conductor_engine_podman::ServiceRole;
use conductor_store::Store;

pub use error::{Result, ServiceError};

/// The seccomp profile shipped with conductor: Podman's default minus namespace creation,
/// keyrings, ptrace, mounts, BPF, perf, kexec and module loading (see docs/workspaces.md).
pub const SECCOMP_PROFILE: &str = include_str!("../../../profiles/seccomp.json");

/// One running conductor: configuration, state and engine.
pub struct Conductor {
    pub config: Config,
    pub paths: DataPaths,
    pub catalog: Catalog,
    pub engine: Arc<dyn Engine>,
    /// The workspaces' data volumes (backend seam, `backend::VolumeStore`).
    pub volumes: Arc<dyn backend::VolumeStore>,
    /// How the service reaches a workspace's agent (backend seam).
    pub agents: Arc<dyn backend::AgentTransport>,
    /// How a task's `source` gets into its workspace (backend seam).
    pub sources: Arc<dyn backend::SourceUpload>,
    pub store: Arc<Store>,
    /// Identifies this conductor's objects in the engine (label `io.conductor.instance`).
    pub instance: String,
    seccomp_path: PathBuf,
    /// Serialises network address allocation.
    net_lock: tokio::sync::Mutex<()>,
    /// The egress proxy listeners of proxy-mode workspaces this process serves.
    pub(crate) egress: egress::EgressHub,
    /// The secret key and the egress CA, loaded at first use.
    pub(crate) secrets: secrets::SecretsRuntime,
    /// In-memory state of the task orchestrator (wake-ups, live logs, cancellation).
    pub(crate) tasks: tasks::TaskRuntime,
    /// In-memory state of pause, resume and the idle check.
    pub(crate) pause: pause::PauseRuntime,
    /// The storage pool mounted on the workspaces path, held busy while this lives.
    _pool: Option<storage_pool::Pool>,
}

/// The user's home directory (for `~` in paths).
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| ServiceError::host(format!("create directory {}", path.display()), e))
}

impl Conductor {
    /// As a guest of the instance's service (see [`ServiceRole`]): what CLI commands, the
    /// MCP server and tests use.
    pub async fn open(config: Config) -> Result<Self> {
        Self::open_as(config, ServiceRole::Guest).await
    }

    /// Opens the store, writes the seccomp profile and connects to (or starts) Podman in
    /// `role`: `conductor serve` is the [`ServiceRole::Owner`].
    pub async fn open_as(config: Config, role: ServiceRole) -> Result<Self> {
        let paths = config.storage.resolve(&home_dir());
        for dir in [&paths.base, &paths.workspaces, &paths.snapshots, &paths.logs] {
            create_dir(dir)?;
        }
        if let Some(parent) = paths.database.parent() {
            create_dir(parent)?;
        }
        let pool = storage_pool::Pool::open(&paths).await;
        // The database holds the sealed secrets: readable by its owner only.
        secrets::prepare_database(&paths.database)?;
        let store = Store::open(&paths.database)?;
        secrets::restrict_database(&paths.database)?;
        let instance = store.instance_id()?;
        let seccomp_path = match &config.podman_config.security.seccomp_profile {
            Some(p) => PathBuf::from(p),
            None => {
                let p = paths.base.join("seccomp.json");
                std::fs::write(&p, SECCOMP_PROFILE)
                    .map_err(|e| ServiceError::host(format!("write {}", p.display()), e))?;
                p
            }
        };
        let backend = backend::connect(&config, &paths, role).await?;
        let mut conductor = Self::with_backend(config, paths, backend, Arc::new(store), instance, seccomp_path);
        conductor._pool = pool;
        conductor.register_config_secrets()?;
        Ok(conductor)
    }

    /// Assembles a conductor from parts, with the host implementations of the backend
    /// seams (tests use their own data directories).
    pub fn with_parts(
        config: Config,
        paths: DataPaths,
        engine: Arc<dyn Engine>,
        store: Arc<Store>,
        instance: String,
        seccomp_path: PathBuf,
    ) -> Self {
        let backend = backend::Backend::host(engine, &paths);
        Self::with_backend(config, paths, backend, store, instance, seccomp_path)
    }

    /// Assembles a conductor over a backend's parts.
    pub fn with_backend(
        config: Config,
        paths: DataPaths,
        backend: backend::Backend,
        store: Arc<Store>,
        instance: String,
        seccomp_path: PathBuf,
    ) -> Self {
        let catalog = Catalog::from_config(&config);
        let egress = egress::EgressHub::new(&config.network.egress);
        Conductor {
            config,
            paths,
            catalog,
            engine: backend.engine,
            volumes: backend.volumes,
            agents: backend.agents,
            sources: backend.sources,
            store,
            instance,
            seccomp_path,
            net_lock: Default::default(),
            egress,
            secrets: Default::default(),
            tasks: tasks::TaskRuntime::new(),
            pause: Default::default(),
            _pool: None,
        }
    }

    pub fn seccomp_path(&self) -> &Path {
        &self.seccomp_path
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
