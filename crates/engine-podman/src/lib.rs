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
//! use conductor_engine_podman::{PodmanEngine, PodmanOptions};
//!
//! let engine = PodmanEngine::connect(PodmanOptions {
//!     socket_path: None,
//!     data_dir: "/var/lib/conductor".into(),
//!     runtime: RuntimeChoice::Auto,
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

/// How to reach Podman.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodmanOptions {
    /// An existing API socket to use when it answers; otherwise a private service is started.
    pub socket_path: Option<PathBuf>,
    /// Where the private service's socket (`podman.sock`) and log (`podman-service.log`) go.
    pub data_dir: PathBuf,
    pub runtime: RuntimeChoice,
}

/// The Podman engine. Holds the API client and, when conductor started it, the private
/// `podman system service`, which is stopped by [`PodmanEngine::shutdown`] or on drop.
#[derive(Debug)]
pub struct PodmanEngine {
    docker: Docker,
    libpod: Libpod,
    socket: PathBuf,
    service: Option<ManagedService>,
    runtime: RuntimeDecision,
    cgroup: CgroupVersion,
}

impl PodmanEngine {
    /// Connects to `socket_path` when it answers, else starts a private service in
    /// `data_dir`. Fails with `Unavailable` when Podman is missing or does not come up.
    pub async fn connect(opts: PodmanOptions) -> Result<PodmanEngine, EngineError> {
        let podman = find_in_path("podman");
        let cgroup = CgroupVersion::detect();
        let external = match &opts.socket_path {
            Some(socket) => match ping(socket).await {
                Some(docker) => Some((docker, socket.clone())),
                None => {
                    tracing::warn!(socket = %socket.display(), "configured podman socket does not answer; starting a private service");
                    None
                }
            },
            None => None,
        };
        let (docker, socket, service, runtime) = match external {
            Some((docker, socket)) => {
                let runtime = runtime::decide(opts.runtime, podman.as_deref(), cgroup).await;
                (docker, socket, None, runtime)
            }
            None => {
                let Some(podman) = podman else {
                    return Err(EngineError::Unavailable(
                        "podman is not installed: run scripts/setup.sh or apt-get install podman".into(),
                    ));
                };
                let runtime = runtime::decide(opts.runtime, Some(&podman), cgroup).await;
                let (service, docker) = ManagedService::start(&podman, &runtime.name, &opts.data_dir).await?;
                let socket = service.socket().to_path_buf();
                (docker, socket, Some(service), runtime)
            }
        };
        tracing::info!(runtime = %runtime.name, reason = %runtime.reason, "picked the OCI runtime");
        Ok(PodmanEngine {
            libpod: Libpod::new(&socket),
            docker,
            socket,
            service,
            runtime,
            cgroup,
        })
    }

    /// The OCI runtime containers run with ("runc" or "crun").
    pub fn runtime(&self) -> &str {
        &self.runtime.name
    }

    /// Stops the private service, if conductor started one (`SIGTERM`, then `SIGKILL`).
    pub async fn shutdown(mut self) -> Result<(), EngineError> {
        match self.service.take() {
            Some(service) => service.stop().await,
            None => Ok(()),
        }
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
    async fn info(&self) -> EngineResult<EngineInfo> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|e| api_error("get the Podman version", None, e))?;
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| api_error("get Podman system info", None, e))?;
        Ok(EngineInfo {
            version: format!("podman {}", version.version.unwrap_or_default()),
            api_version: version.api_version.unwrap_or_default(),
            endpoint: self.socket.display().to_string(),
            managed: self.service.is_some(),
            runtime: self.runtime.name.clone(),
            runtime_reason: self.runtime.reason.clone(),
            cgroup_version: self.cgroup.to_string(),
            storage_driver: info.driver.unwrap_or_default(),
        })
    }

    async fn image_inspect(&self, reference: &str) -> EngineResult<Option<ImageInfo>> {
        images::inspect(&self.docker, reference).await
    }

    async fn image_pull(&self, reference: &str, progress: ProgressSink) -> EngineResult<ImageInfo> {
        images::pull(&self.docker, reference, progress).await
    }

    async fn image_build(&self, spec: BuildSpec, progress: ProgressSink) -> EngineResult<ImageInfo> {
        images::build(&self.docker, spec, progress).await
    }

    async fn image_import(
        &self,
        rootfs_tar: PathBuf,
        reference: &str,
        progress: ProgressSink,
    ) -> EngineResult<ImageInfo> {
        images::import(&self.docker, rootfs_tar, reference, progress).await
    }

    async fn image_remove(&self, reference: &str) -> EngineResult<()> {
        images::remove(&self.docker, reference).await
    }

    async fn image_commit(&self, container: &str, reference: &str, labels: Labels) -> EngineResult<ImageInfo> {
        images::commit(&self.docker, container, reference, labels).await
    }

    async fn container_create(&self, spec: &ContainerSpec) -> EngineResult<String> {
        containers::create(&self.docker, &self.runtime.name, spec).await
    }

    async fn container_start(&self, id: &str) -> EngineResult<()> {
        containers::start(&self.docker, id).await
    }

    async fn container_stop(&self, id: &str, timeout_secs: u32) -> EngineResult<()> {
        containers::stop(&self.docker, id, timeout_secs).await
    }

    async fn container_remove(&self, id: &str) -> EngineResult<()> {
        containers::remove(&self.docker, id).await
    }

    async fn container_rename(&self, id: &str, name: &str) -> EngineResult<()> {
        containers::rename(&self.docker, id, name).await
    }

    async fn container_pause(&self, id: &str) -> EngineResult<()> {
        containers::pause(&self.docker, id).await
    }

    async fn container_unpause(&self, id: &str) -> EngineResult<()> {
        containers::unpause(&self.docker, id).await
    }

    async fn container_inspect(&self, id: &str) -> EngineResult<Option<ContainerInfo>> {
        containers::inspect(&self.docker, id).await
    }

    async fn container_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>> {
        containers::list(&self.libpod, labels).await
    }

    async fn container_stats(&self, id: &str) -> EngineResult<ContainerStats> {
        containers::stats(&self.docker, id).await
    }

    async fn exec(&self, id: &str, spec: ExecSpec, output: mpsc::Sender<OutputChunk>) -> EngineResult<i64> {
        exec::exec(&self.docker, id, spec, output).await
    }

    async fn copy_in(&self, id: &str, dir: &str, archive: ByteStream) -> EngineResult<()> {
        copy::copy_in(&self.docker, id, dir, archive).await
    }

    async fn copy_out(&self, id: &str, path: &str) -> EngineResult<ByteStream> {
        copy::copy_out(&self.docker, id, path).await
    }

    async fn network_create(&self, spec: &NetworkSpec) -> EngineResult<()> {
        networks::create(&self.libpod, spec).await
    }

    async fn network_remove(&self, name: &str) -> EngineResult<()> {
        networks::remove(&self.libpod, name).await
    }

    async fn network_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>> {
        networks::list(&self.libpod, labels).await
    }
}
