//! The container engine seen from the core: a trait plus plain request/response types.
//!
//! The Podman adapter (`conductor-engine-podman`) implements it over Podman's REST API; a
//! Kubernetes backend could implement it later without any change here. Every method is a
//! single engine operation; workflows (create a workspace = network + container + start)
//! live in the service layer. Errors name the operation and the ids involved.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub type Labels = BTreeMap<String, String>;

/// A stream of bytes going to or coming from the engine (a tar archive); an error ends it.
pub type ByteStream = Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>>;

/// An engine failure, always naming what was being done to which object.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine itself cannot be reached or started.
    #[error("container engine unavailable: {0}")]
    Unavailable(String),
    /// The object does not exist (`what` is e.g. "container 'claude-agent-a1-3f2c'").
    #[error("{what} not found")]
    NotFound { what: String },
    /// An operation failed; `op` reads like "create container 'x' from image 'y'".
    #[error("failed to {op}: {message}")]
    Failed { op: String, message: String },
    /// An image build failed; `step` is the failing instruction, `log_tail` its last lines.
    #[error("building image '{image}' failed at step {step}\n{log_tail}")]
    BuildFailed {
        image: String,
        step: String,
        log_tail: String,
    },
}

impl EngineError {
    pub fn failed(op: impl Into<String>, message: impl ToString) -> Self {
        EngineError::Failed {
            op: op.into(),
            message: message.to_string(),
        }
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, EngineError::NotFound { .. })
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// Facts about the engine, for `conductor doctor`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Engine name and version, e.g. "podman 4.3.1".
    pub version: String,
    pub api_version: String,
    /// Where the API is reached (socket path) and whether conductor started it.
    pub endpoint: String,
    pub managed: bool,
    /// OCI runtime used for containers, and why it was picked.
    pub runtime: String,
    pub runtime_reason: String,
    pub cgroup_version: String,
    pub storage_driver: String,
}

/// A file system mount inside a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mount {
    /// A host directory or file.
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
    },
    /// A tmpfs, e.g. `/tmp` with `size_bytes` and options like `noexec,nosuid,nodev`.
    Tmpfs {
        target: String,
        size_bytes: u64,
        options: Vec<String>,
    },
}

impl Mount {
    /// Where the mount appears in the container.
    pub fn target(&self) -> &str {
        match self {
            Mount::Bind { target, .. } | Mount::Tmpfs { target, .. } => target,
        }
    }
}

/// Which network namespace a container gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkAttachment {
    /// Loopback only.
    None,
    /// Attach to a network made with [`Engine::network_create`].
    Network(String),
    /// Share the network namespace of another container (sidecars).
    Container(String),
}

/// Hard resource limits of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory limit; swap is disabled (memory+swap equals memory).
    pub memory_bytes: u64,
    /// CPU quota in billionths of a CPU.
    pub nano_cpus: i64,
    pub pids: u32,
    /// `nofile` and `nproc` ulimits (soft = hard). Always set: Podman's defaults exceed the
    /// hard limits of some hosts and the container would fail to start.
    pub nofile: u32,
    pub nproc: u32,
}

/// Hardening applied to a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityOptions {
    pub cap_drop_all: bool,
    pub no_new_privileges: bool,
    /// Host path of a seccomp profile (JSON); `None` uses the engine's default.
    pub seccomp_profile: Option<PathBuf>,
    pub readonly_rootfs: bool,
}

/// Everything needed to create one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: Labels,
    /// Validated `NAME`/value pairs; never a bare name.
    pub env: Vec<(String, String)>,
    /// Overrides the image's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// Overrides the image's command when set.
    pub cmd: Option<Vec<String>>,
    /// `uid[:gid]`; `None` keeps the image's user.
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub hostname: Option<String>,
    pub mounts: Vec<Mount>,
    pub network: NetworkAttachment,
    /// Extra `/etc/hosts` entries (name, address).
    pub extra_hosts: Vec<(String, String)>,
    /// Ports published on 127.0.0.1: (container port, host port).
    pub published_ports: Vec<(u16, u16)>,
    pub limits: ResourceLimits,
    pub security: SecurityOptions,
}

/// Coarse container status as reported by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Exited,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub status: ContainerStatus,
    /// Host pid of the container's init process while running.
    pub pid: Option<u32>,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub labels: Labels,
    /// Whether the engine still supervises the running container (Podman: its `conmon` is
    /// alive). `Some(false)` means the engine will record neither its exit nor its output,
    /// and may fail to stop it. `None` when it is not running or the engine cannot tell.
    #[serde(default)]
    pub supervised: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub status: ContainerStatus,
    pub labels: Labels,
}

/// A point-in-time resource reading of a running container.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerStats {
    /// CPU use over the sampling interval, in percent of one CPU.
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub pids_limit: u64,
}

/// A command to run in a running container.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub env: Vec<(String, String)>,
    /// Written to the command's stdin, which is then closed.
    pub stdin: Option<Bytes>,
}

/// A piece of a command's output, delivered as it is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub size_bytes: u64,
    pub labels: Labels,
}

