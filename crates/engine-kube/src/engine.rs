//! The core's [`Engine`] over a Kubernetes API server (kube-rs): a container is a workspace
//! Pod (with its PVC and NetworkPolicy), or in agent-sandbox mode a SandboxClaim whose Pod
//! conductor adopts. Exec and files use the Pod's exec subresource. Images are the cluster's
//! business: its nodes pull them; building, importing and committing are refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use conductor_core::config::{KubeMode, KubernetesConfig};
use conductor_core::engine::{
    BuildSpec, ByteStream, ContainerInfo, ContainerSpec, ContainerStats, ContainerStatus, ContainerSummary, Engine,
    EngineError, EngineInfo, EngineResult, ExecSpec, ImageInfo, Labels, NetworkSpec, NetworkSummary, OutputChunk,
    Progress, ProgressSink,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, AttachParams, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::plan::{PodPlan, WORKSPACE_CONTAINER};
use crate::render;
use crate::sandbox::{self, Sandbox, SandboxClaim, SandboxTemplate, SandboxWarmPool};
use crate::snapshot::VolumeSnapshot;

/// Annotation of a workspace PVC holding the Pod's manifest, so a stopped workspace (its Pod
/// deleted, its data kept) starts again as the same Pod.
pub const ANNOTATION_POD: &str = "conductor.io/pod";
/// How long a Pod may take to be scheduled, pull its image and start.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// A Kubernetes engine, connected.
pub struct KubeEngine {
    client: Client,
    config: KubernetesConfig,
    /// Size of a new workspace PVC (`isolated_workspace.agent_containers.volume_size`).
    volume_bytes: u64,
    endpoint: String,
    /// Claim name → Pod name (agent-sandbox mode).
    pods: Mutex<HashMap<String, String>>,
}

fn api_failed(op: impl Into<String>, e: kube::Error) -> EngineError {
    let op = op.into();
    match e {
        kube::Error::Api(s) if s.is_not_found() => EngineError::NotFound { what: op },
        kube::Error::Api(s) if s.is_forbidden() => EngineError::failed(
            op,
            format!(
                "{} (conductor's service account lacks a permission: see `conductor kube render rbac`)",
                s.message
            ),
        ),
        kube::Error::Api(s) => EngineError::failed(op, format!("{} ({})", s.message, s.reason)),
        other => EngineError::Unavailable(format!("{op}: {other}")),
    }
}

fn is_status(e: &kube::Error, f: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if f(s))
}

fn unsupported(op: &str, why: &str) -> EngineError {
    EngineError::failed(op, format!("not supported on Kubernetes: {why}"))
}

/// `sh -c` wrapper giving an exec a working directory and environment (the exec
/// subresource has neither).
pub fn exec_argv(spec: &ExecSpec) -> Vec<String> {
    if spec.workdir.is_none() && spec.env.is_empty() {
        return spec.argv.clone();
    }
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        "cd \"$1\" || exit 126; shift; exec env \"$@\"".to_string(),
        "sh".to_string(),
        spec.workdir.clone().unwrap_or_else(|| ".".into()),
    ];
    argv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// The exit code a finished exec reports in its status (`ExitCode` cause), 0 on success.
fn exit_code(status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>) -> i64 {
    let Some(s) = status else { return -1 };
    if s.status.as_deref() == Some("Success") {
        return 0;
    }
    s.details
        .and_then(|d| d.causes)
        .and_then(|causes| {
            causes
                .into_iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
                .and_then(|c| c.message.and_then(|m| m.parse().ok()))
        })
        .unwrap_or(-1)
}

fn status_of(pod: &Pod) -> (ContainerStatus, Option<i64>, bool) {
    let status = pod.status.as_ref();
    let cs = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == WORKSPACE_CONTAINER));
    let terminated = cs.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref());
    let oom = terminated.and_then(|t| t.reason.as_deref()) == Some("OOMKilled");
    let code = terminated.map(|t| i64::from(t.exit_code));
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let running = cs.and_then(|c| c.state.as_ref()).is_some_and(|s| s.running.is_some());
    let st = match phase {
        "Running" if running => ContainerStatus::Running,
        "Running" if terminated.is_some() => ContainerStatus::Exited,
        "Pending" | "Running" => ContainerStatus::Created,
        "Succeeded" | "Failed" => ContainerStatus::Exited,
        _ => ContainerStatus::Other,
    };
    (st, code, oom)
}

