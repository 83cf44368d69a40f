//! The Podman adapter of conductor: [`PodmanEngine`] implements the core's
//! [`Engine`] trait over Podman's REST API on a Unix socket.
//!
//! Most calls use the Docker-compatible API through bollard; networks use a few libpod
//! endpoints (see `networks.rs` for why). The engine either uses a configured socket or
//! starts and supervises a private `podman system service` (`service.rs`), and picks the
//! OCI runtime once at connect time (`runtime.rs`). One module per resource family:
//! `containers`, `exec`, `images`, `networks`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), conductor_core::engine::EngineError> {
//! use conductor_core::config::RuntimeChoice;
//! use conductor_core::engine::Engine;
//! use conductor_engine_podman::{PodmanEngine, PodmanOptions, ServiceRole};
//!
//! let engine = PodmanEngine::connect(PodmanOptions {
//!     socket_path: None,
//!     data_dir: "/var/lib/conductor".into(),
//!     runtime: RuntimeChoice::Auto,
//!     role: ServiceRole::Guest,
//! })
//! .await?;
//! println!("{} with {}", engine.info().await?.version, engine.runtime());
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```

mod containers;
mod copy;
mod error;
mod exec;
mod images;
mod libpod;
mod networks;
mod runtime;
mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use conductor_core::config::RuntimeChoice;
use conductor_core::engine::{
    BuildSpec, ByteStream, ContainerInfo, ContainerSpec, ContainerStats, ContainerSummary, Engine, EngineError,
    EngineInfo, EngineResult, ExecSpec, ImageInfo, Labels, NetworkSpec, NetworkSummary, OutputChunk, ProgressSink,
};
use tokio::sync::mpsc;

use crate::error::api_error;
use crate::libpod::Libpod;
use crate::runtime::{CgroupVersion, RuntimeDecision};
use crate::service::ManagedService;

/// Request timeout of the API client. Long enough for a commit or a slow stop; streamed
/// answers (build, exec output) are not limited by it once their headers have arrived.
const API_TIMEOUT_SECS: u64 = 600;
/// How long one ping may take before a socket counts as not answering.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Which process of an instance this engine serves; decides where a private Podman
/// service listens and who may replace it (see [`PodmanEngine::connect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceRole {
    /// The instance's long-running process (`conductor serve`): a private service it
    /// starts listens on `<data_dir>/podman.sock`, where the instance's other processes find
    /// it, and is started again when it stops answering.
    Owner,
    /// A process beside the owner (a CLI command, the MCP server, a test): uses the owner's
    /// socket when it answers and never replaces or removes it; when none answers, it
    /// starts a private service on a socket of its own, `<data_dir>/podman-<pid>.sock`.
    #[default]
    Guest,
}

/// How to reach Podman.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodmanOptions {
    /// An existing API socket to use when it answers; otherwise the instance's own socket
    /// (`<data_dir>/podman.sock`) when it answers, else a private service is started.
    pub socket_path: Option<PathBuf>,
    /// Where the private service's socket (`podman.sock`) and log (`podman-service.log`) go.
    pub data_dir: PathBuf,
    pub runtime: RuntimeChoice,
    pub role: ServiceRole,
}

/// The socket the engine talks to, and the clients for it.
#[derive(Debug, Clone)]
struct Endpoint {
    docker: Docker,
    libpod: Libpod,
    socket: PathBuf,
    /// Whether this process started the service behind the socket.
    managed: bool,
}

/// What the engine and its watchdog share.
#[derive(Debug)]
struct Shared {
    opts: PodmanOptions,
    podman: Option<PathBuf>,
    runtime: RuntimeDecision,
    endpoint: std::sync::RwLock<Endpoint>,
    /// The private service, when this process started one.
    service: tokio::sync::Mutex<Option<ManagedService>>,
}

