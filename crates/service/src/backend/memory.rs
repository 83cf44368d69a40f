//! An in-memory backend for unit tests of the service's decisions (feature `testing`).
//!
//! [`MemoryEngine`] keeps containers, images and networks in maps and answers exec from a
//! script the test gives; [`MemoryVolumes`] makes plain directories; [`NoAgents`] makes
//! every workspace go through the engine's exec. Nothing here touches Podman, mounts or
//! sockets, so a test can run a task through [`Attempt`](crate::orchestrator) and check what
//! the workflow decided (which containers it removed, which state it recorded).
//!
//! It never stands in for Podman in an integration test: every behaviour is proven against
//! real Podman in `tests/`. Operations a decision test does not need (copying files, builds
//! from a Containerfile) fail with an engine error saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conductor_core::engine::*;
use conductor_core::volume::VolumeSpec;
use conductor_core::Config;
use conductor_store::WorkspaceRecord;
use tokio::sync::mpsc;

use super::{AgentTransport, Backend, Progress, SourceUpload, VolumeStore};
use crate::agent_client::{AgentConn, AgentError};
use crate::storage_pool::CopyMethod;
use crate::volumes::DataVolume;
use crate::{Result, ServiceError};

/// What a scripted exec answers: exit code and stdout.
pub type ExecScript = Arc<dyn Fn(&str, &ExecSpec) -> (i64, String) + Send + Sync>;

/// One container the memory engine holds.
#[derive(Debug, Clone)]
pub struct MemoryContainer {
    pub id: String,
    pub spec: ContainerSpec,
    pub status: ContainerStatus,
}

#[derive(Default)]
struct State {
    containers: Vec<MemoryContainer>,
    networks: Vec<NetworkSpec>,
    images: BTreeMap<String, ImageInfo>,
    /// Every exec's (container, argv), in order.
    execs: Vec<(String, Vec<String>)>,
}

/// Containers, images and networks in memory.
pub struct MemoryEngine {
    state: Mutex<State>,
    next: AtomicU64,
    script: Mutex<ExecScript>,
    /// Answer every image reference as present (no builds needed).
    all_images_present: bool,
    /// Refuse every container create with this message (an engine failure).
    refuse_creates: Mutex<Option<String>>,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        MemoryEngine {
            state: Mutex::default(),
            next: AtomicU64::new(1),
            script: Mutex::new(Arc::new(|_, _| (0, String::new()))),
            all_images_present: true,
            refuse_creates: Mutex::new(None),
        }
    }
}

impl MemoryEngine {
    /// An engine that has no image but those pulled or committed into it.
    pub fn without_images() -> Self {
        MemoryEngine {
            all_images_present: false,
            ..Default::default()
        }
    }

    /// Makes every container create fail with `message` (`None`: succeed again).
    pub fn refuse_creates(&self, message: Option<&str>) {
        *self.refuse_creates.lock().unwrap() = message.map(str::to_string);
    }

    /// Sets what exec answers from now on.
    pub fn script(&self, script: impl Fn(&str, &ExecSpec) -> (i64, String) + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn containers(&self) -> Vec<MemoryContainer> {
        self.state.lock().unwrap().containers.clone()
    }

    pub fn networks(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .networks
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// Every exec's (container, argv) so far.
    pub fn execs(&self) -> Vec<(String, Vec<String>)> {
        self.state.lock().unwrap().execs.clone()
    }

    /// Sets a container's status as if its process changed (e.g. died: `Exited`).
    pub fn set_status(&self, id: &str, status: ContainerStatus) {
        let mut s = self.state.lock().unwrap();
        if let Some(c) = s.containers.iter_mut().find(|c| c.id == id || c.spec.name == id) {
            c.status = status;
        }
    }

    /// Adds a container made outside the workflows (an orphan for reconcile to find).
    pub fn add_container(&self, spec: ContainerSpec, status: ContainerStatus) -> String {
        let id = format!("mem{:08}", self.next.fetch_add(1, Ordering::Relaxed));
        self.state.lock().unwrap().containers.push(MemoryContainer {
            id: id.clone(),
            spec,
            status,
        });
        id
    }

    /// Drops a container as if it vanished behind the engine's back.
    pub fn forget_container(&self, id: &str) {
        self.state
            .lock()
            .unwrap()
            .containers
            .retain(|c| c.id != id && c.spec.name != id);
    }

    /// Adds a network made outside the workflows.
    pub async fn network_create_for_test(&self, spec: NetworkSpec) {
        self.state.lock().unwrap().networks.push(spec);
    }

    fn find<'a>(s: &'a mut State, id: &str) -> EngineResult<&'a mut MemoryContainer> {
        s.containers
            .iter_mut()
            .find(|c| c.id == id || c.spec.name == id)
            .ok_or_else(|| EngineError::NotFound {
                what: format!("container '{id}'"),
            })
    }