/// Why a Pod cannot start (an image that cannot be pulled, a rejected spec), if it says so.
fn start_failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let all = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in all {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or("");
            if matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
            ) {
                return Some(format!(
                    "container {}: {reason}: {}",
                    c.name,
                    w.message.as_deref().unwrap_or("")
                ));
            }
        }
    }
    None
}

impl KubeEngine {
    /// Connects with `engine.kubernetes` (kubeconfig, context) or the in-cluster account.
    pub async fn connect(config: &KubernetesConfig, volume_bytes: u64) -> EngineResult<KubeEngine> {
        let options = KubeConfigOptions {
            context: config.context.clone(),
            ..Default::default()
        };
        let kc = match &config.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| EngineError::Unavailable(format!("read kubeconfig {path}: {e}")))?;
                Config::from_custom_kubeconfig(kc, &options).await
            }
            None if config.context.is_some() => Config::from_kubeconfig(&options).await,
            None => Config::infer().await.map_err(|e| {
                kube::config::KubeconfigError::ReadConfig(std::io::Error::other(e.to_string()), "".into())
            }),
        }
        .map_err(|e| EngineError::Unavailable(format!("Kubernetes credentials: {e}")))?;
        let endpoint = kc.cluster_url.to_string();
        let client = Client::try_from(kc).map_err(|e| EngineError::Unavailable(format!("Kubernetes client: {e}")))?;
        Ok(KubeEngine {
            client,
            config: config.clone(),
            volume_bytes,
            endpoint,
            pods: Mutex::new(HashMap::new()),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Creates `obj`; an existing object of that name is kept (idempotent creates).
    async fn create_kept<K>(&self, obj: &K, what: &str) -> EngineResult<()>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        match self.api::<K>().create(&PostParams::default(), obj).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, |s| s.is_already_exists()) => Ok(()),
            Err(e) => Err(api_failed(format!("create {what}"), e)),
        }
    }

    async fn delete_quiet<K>(&self, name: &str, grace: u32, what: &str) -> EngineResult<()>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let dp = DeleteParams {
            grace_period_seconds: Some(grace),
            ..Default::default()
        };
        match self.api::<K>().delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, |s| s.is_not_found()) => Ok(()),
            Err(e) => Err(api_failed(format!("delete {what} '{name}'"), e)),
        }
    }

    /// The Pod behind a container id: the id itself, or in agent-sandbox mode the Pod of the
    /// Sandbox the claim got.
    async fn pod_name(&self, id: &str) -> EngineResult<Option<String>> {
        if self.config.mode == KubeMode::Pod {
            return Ok(Some(id.to_string()));
        }
        if let Some(p) = self.pods.lock().expect("pods").get(id) {
            return Ok(Some(p.clone()));
        }
        let claim = self
            .api::<SandboxClaim>()
            .get_opt(id)
            .await
            .map_err(|e| api_failed(format!("read SandboxClaim '{id}'"), e))?;
        let Some(sb) = claim.and_then(|c| c.status).and_then(|s| s.sandbox.name) else {
            return Ok(None);
        };
        let Some(sandbox) = self
            .api::<Sandbox>()
            .get_opt(&sb)
            .await
            .map_err(|e| api_failed(format!("read Sandbox '{sb}'"), e))?
        else {
            return Ok(None);
        };
        let pod = sandbox::pod_name(&sandbox);
        self.pods.lock().expect("pods").insert(id.to_string(), pod.clone());
        Ok(Some(pod))
    }

    async fn require_pod(&self, id: &str) -> EngineResult<String> {
        self.pod_name(id).await?.ok_or_else(|| EngineError::NotFound {
            what: format!("workspace Pod '{id}'"),
        })
    }

    async fn create_pod_objects(&self, plan: &PodPlan) -> EngineResult<String> {
        let policy = render::workspace_network_policy(plan, &self.config);
        self.create_kept(&policy, "NetworkPolicy").await?;
        let pod = render::pod(plan);
        if let Some(mut pvc) = render::pvc(plan) {
            let manifest = serde_json::to_string(&pod).map_err(|e| EngineError::failed("encode Pod", e))?;
            pvc.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(ANNOTATION_POD.into(), manifest);
            self.create_kept(&pvc, "PersistentVolumeClaim").await?;
        }
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| api_failed(format!("create Pod '{}'", plan.name), e))?;
        Ok(plan.name.clone())
    }

    async fn create_claim(&self, plan: &PodPlan) -> EngineResult<String> {
        let template = sandbox::sandbox_template(plan);
        self.create_kept::<SandboxTemplate>(&template, "SandboxTemplate")
            .await?;
        self.create_kept::<SandboxWarmPool>(&sandbox::warm_pool(plan, 0), "SandboxWarmPool")
            .await?;
        self.create_kept(&sandbox::preset_network_policy(plan, &self.config), "NetworkPolicy")
            .await?;
        self.api::<SandboxClaim>()
            .create(&PostParams::default(), &sandbox::claim(plan))
            .await
            .map_err(|e| api_failed(format!("create SandboxClaim '{}'", plan.name), e))?;
        Ok(plan.name.clone())
    }

    /// Recreates the Pod of a stopped workspace from the manifest its PVC keeps.
    async fn recreate_pod(&self, id: &str) -> EngineResult<bool> {
        let claim = format!("{id}-workspace");
        let Some(pvc) = self
            .api::<PersistentVolumeClaim>()
            .get_opt(&claim)
            .await
            .map_err(|e| api_failed(format!("read PersistentVolumeClaim '{claim}'"), e))?
        else {
            return Ok(false);
        };
        let Some(manifest) = pvc.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_POD)) else {
            return Ok(false);
        };
        let pod: Pod = serde_json::from_str(manifest)
            .map_err(|e| EngineError::failed(format!("decode the Pod kept on '{claim}'"), e))?;
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| api_failed(format!("create Pod '{id}'"), e))?;
        Ok(true)
    }

    async fn wait_pod<F>(&self, name: &str, what: &str, done: F) -> EngineResult<()>
    where
        F: Fn(Option<&Pod>) -> Result<bool, String>,
    {
        let begin = Instant::now();
        loop {
            let pod = self
                .api::<Pod>()
                .get_opt(name)
                .await
                .map_err(|e| api_failed(format!("read Pod '{name}'"), e))?;
            match done(pod.as_ref()) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => return Err(EngineError::failed(format!("{what} Pod '{name}'"), why)),
            }
            if begin.elapsed() > START_TIMEOUT {
                return Err(EngineError::failed(
                    format!("{what} Pod '{name}'"),
                    format!("not done after {} s", START_TIMEOUT.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs `argv` in the workspace container, returning the attached process.
    async fn attach(&self, id: &str, argv: Vec<String>, stdin: bool) -> EngineResult<kube::api::AttachedProcess> {
        let pod = self.require_pod(id).await?;
        let ap = AttachParams::default()
            .container(WORKSPACE_CONTAINER)
            .stdin(stdin)
            .stdout(true)
            .stderr(true);
        self.api::<Pod>()
            .exec(&pod, argv, &ap)
            .await
            .map_err(|e| api_failed(format!("exec in Pod '{pod}'"), e))
    }

    /// Takes a VolumeSnapshot of the workspace's PVC and waits until it is ready to use.
    /// Without a snapshot class, a clear "not supported".
    pub async fn snapshot_create(&self, id: &str, name: &str) -> EngineResult<()> {
        self.require_snapshot_class().await?;
        let snap =
            crate::snapshot::volume_snapshot(id, name, &self.config.namespace, self.config.snapshot_class.as_deref());
        self.api::<VolumeSnapshot>()
            .create(&PostParams::default(), &snap)
            .await
            .map_err(|e| api_failed(format!("create VolumeSnapshot '{name}'"), e))?;
        let begin = Instant::now();
        loop {
            let s = self
                .api::<VolumeSnapshot>()
                .get(name)
                .await
                .map_err(|e| api_failed(format!("read VolumeSnapshot '{name}'"), e))?;
            let st = s.status.unwrap_or_default();
            if st.ready_to_use == Some(true) {
                return Ok(());
            }
            if let Some(err) = st.error {
                return Err(EngineError::failed(format!("snapshot '{name}'"), err));
            }
            if begin.elapsed() > START_TIMEOUT {
                return Err(EngineError::failed(format!("snapshot '{name}'"), "not ready in time"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Replaces the workspace's data by a snapshot's: the Pod is deleted, the PVC made again
    /// from the snapshot, and the Pod started again.
    pub async fn snapshot_restore(&self, id: &str, name: &str) -> EngineResult<()> {
        let claim = format!("{id}-workspace");
        let old = self
            .api::<PersistentVolumeClaim>()
            .get(&claim)
            .await
            .map_err(|e| api_failed(format!("read PersistentVolumeClaim '{claim}'"), e))?;
        self.delete_quiet::<Pod>(id, 0, "Pod").await?;
        self.wait_pod(id, "delete", |p| Ok(p.is_none())).await?;
        self.delete_quiet::<PersistentVolumeClaim>(&claim, 0, "PersistentVolumeClaim")
            .await?;
        let begin = Instant::now();
        while self
            .api::<PersistentVolumeClaim>()
            .get_opt(&claim)
            .await
            .map_err(|e| api_failed(format!("read PersistentVolumeClaim '{claim}'"), e))?
            .is_some()
        {
            if begin.elapsed() > START_TIMEOUT {
                return Err(EngineError::failed(
                    format!("delete PersistentVolumeClaim '{claim}'"),
                    "still there",
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let fresh = crate::snapshot::restored_claim(&old, name);
        self.api::<PersistentVolumeClaim>()
            .create(&PostParams::default(), &fresh)
            .await
            .map_err(|e| api_failed(format!("create PersistentVolumeClaim '{claim}' from '{name}'"), e))?;
        self.container_start(id).await
    }

    pub async fn snapshot_delete(&self, name: &str) -> EngineResult<()> {
        self.delete_quiet::<VolumeSnapshot>(name, 0, "VolumeSnapshot").await
    }

    /// The snapshot class snapshots use, or why there is none.
    pub async fn require_snapshot_class(&self) -> EngineResult<String> {
        let classes = crate::cluster::snapshot_classes(&self.client)
            .await
            .map_err(|e| unsupported("take a snapshot", &e))?;
        let pick = match &self.config.snapshot_class {
            Some(name) => classes.iter().find(|c| &c.name == name),
            None => classes.iter().find(|c| c.default).or(classes.first()),
        };
        pick.map(|c| c.name.clone()).ok_or_else(|| {
            unsupported(
                "take a snapshot",
                match &self.config.snapshot_class {
                    Some(_) => "engine.kubernetes.snapshot_class names no VolumeSnapshotClass of the cluster",
                    None => "the cluster has no VolumeSnapshotClass",
                },
            )
        })
    }
}

#[async_trait]
impl Engine for KubeEngine {
    async fn ping(&self) -> EngineResult<()> {
        self.client
            .apiserver_version()
            .await
            .map(|_| ())
            .map_err(|e| EngineError::Unavailable(format!("Kubernetes API at {}: {e}", self.endpoint)))
    }

    async fn info(&self) -> EngineResult<EngineInfo> {
        let v = self
            .client
            .apiserver_version()
            .await
            .map_err(|e| EngineError::Unavailable(format!("Kubernetes API at {}: {e}", self.endpoint)))?;
        Ok(EngineInfo {
            version: format!("kubernetes {}", v.git_version),
            api_version: format!("{}.{}", v.major, v.minor),
            endpoint: self.endpoint.clone(),
            managed: false,
            runtime: "cluster".into(),
            runtime_reason: format!("namespace {}, mode {}", self.config.namespace, self.config.mode),
            cgroup_version: String::new(),
            storage_driver: self
                .config
                .storage_class
                .clone()
                .unwrap_or_else(|| "default StorageClass".into()),
        })
    }

    async fn image_inspect(&self, reference: &str) -> EngineResult<Option<ImageInfo>> {
        // The nodes pull images when a Pod starts; a missing one fails that start, by name.
        Ok(Some(ImageInfo {
            id: reference.to_string(),
            size_bytes: 0,
            labels: Labels::new(),
        }))
    }

    async fn image_pull(&self, reference: &str, progress: ProgressSink) -> EngineResult<ImageInfo> {
        progress(Progress::Line(format!(
            "{reference}: pulled by the cluster's nodes when a Pod starts"
        )));
        self.image_inspect(reference).await.map(|i| {
            i.unwrap_or(ImageInfo {
                id: reference.into(),
                size_bytes: 0,
                labels: Labels::new(),
            })
        })
    }

    async fn image_build(&self, spec: BuildSpec, _progress: ProgressSink) -> EngineResult<ImageInfo> {
        Err(unsupported(
            &format!("build image '{}'", spec.tag),
            "build it with the Podman engine and push it to a registry the cluster pulls from (engine.kubernetes.image_registry)",
        ))
    }

    async fn image_import(
        &self,
        _rootfs_tar: std::path::PathBuf,
        reference: &str,
        _progress: ProgressSink,
    ) -> EngineResult<ImageInfo> {
        Err(unsupported(
            &format!("import image '{reference}'"),
            "import it with the Podman engine and push it to a registry",
        ))
    }

    async fn image_remove(&self, reference: &str) -> EngineResult<()> {
        Err(unsupported(
            &format!("remove image '{reference}'"),
            "images live in a registry",
        ))
    }

    async fn image_commit(&self, container: &str, reference: &str, _labels: Labels) -> EngineResult<ImageInfo> {
        Err(unsupported(
            &format!("commit '{container}' as '{reference}'"),
            "a Pod's root file system cannot be committed; snapshots copy the PVC (VolumeSnapshot)",
        ))
    }

    async fn image_repair(&self) -> EngineResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn image_tag(&self, source: &str, reference: &str) -> EngineResult<()> {
        Err(unsupported(
            &format!("tag '{source}' as '{reference}'"),
            "images live in a registry",
        ))
    }

    async fn container_create(&self, spec: &ContainerSpec) -> EngineResult<String> {
        let plan = PodPlan::from_container_spec(spec, &self.config, self.volume_bytes)
            .map_err(|e| EngineError::failed(format!("create workspace Pod '{}'", spec.name), e))?;
        match self.config.mode {
            KubeMode::Pod => self.create_pod_objects(&plan).await,
            KubeMode::AgentSandbox => self.create_claim(&plan).await,
        }
    }

    async fn container_start(&self, id: &str) -> EngineResult<()> {
        if self.config.mode == KubeMode::AgentSandbox {
            // The claim's Pod comes when the controller binds a Sandbox.
            let begin = Instant::now();
            while self.pod_name(id).await?.is_none() {
                if begin.elapsed() > START_TIMEOUT {
                    return Err(EngineError::failed(
                        format!("start SandboxClaim '{id}'"),
                        "no Sandbox was bound in time (is the agent-sandbox controller running?)",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let pod = self.require_pod(id).await?;
        if self
            .api::<Pod>()
            .get_opt(&pod)
            .await
            .map_err(|e| api_failed(format!("read Pod '{pod}'"), e))?
            .is_none()
            && !self.recreate_pod(&pod).await?
        {
            return Err(EngineError::NotFound {
                what: format!("workspace Pod '{pod}'"),
            });
        }
        self.wait_pod(&pod, "start", |p| {
            let Some(p) = p else {
                return Err("it was deleted".into());
            };
            if let Some(why) = start_failure(p) {
                return Err(why);
            }
            match status_of(p).0 {
                ContainerStatus::Running => Ok(true),
                ContainerStatus::Exited => Err("it exited".into()),
                _ => Ok(false),
            }
        })
        .await
    }

    async fn container_stop(&self, id: &str, timeout_secs: u32) -> EngineResult<()> {
        // Stopping a Pod deletes it; its PVC keeps the data and the manifest to start again.
        let Some(pod) = self.pod_name(id).await? else {
            return Ok(());
        };
        self.delete_quiet::<Pod>(&pod, timeout_secs, "Pod").await?;
        self.wait_pod(&pod, "stop", |p| Ok(p.is_none())).await
    }

    async fn container_remove(&self, id: &str) -> EngineResult<()> {
        if self.config.mode == KubeMode::AgentSandbox {
            self.pods.lock().expect("pods").remove(id);
            // The claim owns its Sandbox, which owns the Pod and the PVCs.
            return self.delete_quiet::<SandboxClaim>(id, 0, "SandboxClaim").await;
        }
        self.delete_quiet::<Pod>(id, 0, "Pod").await?;
        self.delete_quiet::<PersistentVolumeClaim>(&format!("{id}-workspace"), 0, "PersistentVolumeClaim")
            .await?;
        self.delete_quiet::<NetworkPolicy>(id, 0, "NetworkPolicy").await
    }

    async fn container_rename(&self, id: &str, name: &str) -> EngineResult<()> {
        Err(unsupported(
            &format!("rename '{id}' to '{name}'"),
            "a Pod's name is fixed",
        ))
    }

    async fn container_pause(&self, id: &str) -> EngineResult<()> {
        Err(unsupported(
            &format!("pause '{id}'"),
            "Kubernetes cannot freeze a Pod; suspend it instead (its Pod is deleted, its PVC kept)",
        ))
    }

    async fn container_unpause(&self, id: &str) -> EngineResult<()> {
        Err(unsupported(&format!("resume '{id}'"), "Kubernetes cannot freeze a Pod"))
    }

    async fn container_inspect(&self, id: &str) -> EngineResult<Option<ContainerInfo>> {
        let Some(name) = self.pod_name(id).await? else {
            return Ok(None);
        };
        let Some(pod) = self
            .api::<Pod>()
            .get_opt(&name)
            .await
            .map_err(|e| api_failed(format!("read Pod '{name}'"), e))?
        else {
            return Ok(None);
        };
        let (status, exit_code, oom_killed) = status_of(&pod);
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == WORKSPACE_CONTAINER))
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        Ok(Some(ContainerInfo {
            id: id.to_string(),
            name: id.to_string(),
            image,
            status,
            pid: None,
            exit_code,
            oom_killed,
            labels: pod.metadata.labels.unwrap_or_default(),
            supervised: None,
        }))
    }

    async fn container_list(&self, labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<ContainerSummary>> {
        let selector = labels
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => (*k).to_string(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let lp = ListParams::default().labels(&selector);
        if self.config.mode == KubeMode::AgentSandbox {
            let claims = self
                .api::<SandboxClaim>()
                .list(&lp)
                .await
                .map_err(|e| api_failed("list SandboxClaims", e))?;
            let mut out = Vec::new();
            for c in claims {
                let name = c.metadata.name.clone().unwrap_or_default();
                let status = match self.container_inspect(&name).await? {
                    Some(i) => i.status,
                    None => ContainerStatus::Created,
                };
                out.push(ContainerSummary {
                    id: name.clone(),
                    name,
                    status,
                    labels: c.metadata.labels.unwrap_or_default(),
                });
            }
            return Ok(out);
        }
        let pods = self
            .api::<Pod>()
            .list(&lp)
            .await
            .map_err(|e| api_failed("list Pods", e))?;
        Ok(pods
            .into_iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                ContainerSummary {
                    id: name.clone(),
                    name,
                    status: status_of(&p).0,
                    labels: p.metadata.labels.unwrap_or_default(),
                }
            })
            .collect())
    }

    async fn container_stats(&self, id: &str) -> EngineResult<ContainerStats> {
        Err(unsupported(
            &format!("read the resource use of '{id}'"),
            "read it from the metrics API (kubectl top pod)",
        ))
    }

    async fn container_cpu_ns(&self, id: &str) -> EngineResult<u64> {
        // The workspace container's cgroup, read from inside (v2 `cpu.stat`, else v1).
        let (tx, mut rx) = mpsc::channel(16);
        let spec = ExecSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat /sys/fs/cgroup/cpu.stat 2>/dev/null || cat /sys/fs/cgroup/cpuacct/cpuacct.usage".into(),
            ],
            ..Default::default()
        };
        let code = self.exec(id, spec, tx).await?;
        let mut text = Vec::new();
        while let Some(OutputChunk::Stdout(b)) = rx.recv().await {
            text.extend_from_slice(&b);
        }
        let text = String::from_utf8_lossy(&text);
        let parsed = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("usage_usec ")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|u| u * 1000)
            })
            .or_else(|| text.trim().parse::<u64>().ok());
        match (code, parsed) {
            (0, Some(ns)) => Ok(ns),
            _ => Err(EngineError::failed(format!("read the CPU use of '{id}'"), text.trim())),
        }
    }

    async fn exec(&self, id: &str, spec: ExecSpec, output: mpsc::Sender<OutputChunk>) -> EngineResult<i64> {
        if let Some(user) = spec.user.as_deref() {
            if !matches!(user, "1000" | "1000:1000" | "agent") {
                return Err(unsupported(
                    &format!("exec as '{user}' in '{id}'"),
                    "commands in a workspace Pod run as its user (uid 1000)",
                ));
            }
        }
        let argv = exec_argv(&spec);
        let mut proc = self.attach(id, argv, spec.stdin.is_some()).await?;
        if let (Some(data), Some(mut stdin)) = (spec.stdin.clone(), proc.stdin()) {
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                let _ = stdin.shutdown().await;
            });
        }
        let status = proc.take_status();
        let pump = |r: Option<tokio::io::ReadHalf<tokio::io::SimplexStream>>,
                    out: mpsc::Sender<OutputChunk>,
                    err: bool| async move {
            let Some(mut r) = r else { return };
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let b = Bytes::copy_from_slice(&buf[..n]);
                        let chunk = if err {
                            OutputChunk::Stderr(b)
                        } else {
                            OutputChunk::Stdout(b)
                        };
                        if out.send(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let o = pump(proc.stdout(), output.clone(), false);
        let e = pump(proc.stderr(), output, true);
        tokio::join!(o, e);
        let code = match status {
            Some(s) => exit_code(s.await),
            None => -1,
        };
        let _ = proc.join().await;
        Ok(code)
    }

    async fn copy_in(&self, id: &str, dir: &str, mut archive: ByteStream) -> EngineResult<()> {
        let argv = vec![
            "tar".to_string(),
            "-x".into(),
            "--no-same-owner".into(),
            "-C".into(),
            dir.to_string(),
            "-f".into(),
            "-".into(),
        ];
        let mut proc = self.attach(id, argv, true).await?;
        let mut stdin = proc
            .stdin()
            .ok_or_else(|| EngineError::failed(format!("copy into '{id}'"), "no stdin"))?;
        let status = proc.take_status();
        let mut stderr = proc.stderr();
        let feed = async {
            while let Some(chunk) = archive.next().await {
                let chunk = chunk.map_err(|e| EngineError::failed(format!("copy into '{id}'"), e))?;
                stdin
                    .write_all(&chunk)
                    .await
                    .map_err(|e| EngineError::failed(format!("copy into '{id}'"), e))?;
            }
            stdin
                .shutdown()
                .await
                .map_err(|e| EngineError::failed(format!("copy into '{id}'"), e))
        };
        let errs = async {
            let mut s = String::new();
            if let Some(r) = stderr.as_mut() {
                let _ = r.read_to_string(&mut s).await;
            }
            s
        };
        let (fed, msg) = tokio::join!(feed, errs);
        fed?;
        let code = match status {
            Some(s) => exit_code(s.await),
            None => -1,
        };
        let _ = proc.join().await;
        if code != 0 {
            return Err(EngineError::failed(format!("copy into '{id}:{dir}'"), msg.trim()));
        }
        Ok(())
    }

    async fn copy_out(&self, id: &str, path: &str) -> EngineResult<ByteStream> {
        let p = std::path::Path::new(path);
        let parent = p.parent().map(|d| d.display().to_string()).filter(|d| !d.is_empty());
        let leaf = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let argv = vec![
            "tar".to_string(),
            "-c".into(),
            "-C".into(),
            parent.unwrap_or_else(|| "/".into()),
            "-f".into(),
            "-".into(),
            "--".into(),
            leaf,
        ];
        let mut proc = self.attach(id, argv, false).await?;
        let mut stdout = proc
            .stdout()
            .ok_or_else(|| EngineError::failed(format!("copy out of '{id}'"), "no stdout"))?;
        let status = proc.take_status();
        let mut stderr = proc.stderr();
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
        let what = format!("{id}:{path}");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdout.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let mut msg = String::new();
            if let Some(r) = stderr.as_mut() {
                let _ = r.read_to_string(&mut msg).await;
            }
            let code = match status {
                Some(s) => exit_code(s.await),
                None => -1,
            };
            if code != 0 {
                let _ = tx
                    .send(Err(std::io::Error::other(format!("copy {what}: {}", msg.trim()))))
                    .await;
            }
            let _ = proc.join().await;
        });
        Ok(Box::pin(tokio_stream_from(rx)))
    }

    async fn network_create(&self, _spec: &NetworkSpec) -> EngineResult<()> {
        // Each workspace's NetworkPolicy is made with its Pod (container_create).
        Ok(())
    }

    async fn network_remove(&self, _name: &str) -> EngineResult<()> {
        Ok(())
    }

    async fn network_list(&self, _labels: &[(&str, Option<&str>)]) -> EngineResult<Vec<NetworkSummary>> {
        Ok(Vec::new())
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_gets_its_directory_and_environment_from_a_shell() {
        let plain = ExecSpec {
            argv: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(exec_argv(&plain), ["ls"]);
        let full = ExecSpec {
            argv: vec!["python3".into(), "-c".into(), "print(1)".into()],
            workdir: Some("/workspace/src".into()),
            env: vec![("A".into(), "x y".into())],
            ..Default::default()
        };
        let argv = exec_argv(&full);
        assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
        assert_eq!(&argv[4..], ["/workspace/src", "A=x y", "python3", "-c", "print(1)"]);
    }
}