/// An image build from a Containerfile.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    /// Tag of the result, e.g. `localhost/conductor/python-dev:3f2a9c1d0b7e`.
    pub tag: String,
    pub containerfile: String,
    /// Extra files of the build context: (relative path, content, unix mode).
    pub context_files: Vec<(String, Vec<u8>, u32)>,
    pub build_args: BTreeMap<String, String>,
    pub labels: Labels,
    /// Give RUN steps the host network (package mirrors); never used at run time.
    pub host_network: bool,
}

/// Progress of a long engine operation (build, pull, import).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A build step started: "STEP 3/7: RUN apt-get …".
    Step { index: u32, total: u32, text: String },
    /// A line of build output or a pull status line.
    Line(String),
}

/// Receives progress events; must be cheap and must not block.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// A network that conductor creates for a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// No route out of the network.
    pub internal: bool,
    /// Name resolution through the engine's DNS (which forwards to the host's resolver).
    pub dns: bool,
    /// `a.b.c.d/n`, or `None` for the engine's choice.
    pub subnet: Option<String>,
    pub mtu: Option<u32>,
    pub driver: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSummary {
    pub name: String,
    pub subnets: Vec<String>,
    pub labels: Labels,
}

/// A container engine. Object-safe so the service can hold an `Arc<dyn Engine>`.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Whether the engine answers now (quick; `Unavailable` with the reason when not).
    async fn ping(&self) -> EngineResult<()>;
    async fn info(&self) -> EngineResult<EngineInfo>;

    // Images
    async fn image_inspect(&self, reference: &str) -> EngineResult<Option<ImageInfo>>;
    async fn image_pull(&self, reference: &str, progress: ProgressSink) -> EngineResult<ImageInfo>;
    async fn image_build(&self, spec: BuildSpec, progress: ProgressSink) -> EngineResult<ImageInfo>;
    /// Imports a root file system tarball as an image.
    async fn image_import(
        &self,
        rootfs_tar: PathBuf,
        reference: &str,
        progress: ProgressSink,
    ) -> EngineResult<ImageInfo>;
    async fn image_remove(&self, reference: &str) -> EngineResult<()>;
    /// Commits a container's file system changes as an image (the container may be paused).
    async fn image_commit(&self, container: &str, reference: &str, labels: Labels) -> EngineResult<ImageInfo>;
    /// Removes images an interrupted commit left unreadable (Podman 4.3 records a committed
    /// image before its manifest; when its service dies in between, the record breaks every
    /// image listing). Returns their ids.
    async fn image_repair(&self) -> EngineResult<Vec<String>>;
    /// Gives the image `source` the further name `reference` (`repo:tag`). Removing one
    /// name of an image with several only drops that name.
    async fn image_tag(&self, source: &str, reference: &str) -> EngineResult<()>;

    // Containers
    /// Creates a container and returns its id.
    async fn container_create(&self, spec: &ContainerSpec) -> EngineResult<String>;
    async fn container_start(&self, id: &str) -> EngineResult<()>;
    async fn container_stop(&self, id: &str, timeout_secs: u32) -> EngineResult<()>;
    /// Removes a container (force kills it when running); a missing one is not an error.
    async fn container_remove(&self, id: &str) -> EngineResult<()>;
    /// Renames a container (running or not); its id, labels and state stay.
    async fn container_rename(&self, id: &str, name: &str) -> EngineResult<()>;
    async fn container_pause(&self, id: &str) -> EngineResult<()>;
    async fn container_unpause(&self, id: &str) -> EngineResult<()>;
    /// `Ok(None)` when the container does not exist.
    async fn container_inspect(&self, id: &str) -> EngineResult<Option<ContainerInfo>>;
    /// Containers carrying all of the given labels (a value of `None` matches any value).
    async fn container_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>>;
    async fn container_stats(&self, id: &str) -> EngineResult<ContainerStats>;
    /// CPU time all the container's processes used since it started, in nanoseconds: one
    /// reading, no sampling wait (the idle check compares two readings).
    async fn container_cpu_ns(&self, id: &str) -> EngineResult<u64>;
    /// Runs a command and streams its output into `output`; returns the exit code.
    /// Dropping the future does not kill the command: callers kill it by process group.
    async fn exec(&self, id: &str, spec: ExecSpec, output: mpsc::Sender<OutputChunk>) -> EngineResult<i64>;
    /// Unpacks the tar `archive` into the existing directory `dir` of a container (absolute,
    /// symlinks already resolved); members take the container user as owner.
    async fn copy_in(&self, id: &str, dir: &str, archive: ByteStream) -> EngineResult<()>;
    /// A tar of `path` in a container (a file, or a directory with its contents), entries
    /// named from the base name of `path`, as `docker cp` makes them.
    async fn copy_out(&self, id: &str, path: &str) -> EngineResult<ByteStream>;

    // Networks
    async fn network_create(&self, spec: &NetworkSpec) -> EngineResult<()>;
    /// Removes a network; a missing one is not an error.
    async fn network_remove(&self, name: &str) -> EngineResult<()>;
    async fn network_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>>;
}