    fn image(reference: &str, labels: Labels) -> ImageInfo {
        ImageInfo {
            id: format!("sha256:{:x}", reference.len()),
            size_bytes: 1 << 20,
            labels,
        }
    }
}

fn matches(labels: &Labels, filter: &[(&str, Option<&str>)]) -> bool {
    filter.iter().all(|(k, v)| match v {
        Some(v) => labels.get(*k).map(String::as_str) == Some(*v),
        None => labels.contains_key(*k),
    })
}

fn not_modelled(op: &str) -> EngineError {
    EngineError::failed(op, "not modelled by the in-memory engine")
}

#[async_trait]
impl Engine for MemoryEngine {
    async fn ping(&self) -> EngineResult<()> {
        Ok(())
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        Err(not_modelled("read engine info"))
    }

    async fn image_inspect(&self, reference: &str) -> EngineResult<Option<ImageInfo>> {
        let s = self.state.lock().unwrap();
        Ok(s.images
            .get(reference)
            .cloned()
            .or_else(|| self.all_images_present.then(|| Self::image(reference, Labels::new()))))
    }

    async fn image_pull(&self, reference: &str, _: ProgressSink) -> EngineResult<ImageInfo> {
        let info = Self::image(reference, Labels::new());
        self.state.lock().unwrap().images.insert(reference.into(), info.clone());
        Ok(info)
    }

    async fn image_build(&self, spec: BuildSpec, _: ProgressSink) -> EngineResult<ImageInfo> {
        Err(not_modelled(&format!("build image '{}'", spec.tag)))
    }

    async fn image_import(&self, _: PathBuf, reference: &str, _: ProgressSink) -> EngineResult<ImageInfo> {
        Err(not_modelled(&format!("import image '{reference}'")))
    }

    async fn image_remove(&self, reference: &str) -> EngineResult<()> {
        self.state.lock().unwrap().images.remove(reference);
        Ok(())
    }

    async fn image_commit(&self, container: &str, reference: &str, labels: Labels) -> EngineResult<ImageInfo> {
        let mut s = self.state.lock().unwrap();
        Self::find(&mut s, container)?;
        let info = Self::image(reference, labels);
        s.images.insert(reference.into(), info.clone());
        Ok(info)
    }

    async fn image_repair(&self) -> EngineResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn image_tag(&self, source: &str, reference: &str) -> EngineResult<()> {
        let mut s = self.state.lock().unwrap();
        let info = s.images.get(source).cloned().ok_or_else(|| EngineError::NotFound {
            what: format!("image '{source}'"),
        })?;
        s.images.insert(reference.into(), info);
        Ok(())
    }

    async fn container_create(&self, spec: &ContainerSpec) -> EngineResult<String> {
        if let Some(message) = self.refuse_creates.lock().unwrap().clone() {
            return Err(EngineError::failed(
                format!("create container '{}'", spec.name),
                message,
            ));
        }
        let mut s = self.state.lock().unwrap();
        if s.containers.iter().any(|c| c.spec.name == spec.name) {
            return Err(EngineError::failed(
                format!("create container '{}'", spec.name),
                "the name is already in use",
            ));
        }
        let id = format!("mem{:08}", self.next.fetch_add(1, Ordering::Relaxed));
        s.containers.push(MemoryContainer {
            id: id.clone(),
            spec: spec.clone(),
            status: ContainerStatus::Created,
        });
        Ok(id)
    }

    async fn container_start(&self, id: &str) -> EngineResult<()> {
        Self::find(&mut self.state.lock().unwrap(), id)?.status = ContainerStatus::Running;
        Ok(())
    }

    async fn container_stop(&self, id: &str, _: u32) -> EngineResult<()> {
        Self::find(&mut self.state.lock().unwrap(), id)?.status = ContainerStatus::Exited;
        Ok(())
    }