/// The Podman engine. Holds the API client and, when conductor started it, the private
/// `podman system service`, which is stopped by [`PodmanEngine::shutdown`] or on drop. A
/// watchdog checks every [`WATCHDOG_INTERVAL`] that the socket answers and, when it stops
/// answering, finds or starts a service again (see [`PodmanEngine::connect`]), so the
/// engine recovers by itself from a killed Podman service or a removed socket.
#[derive(Debug)]
pub struct PodmanEngine {
    shared: Arc<Shared>,
    cgroup: CgroupVersion,
    watchdog: tokio::task::JoinHandle<()>,
}

/// How often the watchdog pings the socket.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

impl PodmanEngine {
    /// Connects to Podman: to `socket_path` when it answers, else to the instance's socket
    /// `<data_dir>/podman.sock` when it answers (the running service's: processes of one
    /// instance share it), else starts a private service, on that socket for the
    /// [`ServiceRole::Owner`] and on `<data_dir>/podman-<pid>.sock` for a guest. Fails with
    /// `Unavailable` when Podman is missing or does not come up.
    pub async fn connect(opts: PodmanOptions) -> Result<PodmanEngine, EngineError> {
        let podman = find_in_path("podman");
        let cgroup = CgroupVersion::detect();
        let runtime = runtime::decide(opts.runtime, podman.as_deref(), cgroup).await;
        let (endpoint, service) = resolve(&opts, podman.as_deref(), &runtime.name).await?;
        tracing::info!(runtime = %runtime.name, reason = %runtime.reason, socket = %endpoint.socket.display(), managed = endpoint.managed, "picked the OCI runtime and the Podman socket");
        let shared = Arc::new(Shared {
            opts,
            podman,
            runtime,
            endpoint: std::sync::RwLock::new(endpoint),
            service: tokio::sync::Mutex::new(service),
        });
        let watchdog = tokio::spawn(watch(Arc::downgrade(&shared)));
        Ok(PodmanEngine {
            shared,
            cgroup,
            watchdog,
        })
    }

    /// The OCI runtime containers run with ("runc" or "crun").
    pub fn runtime(&self) -> &str {
        &self.shared.runtime.name
    }

    /// The socket in use now.
    pub fn socket(&self) -> PathBuf {
        self.endpoint().socket
    }