    async fn container_remove(&self, id: &str) -> EngineResult<()> {
        self.state
            .lock()
            .unwrap()
            .containers
            .retain(|c| c.id != id && c.spec.name != id);
        Ok(())
    }

    async fn container_rename(&self, id: &str, name: &str) -> EngineResult<()> {
        Self::find(&mut self.state.lock().unwrap(), id)?.spec.name = name.into();
        Ok(())
    }

    async fn container_pause(&self, id: &str) -> EngineResult<()> {
        Self::find(&mut self.state.lock().unwrap(), id)?.status = ContainerStatus::Paused;
        Ok(())
    }

    async fn container_unpause(&self, id: &str) -> EngineResult<()> {
        Self::find(&mut self.state.lock().unwrap(), id)?.status = ContainerStatus::Running;
        Ok(())
    }

    async fn container_inspect(&self, id: &str) -> EngineResult<Option<ContainerInfo>> {
        let mut s = self.state.lock().unwrap();
        Ok(Self::find(&mut s, id).ok().map(|c| ContainerInfo {
            id: c.id.clone(),
            name: c.spec.name.clone(),
            image: c.spec.image.clone(),
            status: c.status,
            pid: None,
            exit_code: (c.status == ContainerStatus::Exited).then_some(0),
            oom_killed: false,
            labels: c.spec.labels.clone(),
            supervised: (c.status == ContainerStatus::Running).then_some(true),
        }))
    }

    async fn container_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>> {
        let s = self.state.lock().unwrap();
        Ok(s.containers
            .iter()
            .filter(|c| matches(&c.spec.labels, labels))
            .map(|c| ContainerSummary {
                id: c.id.clone(),
                name: c.spec.name.clone(),
                status: c.status,
                labels: c.spec.labels.clone(),
            })
            .collect())
    }

    async fn container_stats(&self, id: &str) -> EngineResult<ContainerStats> {
        Self::find(&mut self.state.lock().unwrap(), id)?;
        Ok(ContainerStats::default())
    }

    async fn container_cpu_ns(&self, id: &str) -> EngineResult<u64> {
        Self::find(&mut self.state.lock().unwrap(), id)?;
        Ok(0)
    }

    async fn exec(&self, id: &str, spec: ExecSpec, output: mpsc::Sender<OutputChunk>) -> EngineResult<i64> {
        {
            let mut s = self.state.lock().unwrap();
            let c = Self::find(&mut s, id)?;
            if c.status != ContainerStatus::Running {
                return Err(EngineError::failed(
                    format!("exec in container '{id}'"),
                    "the container is not running",
                ));
            }
            s.execs.push((id.to_string(), spec.argv.clone()));
        }
        let script = self.script.lock().unwrap().clone();
        let (code, stdout) = script(id, &spec);
        if !stdout.is_empty() {
            let _ = output.send(OutputChunk::Stdout(stdout.into())).await;
        }
        Ok(code)
    }

    async fn copy_in(&self, id: &str, dir: &str, _: ByteStream) -> EngineResult<()> {
        Err(not_modelled(&format!("copy into '{id}:{dir}'")))
    }

    async fn copy_out(&self, id: &str, path: &str) -> EngineResult<ByteStream> {
        Err(not_modelled(&format!("copy '{id}:{path}' out")))
    }

    async fn network_create(&self, spec: &NetworkSpec) -> EngineResult<()> {
        self.state.lock().unwrap().networks.push(spec.clone());
        Ok(())
    }

    async fn network_remove(&self, name: &str) -> EngineResult<()> {
        self.state.lock().unwrap().networks.retain(|n| n.name != name);
        Ok(())
    }

    async fn network_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>> {
        let s = self.state.lock().unwrap();
        Ok(s.networks
            .iter()
            .filter(|n| matches(&n.labels, labels))
            .map(|n| NetworkSummary {
                name: n.name.clone(),
                subnets: n.subnet.iter().cloned().collect(),
                labels: n.labels.clone(),
            })
            .collect())
    }
}

/// Volumes as plain directories (no size limit, no snapshots).
#[derive(Debug, Default)]
pub struct MemoryVolumes;

#[async_trait]
impl VolumeStore for MemoryVolumes {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn open(&self, dir: &Path) -> DataVolume {
        DataVolume {
            dir: dir.to_path_buf(),
            limited: false,
        }
    }

    async fn prepare(&self, dir: &Path, _: u64, _: Option<u64>, sub_volumes: &[String]) -> Result<DataVolume> {
        let vol = self.open(dir);
        for d in std::iter::once(vol.workspace_dir()).chain(sub_volumes.iter().map(|n| vol.sub_volume(n))) {
            std::fs::create_dir_all(&d).map_err(|e| ServiceError::host(format!("create {}", d.display()), e))?;
        }
        Ok(vol)
    }

    async fn detach(&self, _: &DataVolume) -> Result<()> {
        Ok(())
    }

    async fn destroy(&self, vol: &DataVolume) -> Result<()> {
        match std::fs::remove_dir_all(&vol.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ServiceError::host(format!("remove {}", vol.dir.display()), e))
            }
            _ => Ok(()),
        }
    }

    async fn capture(&self, vol: &DataVolume, _: &Path) -> Result<CopyMethod> {
        Err(ServiceError::Conflict(format!(
            "the in-memory volume {} cannot be snapshotted",
            vol.dir.display()
        )))
    }

    async fn thaw(&self, _: &DataVolume) {}

    async fn stage(&self, vol: &DataVolume, _: &Path) -> Result<()> {
        self.capture(vol, Path::new("")).await.map(|_| ())
    }

    async fn replace(&self, vol: &DataVolume) -> Result<()> {
        self.stage(vol, Path::new("")).await
    }

    async fn create_from(&self, dir: &Path, _: &Path) -> Result<CopyMethod> {
        self.capture(&self.open(dir), Path::new("")).await
    }

    fn usage(&self, _: &DataVolume) -> Option<(u64, u64)> {
        None
    }

    fn attached_under(&self, _: &Path) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// No agent anywhere: every command goes through the engine's exec.
#[derive(Debug, Default)]
pub struct NoAgents;

#[async_trait]
impl AgentTransport for NoAgents {
    fn available(&self, _: &Config) -> bool {
        false
    }

    fn container_setup(&self, _: &Config, _: &str) -> Result<Option<(Vec<Mount>, Vec<String>)>> {
        Ok(None)
    }

    async fn wait_ready(&self, _: &str) -> bool {
        false
    }

    fn is_set_up(&self, _: &str) -> bool {
        false
    }

    async fn connect(&self, _: &str) -> Result<AgentConn, AgentError> {
        Err(AgentError::Unavailable("no agent in the in-memory backend".into()))
    }

    fn remove(&self, _: &str) {}

    fn known(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `source` is not copied; the upload is recorded.
#[derive(Debug, Default)]
pub struct RecordedUploads {
    pub placed: Mutex<Vec<(String, Option<String>)>>,
}

#[async_trait]
impl SourceUpload for RecordedUploads {
    async fn place(
        &self,
        ws: &WorkspaceRecord,
        _: &DataVolume,
        _: &[VolumeSpec],
        source: Option<&str>,
        _: &dyn Progress,
    ) -> Result<()> {
        self.placed
            .lock()
            .unwrap()
            .push((ws.id.clone(), source.map(str::to_string)));
        Ok(())
    }
}

impl Backend {
    /// The in-memory backend over `engine`.
    pub fn memory(engine: Arc<MemoryEngine>) -> Backend {
        Backend {
            engine,
            volumes: Arc::new(MemoryVolumes),
            agents: Arc::new(NoAgents),
            sources: Arc::new(RecordedUploads::default()),
        }
    }
}

/// A conductor over the in-memory backend, with its data in a fresh temporary directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub engine: Arc<MemoryEngine>,
    pub c: Arc<crate::Conductor>,
}

/// [`Env`] with `extra` configuration YAML (top-level keys other than `storage`).
pub fn env(extra: &str, engine: MemoryEngine) -> Env {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = Config::parse(&format!("storage:\n  base_path: {}\n{extra}", dir.path().display()))
        .expect("a valid test configuration")
        .config;
    let paths = config.storage.resolve(dir.path());
    for d in [&paths.base, &paths.workspaces, &paths.snapshots, &paths.logs] {
        std::fs::create_dir_all(d).expect("the data directories");
    }
    let store = Arc::new(conductor_store::Store::open(&paths.database).expect("the store"));
    let instance = store.instance_id().expect("the instance id");
    let engine = Arc::new(engine);
    let seccomp = paths.base.join("seccomp.json");
    let c = crate::Conductor::with_backend(config, paths, Backend::memory(engine.clone()), store, instance, seccomp);
    Env {
        dir,
        engine,
        c: Arc::new(c),
    }
}