    fn endpoint(&self) -> Endpoint {
        self.shared.endpoint.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn docker(&self) -> Docker {
        self.endpoint().docker
    }

    fn libpod(&self) -> Libpod {
        self.endpoint().libpod
    }

    /// Stops the private service, if conductor started one (`SIGTERM`, then `SIGKILL`).
    pub async fn shutdown(self) -> Result<(), EngineError> {
        self.watchdog.abort();
        let service = self.shared.service.lock().await.take();
        match service {
            Some(service) => service.stop().await,
            None => Ok(()),
        }
    }
}

impl Drop for PodmanEngine {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

/// The socket of a service started by this process in `opts.role`.
fn own_socket(opts: &PodmanOptions) -> PathBuf {
    match opts.role {
        ServiceRole::Owner => opts.data_dir.join("podman.sock"),
        ServiceRole::Guest => opts.data_dir.join(format!("podman-{}.sock", std::process::id())),
    }
}

/// Finds an answering socket (the configured one, then the instance's), else starts a
/// private service.
async fn resolve(
    opts: &PodmanOptions,
    podman: Option<&Path>,
    runtime: &str,
) -> EngineResult<(Endpoint, Option<ManagedService>)> {
    let instance = opts.data_dir.join("podman.sock");
    let candidates = opts.socket_path.iter().chain(std::iter::once(&instance));
    for socket in candidates {
        if let Some(docker) = ping(socket).await {
            return Ok((endpoint(docker, socket, false), None));
        }
        if Some(socket) == opts.socket_path.as_ref() {
            tracing::warn!(socket = %socket.display(), "configured podman socket does not answer");
        }
    }
    let Some(podman) = podman else {
        return Err(EngineError::Unavailable(
            "podman is not installed: run scripts/setup.sh or apt-get install podman".into(),
        ));
    };
    let (service, docker) = ManagedService::start(podman, runtime, &opts.data_dir, &own_socket(opts)).await?;
    let socket = service.socket().to_path_buf();
    Ok((endpoint(docker, &socket, true), Some(service)))
}

fn endpoint(docker: Docker, socket: &Path, managed: bool) -> Endpoint {
    Endpoint {
        docker,
        libpod: Libpod::new(socket),
        socket: socket.to_path_buf(),
        managed,
    }
}

/// Pings the socket in use every [`WATCHDOG_INTERVAL`]. When it is gone or refuses twice in a
/// row, or has not answered for [`SLOW_LIMIT`] pings (a service that is merely busy, e.g.
/// with builds, answers within that), the watchdog stops this process's service (if any)
/// and resolves a socket again. Ends with the engine.
async fn watch(shared: std::sync::Weak<Shared>) {
    let (mut dead, mut slow) = (0u32, 0u32);
    loop {
        tokio::time::sleep(WATCHDOG_INTERVAL).await;
        let Some(shared) = shared.upgrade() else { return };
        let socket = shared.endpoint.read().unwrap_or_else(|e| e.into_inner()).socket.clone();
        match probe(&socket).await {
            Probe::Answers => (dead, slow) = (0, 0),
            Probe::Dead => dead += 1,
            Probe::Slow => slow += 1,
        }
        if dead < 2 && slow < SLOW_LIMIT {
            continue;
        }
        tracing::warn!(socket = %socket.display(), "the podman socket stopped answering; reconnecting");
        let mut service = shared.service.lock().await;
        if let Some(old) = service.take() {
            let _ = old.stop().await;
        }
        match resolve(&shared.opts, shared.podman.as_deref(), &shared.runtime.name).await {
            Ok((endpoint, started)) => {
                tracing::info!(socket = %endpoint.socket.display(), managed = endpoint.managed, "reconnected to podman");
                *service = started;
                *shared.endpoint.write().unwrap_or_else(|e| e.into_inner()) = endpoint;
                (dead, slow) = (0, 0);
            }
            Err(e) => tracing::error!("cannot reconnect to podman: {e}"),
        }
    }
}

/// Pings without an answer in a row after which a slow socket counts as dead (1 minute).
const SLOW_LIMIT: u32 = 30;

/// What a ping of a socket found.
enum Probe {
    Answers,
    /// Gone, refused, or the connection failed.
    Dead,
    /// No answer within [`PING_TIMEOUT`].
    Slow,
}

async fn probe(socket: &Path) -> Probe {
    if !socket.exists() {
        return Probe::Dead;
    }
    let Ok(docker) = Docker::connect_with_unix(
        &socket.to_string_lossy(),
        API_TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    ) else {
        return Probe::Dead;
    };
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => Probe::Answers,
        Ok(Err(_)) => Probe::Dead,
        Err(_) => Probe::Slow,
    }
}

/// A client for `socket` if it answers a ping in time.
pub(crate) async fn ping(socket: &Path) -> Option<Docker> {
    let docker = Docker::connect_with_unix(
        &socket.to_string_lossy(),
        API_TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    )
    .ok()?;
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => Some(docker),
        _ => None,
    }
}

/// The first executable file named `program` in `PATH`.
pub(crate) fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[async_trait]
impl Engine for PodmanEngine {
    async fn ping(&self) -> EngineResult<()> {
        let socket = self.socket();
        match tokio::time::timeout(PING_TIMEOUT, self.docker().ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(EngineError::Unavailable(format!(
                "podman on {} does not answer: {e}",
                socket.display()
            ))),
            Err(_) => Err(EngineError::Unavailable(format!(
                "podman on {} did not answer within {} s",
                socket.display(),
                PING_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        let endpoint = self.endpoint();
        let version = endpoint
            .docker
            .version()
            .await
            .map_err(|e| api_error("get the Podman version", None, e))?;
        let info = endpoint
            .docker
            .info()
            .await
            .map_err(|e| api_error("get Podman system info", None, e))?;
        Ok(EngineInfo {
            version: format!("podman {}", version.version.unwrap_or_default()),
            api_version: version.api_version.unwrap_or_default(),
            endpoint: endpoint.socket.display().to_string(),
            managed: endpoint.managed,
            runtime: self.shared.runtime.name.clone(),
            runtime_reason: self.shared.runtime.reason.clone(),
            cgroup_version: self.cgroup.to_string(),
            storage_driver: info.driver.unwrap_or_default(),
        })
    }

    async fn image_inspect(&self, reference: &str) -> EngineResult<Option<ImageInfo>> {
        images::inspect(&self.docker(), reference).await
    }

    async fn image_pull(&self, reference: &str, progress: ProgressSink) -> EngineResult<ImageInfo> {
        images::pull(&self.docker(), reference, progress).await
    }

    async fn image_build(&self, spec: BuildSpec, progress: ProgressSink) -> EngineResult<ImageInfo> {
        images::build(&self.docker(), spec, progress).await
    }

    async fn image_import(
        &self,
        rootfs_tar: PathBuf,
        reference: &str,
        progress: ProgressSink,
    ) -> EngineResult<ImageInfo> {
        images::import(&self.docker(), rootfs_tar, reference, progress).await
    }

    async fn image_remove(&self, reference: &str) -> EngineResult<()> {
        images::remove(&self.docker(), reference).await
    }

    async fn image_commit(&self, container: &str, reference: &str, labels: Labels) -> EngineResult<ImageInfo> {
        images::commit(&self.docker(), container, reference, labels).await
    }

    async fn image_repair(&self) -> EngineResult<Vec<String>> {
        images::repair(&self.docker()).await
    }

    async fn image_tag(&self, source: &str, reference: &str) -> EngineResult<()> {
        images::tag(&self.docker(), source, reference).await
    }

    async fn container_create(&self, spec: &ContainerSpec) -> EngineResult<String> {
        containers::create(&self.docker(), &self.shared.runtime.name, spec).await
    }

    async fn container_start(&self, id: &str) -> EngineResult<()> {
        containers::start(&self.docker(), id).await
    }

    async fn container_stop(&self, id: &str, timeout_secs: u32) -> EngineResult<()> {
        containers::stop(&self.docker(), id, timeout_secs).await
    }

    async fn container_remove(&self, id: &str) -> EngineResult<()> {
        containers::remove(&self.docker(), id).await
    }

    async fn container_rename(&self, id: &str, name: &str) -> EngineResult<()> {
        containers::rename(&self.docker(), id, name).await
    }

    async fn container_pause(&self, id: &str) -> EngineResult<()> {
        containers::pause(&self.docker(), id).await
    }

    async fn container_unpause(&self, id: &str) -> EngineResult<()> {
        containers::unpause(&self.docker(), id).await
    }

    async fn container_inspect(&self, id: &str) -> EngineResult<Option<ContainerInfo>> {
        containers::inspect(&self.libpod(), id).await
    }

    async fn container_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>> {
        containers::list(&self.libpod(), labels).await
    }

    async fn container_stats(&self, id: &str) -> EngineResult<ContainerStats> {
        containers::stats(&self.docker(), id).await
    }

    async fn container_cpu_ns(&self, id: &str) -> EngineResult<u64> {
        containers::cpu_ns(&self.docker(), id).await
    }

    async fn exec(&self, id: &str, spec: ExecSpec, output: mpsc::Sender<OutputChunk>) -> EngineResult<i64> {
        exec::exec(&self.docker(), id, spec, output).await
    }

    async fn copy_in(&self, id: &str, dir: &str, archive: ByteStream) -> EngineResult<()> {
        copy::copy_in(&self.docker(), id, dir, archive).await
    }

    async fn copy_out(&self, id: &str, path: &str) -> EngineResult<ByteStream> {
        copy::copy_out(&self.docker(), id, path).await
    }

    async fn network_create(&self, spec: &NetworkSpec) -> EngineResult<()> {
        networks::create(&self.libpod(), spec).await
    }

    async fn network_remove(&self, name: &str) -> EngineResult<()> {
        networks::remove(&self.libpod(), name).await
    }

    async fn network_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>> {
        networks::list(&self.libpod(), labels).await
    }
}
