//! The configuration model (`config/standalone-isolated.yaml`) and its validation.
//!
//! Every key has a default, so an empty or missing file is a valid configuration. Parsing
//! happens in three steps: YAML syntax (errors carry line and column), typed
//! deserialisation (errors carry the key path, e.g.
//! `isolated_workspace.agent_containers.resources.limits.memory`), then cross-field checks
//! (limits within maxima, unique environment names, …). Unknown keys are collected as
//! warnings instead of failing, so an older conductor can read a newer file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::size::{ByteSize, Cpu};
use crate::validate;
use crate::volume::VolumeSpec;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    pub isolated_workspace: IsolatedWorkspace,
    pub podman_config: PodmanConfig,
    pub storage: Storage,
    pub network: Network,
    pub task_execution: TaskExecution,
    pub container_lifecycle: ContainerLifecycle,
    pub security: Security,
    /// Secrets the egress proxy injects into workspaces' requests (docs/egress.md).
    pub secrets: SecretsConfig,
    /// The E2B-compatible API on the API port (docs/e2b.md).
    pub e2b: E2bConfig,
    /// Which backend places workspaces: Podman on this machine, or a Kubernetes cluster
    /// (docs/kubernetes.md).
    pub engine: EngineConfig,
}

/// The `e2b` section: the E2B-compatible API (control plane and envd) on the API port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct E2bConfig {
    /// Serves the E2B API (`/sandboxes`, `/v2/sandboxes`, and envd for requests carrying
    /// `E2b-Sandbox-Id`).
    pub enabled: bool,
    /// The environment of the SDKs' default template (`base`).
    pub default_template: String,
    /// Longest sandbox lifetime a client may ask for, in seconds.
    pub max_timeout: u64,
}

impl Default for E2bConfig {
    fn default() -> Self {
        E2bConfig {
            enabled: true,
            default_template: "python-dev".into(),
            max_timeout: 86_400,
        }
    }
}

/// Which backend places workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineBackend {
    /// Podman on this machine (the default).
    #[default]
    Podman,
    /// A Kubernetes cluster (`engine.kubernetes`).
    Kubernetes,
}

impl std::fmt::Display for EngineBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineBackend::Podman => "podman",
            EngineBackend::Kubernetes => "kubernetes",
        })
    }
}

/// The `engine` section. Written either as a name (`engine: kubernetes`) or as a mapping
/// (`engine: {backend: kubernetes, kubernetes: {namespace: agents}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct EngineConfig {
    pub backend: EngineBackend,
    pub kubernetes: KubernetesConfig,
}

/// The mapping form of `engine` (what [`EngineConfig`] deserializes through).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct EngineMapping {
    backend: EngineBackend,
    kubernetes: KubernetesConfig,
}

impl<'de> Deserialize<'de> for EngineConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = EngineConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("podman, kubernetes, or a mapping with backend and kubernetes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EngineConfig, E> {
                use serde::de::IntoDeserializer;
                let backend = EngineBackend::deserialize(v.into_deserializer())?;
                Ok(EngineConfig {
                    backend,
                    ..Default::default()
                })
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<EngineConfig, E> {
                Ok(EngineConfig::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EngineConfig, A::Error> {
                let m = EngineMapping::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EngineConfig {
                    backend: m.backend,
                    kubernetes: m.kubernetes,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// How workspaces are placed on Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KubeMode {
    /// conductor creates each workspace's Pod, PVC and NetworkPolicy itself.
    #[default]
    Pod,
    /// Presets are agent-sandbox SandboxTemplates, warm pools SandboxWarmPools, and a
    /// workspace a SandboxClaim (kubernetes-sigs/agent-sandbox, `v1beta1`).
    AgentSandbox,
}

impl std::fmt::Display for KubeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KubeMode::Pod => "pod",
            KubeMode::AgentSandbox => "agent-sandbox",
        })
    }
}

/// The `engine.kubernetes` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Path of a kubeconfig file; unset: `KUBECONFIG`, `~/.kube/config`, or the in-cluster
    /// service account, in that order.
    pub kubeconfig: Option<String>,
    /// A context of the kubeconfig other than its current one.
    pub context: Option<String>,
    /// Namespace of every object conductor creates.
    pub namespace: String,
    pub mode: KubeMode,
    /// StorageClass of the workspaces' PVCs; unset: the cluster's default class.
    pub storage_class: Option<String>,
    /// VolumeSnapshotClass for snapshots; unset: the cluster's default snapshot class.
    /// Without any, snapshots are refused with "not supported".
    pub snapshot_class: Option<String>,
    /// The image holding the in-workspace agent (`/conductor-agent`), copied into each Pod
    /// by an init container.
    pub agent_image: String,
    /// Replaces the `localhost/` prefix of locally built images (presets, sidecars), e.g.
    /// `registry.example.com/conductor` (push the images there first); unset: the local
    /// references are kept (what `podman kube play` uses).
    pub image_registry: Option<String>,
    /// `Localhost` seccomp profile, relative to the kubelet's seccomp directory
    /// (`/var/lib/kubelet/seccomp`); `RuntimeDefault` uses the runtime's profile instead
    /// (the documented fallback when the profile cannot be installed on the nodes).
    pub seccomp_profile: String,
    /// `imagePullPolicy` of every container (`IfNotPresent`, `Always`, `Never`).
    pub image_pull_policy: String,
    /// The conductor egress proxy, for workspaces in proxy mode: the only destination their
    /// NetworkPolicy allows.
    pub egress_proxy: KubeEgressProxy,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            context: None,
            namespace: "conductor".into(),
            mode: KubeMode::Pod,
            storage_class: None,
            snapshot_class: None,
            agent_image: format!("localhost/conductor/agent:{}", env!("CARGO_PKG_VERSION")),
            image_registry: None,
            seccomp_profile: "conductor-seccomp.json".into(),
            image_pull_policy: "IfNotPresent".into(),
            egress_proxy: KubeEgressProxy::default(),
        }
    }
}

impl KubernetesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = "engine.kubernetes";
        validate::dns_label(&self.namespace).map_err(|m| ConfigError::invalid(format!("{p}.namespace"), m))?;
        validate::image_ref(&self.agent_image).map_err(|m| ConfigError::invalid(format!("{p}.agent_image"), m))?;
        if let Some(r) = &self.image_registry {
            validate::image_ref(r).map_err(|m| ConfigError::invalid(format!("{p}.image_registry"), m))?;
        }
        for (key, v) in [
            ("storage_class", &self.storage_class),
            ("snapshot_class", &self.snapshot_class),
        ] {
            if let Some(v) = v {
                validate::dns_subdomain(v).map_err(|m| ConfigError::invalid(format!("{p}.{key}"), m))?;
            }
        }
        let s = &self.seccomp_profile;
        if s != "RuntimeDefault"
            && (s.is_empty()
                || s.starts_with('/')
                || s.split('/').any(|c| c.is_empty() || c == "..")
                || s.contains(char::is_whitespace))
        {
            return Err(ConfigError::invalid(
                format!("{p}.seccomp_profile"),
                format!("{s:?} is neither RuntimeDefault nor a path relative to the kubelet's seccomp directory (e.g. conductor-seccomp.json)"),
            ));
        }
        if !matches!(self.image_pull_policy.as_str(), "IfNotPresent" | "Always" | "Never") {
            return Err(ConfigError::invalid(
                format!("{p}.image_pull_policy"),
                format!("{:?} is not one of IfNotPresent, Always, Never", self.image_pull_policy),
            ));
        }
        let e = &self.egress_proxy;
        validate::dns_label(&e.namespace)
            .map_err(|m| ConfigError::invalid(format!("{p}.egress_proxy.namespace"), m))?;
        if e.pod_labels.is_empty() {
            return Err(ConfigError::invalid(
                format!("{p}.egress_proxy.pod_labels"),
                "must name at least one label of the proxy's Pods",
            ));
        }
        if e.port == 0 {
            return Err(ConfigError::invalid(
                format!("{p}.egress_proxy.port"),
                "0 is not a port",
            ));
        }
        if e.host.is_empty() || e.host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
            return Err(ConfigError::invalid(
                format!("{p}.egress_proxy.host"),
                format!("{:?} is not a host name or address", e.host),
            ));
        }
        Ok(())
    }
}

/// Where workspaces in proxy mode find the egress proxy on the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeEgressProxy {
    /// Namespace of the proxy's Pods.
    pub namespace: String,
    /// Labels of the proxy's Pods (the NetworkPolicy's peer).
    pub pod_labels: BTreeMap<String, String>,
    /// Host (a Service name or an address) and port the workspace's `HTTP(S)_PROXY` names.
    pub host: String,
    pub port: u16,
}

impl Default for KubeEgressProxy {
    fn default() -> Self {
        KubeEgressProxy {
            namespace: "conductor".into(),
            pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "conductor-egress-proxy".to_string(),
            )]),
            host: "conductor-egress-proxy.conductor.svc".into(),
            port: 3128,
        }
    }
}

/// The `secrets` section: the operator's bound and the secrets registered at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// The secrets a workspace or task may name (unset: any registered one; `[]`: none).
    pub max_allow: Option<Vec<String>>,
    /// Secrets read from a file or an environment variable and registered (or updated)
    /// whenever conductor opens its state.
    pub define: Vec<SecretDefinition>,
}

/// One secret of `secrets.define`: its name, where its value comes from (exactly one of
/// `from_file`, `from_env`), and its injection rules ([`crate::secrets::InjectionRule`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretDefinition {
    pub name: String,
    /// An absolute path; the file holds the value (one trailing newline is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<PathBuf>,
    /// The environment variable of conductor's own process that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    pub rules: Vec<crate::secrets::InjectionRule>,
}

impl SecretDefinition {
    /// The name and rules, without the source.
    pub fn spec(&self) -> crate::secrets::SecretSpec {
        crate::secrets::SecretSpec {
            name: self.name.clone(),
            rules: self.rules.clone(),
        }
    }
}

impl SecretsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(bound) = &self.max_allow {
            for (i, name) in bound.iter().enumerate() {
                crate::secrets::validate_name(name)
                    .map_err(|m| ConfigError::invalid(format!("secrets.max_allow[{i}]"), m))?;
            }
        }
        let specs: Vec<crate::secrets::SecretSpec> = self.define.iter().map(SecretDefinition::spec).collect();
        crate::secrets::validate_specs(&specs, "secrets.define").map_err(|(f, m)| ConfigError::invalid(f, m))?;
        for (i, d) in self.define.iter().enumerate() {
            let field = format!("secrets.define[{i}]");
            match (&d.from_file, &d.from_env) {
                (Some(path), None) => {
                    if !path.is_absolute() {
                        return Err(ConfigError::invalid(
                            format!("{field}.from_file"),
                            format!("{:?} is not an absolute path", path.display().to_string()),
                        ));
                    }
                }
                (None, Some(var)) => {
                    validate::env_name(var).map_err(|m| ConfigError::invalid(format!("{field}.from_env"), m))?;
                }
                (None, None) => {
                    return Err(ConfigError::invalid(
                        field,
                        "needs a source: from_file (a path) or from_env (a variable name)",
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        field,
                        "set either from_file or from_env, not both",
                    ))
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IsolatedWorkspace {
    /// When false, `conductor serve` refuses isolated_execution tasks.
    pub enabled: bool,
    pub mode: Mode,
    pub agent_containers: AgentContainers,
    pub cleanup: Cleanup,
    /// Number of pre-started idle workspaces kept per environment.
    pub warm_pool: BTreeMap<String, u32>,
    pub snapshots: SnapshotRetention,
    /// Exec, file operations and tasks on a paused or suspended workspace resume it first.
    /// When false they get a 409 naming its state, and only `resume` brings it back.
    pub auto_resume: bool,
    pub fork: ForkConfig,
}

impl Default for IsolatedWorkspace {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: Mode::Sandbox,
            agent_containers: AgentContainers::default(),
            cleanup: Cleanup::default(),
            warm_pool: BTreeMap::new(),
            snapshots: SnapshotRetention::default(),
            auto_resume: true,
            fork: ForkConfig::default(),
        }
    }
}

/// How tasks get their workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A fresh workspace per task, destroyed afterwards.
    Sandbox,
    /// Tasks of one agent and environment reuse one persistent workspace.
    Shared,
    /// Shared, plus snapshot before each task and restore on error.
    Hybrid,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sandbox => "sandbox",
            Mode::Shared => "shared",
            Mode::Hybrid => "hybrid",
        }
    }
}

pub use crate::egress::Mode as NetworkMode;

/// Network given to a workspace: a mode, and in proxy mode what it may reach. Written as a
/// plain mode (`isolated`, `none`, `proxy`, `egress`) or as `{mode, allow, deny}`. Every
/// field may be left out: a layer (configuration default, environment, workspace, task)
/// changes only what it gives (see [`crate::egress::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NetworkPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetworkMode>,
    /// Allow-list entries (names, `*.suffix` wildcards, CIDRs, bundles); replaces the list of
    /// an earlier layer and implies `proxy` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Deny entries; they add up across layers and win over allow.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl NetworkPolicy {
    /// Just a mode.
    pub fn mode(mode: NetworkMode) -> Self {
        NetworkPolicy {
            mode: Some(mode),
            ..Default::default()
        }
    }

    /// Proxy mode allowing `entries`.
    pub fn allow(entries: &[&str]) -> Self {
        NetworkPolicy {
            mode: Some(NetworkMode::Proxy),
            allow: Some(entries.iter().map(|e| e.to_string()).collect()),
            deny: Vec::new(),
        }
    }

    pub fn layer(&self) -> crate::egress::PolicyLayer {
        crate::egress::PolicyLayer {
            mode: self.mode,
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }

    /// Checks every entry (`field` names this policy, e.g. `network`); bundles are the
    /// configured ones.
    pub fn validate(&self, field: &str, bundles: &BTreeMap<String, Vec<String>>) -> Result<(), (String, String)> {
        let allow = self.allow.clone().unwrap_or_default();
        crate::egress::EgressPolicy::parse(&allow, &self.deny, bundles)
            .map(|_| ())
            .map_err(|e| (format!("{field}.{}[{}]", e.list, e.index), e.message))
    }
}

impl<'de> Deserialize<'de> for NetworkPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            #[serde(default)]
            mode: Option<NetworkMode>,
            #[serde(default)]
            allow: Option<Vec<String>>,
            #[serde(default)]
            deny: Vec<String>,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = NetworkPolicy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a network mode (isolated, none, proxy, egress) or {mode, allow, deny}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NetworkPolicy, E> {
                v.parse().map(NetworkPolicy::mode).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<NetworkPolicy, A::Error> {
                let full = Full::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(NetworkPolicy {
                    mode: full.mode,
                    allow: full.allow,
                    deny: full.deny,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// How proxy mode works: the operator's bound, the bundles, limits and audit retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// The widest allow list any layer may ask for (unset: no bound). An entry outside it
    /// is refused with a 4xx naming it.
    pub max_allow: Option<Vec<String>>,
    /// Named bundles, added to (or replacing) the shipped `pypi`, `npm`, `debian`, `github`.
    pub bundles: BTreeMap<String, Vec<String>>,
    /// Port of the proxy inside the workspace (on its loopback).
    pub proxy_port: u16,
    /// Open connections a workspace may have through the proxy at once.
    pub max_connections: u32,
    /// Seconds a proxied connection may stay silent both ways.
    pub idle_timeout: u64,
    /// Seconds to connect to an upstream.
    pub connect_timeout: u64,
    /// Days the audit keeps a connection attempt.
    pub audit_retention_days: u32,
    /// Rows the audit keeps at most (the oldest go first).
    pub audit_max_rows: u64,
    /// Test-only: names resolved to these addresses instead of through DNS.
    pub resolve: BTreeMap<String, Vec<String>>,
    /// PEM files of CAs the proxy trusts for upstreams it terminates TLS for (hosts with a
    /// secret-injection rule), beside the host's trust store.
    pub upstream_ca_files: Vec<PathBuf>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            max_allow: None,
            bundles: BTreeMap::new(),
            proxy_port: 3128,
            max_connections: 64,
            idle_timeout: 300,
            connect_timeout: 10,
            audit_retention_days: 7,
            audit_max_rows: 100_000,
            resolve: BTreeMap::new(),
            upstream_ca_files: Vec::new(),
        }
    }
}

impl EgressConfig {
    /// The shipped bundles with the configured ones over them.
    pub fn bundles(&self) -> BTreeMap<String, Vec<String>> {
        crate::egress::merge_bundles(&self.bundles)
    }

    /// Checks a caller's policy: every entry parses and the allow list stays within
    /// `max_allow`. The error is `(field, message)`, the field under `field` (e.g.
    /// `network.allow[2]`).
    pub fn check(&self, field: &str, policy: &NetworkPolicy) -> Result<(), (String, String)> {
        let bundles = self.bundles();
        policy.validate(field, &bundles)?;
        if let Some(allow) = &policy.allow {
            crate::egress::check_bound(allow, self.max_allow.as_deref(), &bundles).map_err(|e| {
                (
                    format!("{field}.allow[{}]", e.index),
                    format!("{} (network.egress.max_allow is the widest allowed)", e.message),
                )
            })?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentContainers {
    /// The image presets build on. The default is made locally with debootstrap, so it
    /// works without a registry; a registry image (`debian:bookworm-slim`) is pulled.
    pub base_image: String,
    /// Keep an agent's volumes after its workspace is destroyed, for the next one.
    pub persistent_volumes: bool,
    /// Hard limit of the workspace's data volume (`/workspace` and its sub-volumes).
    pub volume_size: ByteSize,
    /// Mount the container's root filesystem read-only (`/tmp` becomes a tmpfs).
    pub readonly_rootfs: bool,
    /// Size of the `/tmp` tmpfs when `readonly_rootfs` is on.
    pub tmpfs_size: ByteSize,
    pub network: NetworkPolicy,
    /// Custom environments, added to (or replacing) the presets.
    pub environments: Vec<EnvironmentConfig>,
    pub resources: Resources,
    /// Host path of the static `conductor-agent` binary run as PID 1 of every workspace.
    /// Unset: looked for next to the `conductor` executable and in the build directory
    /// (`target/x86_64-unknown-linux-gnu/{release,debug}/`); empty: no agent (Podman exec).
    pub agent_binary: Option<String>,
}

/// The image the presets build on by default: made locally by `conductor env build`.
pub const LOCAL_BASE_IMAGE: &str = "localhost/conductor/base:bookworm";

impl Default for AgentContainers {
    fn default() -> Self {
        Self {
            base_image: LOCAL_BASE_IMAGE.into(),
            persistent_volumes: true,
            volume_size: ByteSize::gib(10),
            readonly_rootfs: false,
            tmpfs_size: ByteSize::mib(512),
            network: NetworkPolicy::mode(NetworkMode::Isolated),
            environments: Vec::new(),
            resources: Resources::default(),
            agent_binary: None,
        }
    }
}

/// A custom environment from the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct EnvironmentConfig {
    pub name: String,
    pub description: Option<String>,
    /// Use this image (local, else pulled).
    pub image: Option<String>,
    /// Build this inline Containerfile.
    pub dockerfile: Option<String>,
    /// Install these Debian packages on top of the base image.
    pub packages: Vec<String>,
    /// Named sub-volumes, `name:/absolute/path`.
    pub volumes: Vec<String>,
    pub network: Option<NetworkPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Resources {
    pub requests: Requests,
    pub limits: Limits,
    pub maximums: Maximums,
}

/// What a workspace is expected to use; used for admission (not a hard limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requests {
    pub memory: ByteSize,
    pub cpu: Cpu,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(512),
            cpu: Cpu(500),
        }
    }
}

/// Hard limits applied to every workspace unless a request lowers them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    pub memory: ByteSize,
    pub cpu: Cpu,
    pub pids: u32,
    pub nofile: u32,
    pub nproc: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: ByteSize::gib(2),
            cpu: Cpu(1000),
            pids: 512,
            nofile: 1024,
            nproc: 1024,
        }
    }
}

/// The most a caller may ask for per workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Maximums {
    pub memory: ByteSize,
    pub cpu: Cpu,
    pub pids: u32,
    pub volume_size: ByteSize,
}

impl Default for Maximums {
    fn default() -> Self {
        Self {
            memory: ByteSize::gib(8),
            cpu: Cpu(2000),
            pids: 4096,
            volume_size: ByteSize::gib(50),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cleanup {
    /// Workspaces unused for longer than this are removed (0 = never).
    pub max_age_hours: u64,
    /// At most this many workspaces hold a container at once.
    pub max_containers: u32,
    /// Keep the workspace of a failed task for debugging.
    pub preserve_on_error: bool,
    /// A running workspace idle this long is paused (its processes frozen, memory kept);
    /// off when unset. Seconds, or a string with a unit: `"90s"`, `"15m"`, `"2h"`, `"1d"`.
    #[serde(deserialize_with = "idle_after", skip_serializing_if = "Option::is_none")]
    pub idle_pause_after: Option<u64>,
    /// A running or paused workspace idle this long is suspended (its container stopped,
    /// files kept); off when unset. Same form as `idle_pause_after`, and longer than it.
    #[serde(deserialize_with = "idle_after", skip_serializing_if = "Option::is_none")]
    pub idle_suspend_after: Option<u64>,
}

impl Default for Cleanup {
    fn default() -> Self {
        Self {
            max_age_hours: 24,
            max_containers: 20,
            preserve_on_error: false,
            idle_pause_after: None,
            idle_suspend_after: None,
        }
    }
}

/// Parses an idle delay: whole seconds, or a number with the unit `s`, `m`, `h` or `d`.
/// `0`, `"0s"`, `"off"` and `null` turn it off.
pub fn parse_idle_after(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 300, \"90s\", \"15m\", \"2h\", \"1d\")"))?;
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use s, m, h or d)")),
    };
    let secs = n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too long"))?;
    Ok((secs > 0).then_some(secs))
}

fn idle_after<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(n)) => Ok((n > 0).then_some(n)),
        Some(Raw::Text(t)) => parse_idle_after(&t).map_err(serde::de::Error::custom),
    }
}

/// Retention of workspace snapshots. After each new snapshot, the oldest complete ones are
/// removed first until both limits hold again (the new one is never removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapshotRetention {
    /// Most snapshots kept per workspace.
    pub max_per_workspace: u32,
    /// Most space all snapshots together may take, counted as their reported sizes (the
    /// allocated size of each volume copy plus its root file system layer).
    pub max_total_size: ByteSize,
}

impl Default for SnapshotRetention {
    fn default() -> Self {
        Self {
            max_per_workspace: 10,
            max_total_size: ByteSize::gib(20),
        }
    }
}

/// Forks of a workspace (`POST /workspaces/{id}/fork`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ForkConfig {
    /// Most copies one fork request may make (also bounded by `cleanup.max_containers`).
    pub max_count: u32,
}

impl Default for ForkConfig {
    fn default() -> Self {
        Self { max_count: 16 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PodmanConfig {
    pub network: PodmanNetwork,
    pub security: PodmanSecurity,
    /// Images pulled (or checked) at start so the first task does not wait.
    pub preload_images: Vec<String>,
    pub runtime: RuntimeChoice,
    /// Use this Podman API socket instead of starting a private `podman system service`.
    pub socket_path: Option<String>,
    /// Host ports (on 127.0.0.1 only) that published workspace ports are taken from.
    pub container_port_range: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// crun when it works on this machine, else runc.
    #[default]
    Auto,
    Crun,
    Runc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodmanNetwork {
    /// Prefix of the networks conductor creates (`<name>-<workspace>`).
    pub name: String,
    /// Address range the per-workspace networks are carved from (a /24 or larger; each
    /// workspace gets a /28 of it... or Podman's own choice when empty).
    pub subnet: String,
    pub mtu: u32,
    pub driver: String,
}

impl Default for PodmanNetwork {
    fn default() -> Self {
        Self {
            name: "claude-dev-net".into(),
            subnet: "10.89.0.0/16".into(),
            mtu: 1500,
            driver: "bridge".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodmanSecurity {
    /// `keep-id` (the spec's value): the workspace user is uid 1000 and files it writes
    /// are owned by uid 1000 on the host.
    pub userns: String,
    /// Path of a seccomp profile to use instead of the one shipped with conductor.
    pub seccomp_profile: Option<String>,
}

impl Default for PodmanSecurity {
    fn default() -> Self {
        Self {
            userns: "keep-id".into(),
            seccomp_profile: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Storage {
    /// Root of conductor's data; `~` is the home directory of the user running conductor.
    pub base_path: String,
    pub isolated_workspaces_path: Option<String>,
    pub snapshots_path: Option<String>,
    pub logs_path: Option<String>,
    pub database_path: Option<String>,
    pub volumes: VolumeOptions,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            base_path: "~/.claude-conductor".into(),
            isolated_workspaces_path: None,
            snapshots_path: None,
            logs_path: None,
            database_path: None,
            volumes: VolumeOptions::default(),
        }
    }
}

/// The spec's `storage.volumes` block. `size=` overrides `volume_size`; `inodes=` sets the
/// inode count of each data volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VolumeOptions {
    pub driver: String,
    pub options: Vec<String>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            driver: "overlay".into(),
            options: Vec::new(),
        }
    }
}

/// Resolved absolute locations of conductor's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPaths {
    pub base: PathBuf,
    pub workspaces: PathBuf,
    pub snapshots: PathBuf,
    pub logs: PathBuf,
    pub database: PathBuf,
}

impl Storage {
    /// Expands `~` with `home` and fills the derived defaults.
    pub fn resolve(&self, home: &Path) -> DataPaths {
        let expand = |p: &str| -> PathBuf {
            if p == "~" {
                home.to_path_buf()
            } else if let Some(rest) = p.strip_prefix("~/") {
                home.join(rest)
            } else {
                PathBuf::from(p)
            }
        };
        let base = expand(&self.base_path);
        let or = |o: &Option<String>, d: &str| o.as_deref().map(expand).unwrap_or_else(|| base.join(d));
        DataPaths {
            workspaces: or(&self.isolated_workspaces_path, "isolated"),
            snapshots: or(&self.snapshots_path, "snapshots"),
            logs: or(&self.logs_path, "logs"),
            database: or(&self.database_path, "conductor.db"),
            base,
        }
    }

    fn option(&self, key: &str) -> Option<&str> {
        self.volumes
            .options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    /// Inode count requested by `storage.volumes.options: [inodes=100k]`.
    pub fn volume_inodes(&self) -> Option<u64> {
        let v = self.option("inodes")?;
        let (num, mult) = match v.strip_suffix(['k', 'K']) {
            Some(n) => (n, 1000),
            None => match v.strip_suffix(['m', 'M']) {
                Some(n) => (n, 1_000_000),
                None => (v, 1),
            },
        };
        num.parse::<u64>().ok().map(|n| n * mult)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Network {
    pub api_port: u16,
    pub bind_address: String,
    /// Largest accepted request body.
    pub max_body_size: ByteSize,
    /// Proxy mode: the allowlist proxy a workspace reaches through its agent.
    pub egress: EgressConfig,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            api_port: 8081,
            bind_address: "127.0.0.1".into(),
            max_body_size: ByteSize::mib(10),
            egress: EgressConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskExecution {
    pub max_workers: u32,
    /// Default timeout of a task, in seconds.
    pub task_timeout: u64,
    pub default_priority: u8,
    /// Retries after an infrastructure (engine) failure; a failing command is never retried.
    pub max_retries: u32,
    /// Seconds between retries.
    pub retry_delay: u64,
    /// Seconds running tasks get to finish when the service stops.
    pub shutdown_grace_period: u64,
    pub isolation: TaskIsolation,
}

impl Default for TaskExecution {
    fn default() -> Self {
        Self {
            max_workers: 4,
            task_timeout: 1800,
            default_priority: 5,
            max_retries: 2,
            retry_delay: 5,
            shutdown_grace_period: 30,
            isolation: TaskIsolation::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TaskIsolation {
    pub snapshot_before_task: bool,
    pub restore_on_error: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerLifecycle {
    /// Shell commands run in the workspace before each task's commands.
    pub pre_task: Vec<String>,
    /// Shell commands run after each task's commands (also after a failure).
    pub post_task: Vec<String>,
    /// Remove a sandbox workspace whose task failed (false keeps it for debugging).
    pub cleanup_on_failure: bool,
}

impl Default for ContainerLifecycle {
    fn default() -> Self {
        Self {
            pre_task: Vec::new(),
            post_task: Vec::new(),
            cleanup_on_failure: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Security {
    pub api_key_required: bool,
    /// File holding the bearer token (created with mode 0600 when missing).
    pub api_key_file: Option<String>,
}

/// A configuration that cannot be used. `Display` is the message shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A parsed configuration plus the warnings (unknown keys) found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

impl Config {
    /// Parses and validates the text of a configuration file.
    pub fn parse(text: &str) -> Result<Loaded, ConfigError> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let value = match value {
            serde_yaml_ng::Value::Null => serde_yaml_ng::Value::Mapping(Default::default()),
            v => v,
        };
        let mut unknown = Vec::new();
        let mut on_unknown = |path: serde_ignored::Path| unknown.push(path.to_string());
        let de = serde_ignored::Deserializer::new(value, &mut on_unknown);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { "(top level)".to_string() } else { path };
            ConfigError::invalid(path, clean_serde_message(&e.into_inner().to_string()))
        })?;
        config.validate()?;
        let warnings = unknown
            .into_iter()
            .map(|k| format!("unknown configuration key {k:?} ignored"))
            .collect();
        Ok(Loaded { config, warnings })
    }

    /// Cross-field checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.e2b.default_template.is_empty() {
            return Err(ConfigError::invalid("e2b.default_template", "must name an environment"));
        }
        if self.e2b.max_timeout == 0 {
            return Err(ConfigError::invalid("e2b.max_timeout", "must be at least 1 second"));
        }
        self.engine.kubernetes.validate()?;
        let ac = &self.isolated_workspace.agent_containers;
        let r = &ac.resources;
        let p = "isolated_workspace.agent_containers";
        validate::image_ref(&ac.base_image).map_err(|m| ConfigError::invalid(format!("{p}.base_image"), m))?;
        if r.limits.memory > r.maximums.memory {
            return Err(ConfigError::invalid(
                format!("{p}.resources.limits.memory"),
                format!(
                    "{} is above resources.maximums.memory ({})",
                    r.limits.memory, r.maximums.memory
                ),
            ));
        }
        if r.limits.memory < ByteSize::mib(6) {
            return Err(ConfigError::invalid(
                format!("{p}.resources.limits.memory"),
                "must be at least 6Mi",
            ));
        }
        if r.limits.cpu > r.maximums.cpu {
            return Err(ConfigError::invalid(
                format!("{p}.resources.limits.cpu"),
                format!("{} is above resources.maximums.cpu ({})", r.limits.cpu, r.maximums.cpu),
            ));
        }
        if r.requests.memory > r.limits.memory {
            return Err(ConfigError::invalid(
                format!("{p}.resources.requests.memory"),
                format!(
                    "{} is above resources.limits.memory ({})",
                    r.requests.memory, r.limits.memory
                ),
            ));
        }
        if r.requests.cpu > r.limits.cpu {
            return Err(ConfigError::invalid(
                format!("{p}.resources.requests.cpu"),
                format!("{} is above resources.limits.cpu ({})", r.requests.cpu, r.limits.cpu),
            ));
        }
        for (key, v) in [
            ("pids", r.limits.pids),
            ("nofile", r.limits.nofile),
            ("nproc", r.limits.nproc),
        ] {
            if v < 16 {
                return Err(ConfigError::invalid(
                    format!("{p}.resources.limits.{key}"),
                    format!("{v} is too small (at least 16)"),
                ));
            }
        }
        if r.limits.pids > r.maximums.pids {
            return Err(ConfigError::invalid(
                format!("{p}.resources.limits.pids"),
                format!(
                    "{} is above resources.maximums.pids ({})",
                    r.limits.pids, r.maximums.pids
                ),
            ));
        }
        if self.volume_size() > r.maximums.volume_size {
            return Err(ConfigError::invalid(
                format!("{p}.volume_size"),
                format!(
                    "{} is above resources.maximums.volume_size ({})",
                    self.volume_size(),
                    r.maximums.volume_size
                ),
            ));
        }
        if self.volume_size() < ByteSize::mib(16) {
            return Err(ConfigError::invalid(
                format!("{p}.volume_size"),
                "must be at least 16Mi",
            ));
        }
        for opt in &self.storage.volumes.options {
            let ok = match opt.split_once('=') {
                Some(("size", v)) => ByteSize::parse(v).is_ok(),
                Some(("inodes", _)) => self.storage.volume_inodes().is_some(),
                _ => false,
            };
            if !ok {
                return Err(ConfigError::invalid(
                    "storage.volumes.options",
                    format!(
                        "{opt:?} is not understood (allowed: size=<size>, inodes=<count>, e.g. size=5G, inodes=100k)"
                    ),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, env) in ac.environments.iter().enumerate() {
            let ep = format!("{p}.environments[{i}]");
            validate::environment_name(&env.name).map_err(|m| ConfigError::invalid(format!("{ep}.name"), m))?;
            if !seen.insert(env.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{ep}.name"),
                    format!("environment {:?} is defined twice", env.name),
                ));
            }
            let sources = [env.image.is_some(), env.dockerfile.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if sources > 1 {
                return Err(ConfigError::invalid(ep, "set either image or dockerfile, not both"));
            }
            if let Some(img) = &env.image {
                validate::image_ref(img).map_err(|m| ConfigError::invalid(format!("{ep}.image"), m))?;
            }
            if let Some(df) = &env.dockerfile {
                if !df
                    .lines()
                    .any(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
                {
                    return Err(ConfigError::invalid(
                        format!("{ep}.dockerfile"),
                        "is empty or has no FROM line (a Containerfile must start from an image)",
                    ));
                }
            }
            if sources == 0 && env.packages.is_empty() {
                return Err(ConfigError::invalid(ep, "needs one of image, dockerfile or packages"));
            }
            for (j, pkg) in env.packages.iter().enumerate() {
                let ok = !pkg.is_empty()
                    && pkg.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                    && pkg.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:=~".contains(c));
                if !ok {
                    return Err(ConfigError::invalid(
                        format!("{ep}.packages[{j}]"),
                        format!("{pkg:?} is not a Debian package name"),
                    ));
                }
            }
            for (j, vol) in env.volumes.iter().enumerate() {
                VolumeSpec::parse(vol).map_err(|m| ConfigError::invalid(format!("{ep}.volumes[{j}]"), m))?;
            }
        }
        let retention = &self.isolated_workspace.snapshots;
        if retention.max_per_workspace == 0 {
            return Err(ConfigError::invalid(
                "isolated_workspace.snapshots.max_per_workspace",
                "must be at least 1",
            ));
        }
        if retention.max_total_size.bytes() == 0 {
            return Err(ConfigError::invalid(
                "isolated_workspace.snapshots.max_total_size",
                "must be larger than 0",
            ));
        }
        if self.isolated_workspace.fork.max_count == 0 {
            return Err(ConfigError::invalid(
                "isolated_workspace.fork.max_count",
                "must be at least 1",
            ));
        }
        for (name, _) in self.isolated_workspace.warm_pool.iter() {
            validate::environment_name(name)
                .map_err(|m| ConfigError::invalid(format!("isolated_workspace.warm_pool.{name}"), m))?;
        }
        for (i, img) in self.podman_config.preload_images.iter().enumerate() {
            validate::image_ref(img)
                .map_err(|m| ConfigError::invalid(format!("podman_config.preload_images[{i}]"), m))?;
        }
        self.validate_egress()?;
        self.secrets.validate()?;
        let net = &self.podman_config.network;
        validate::name(&net.name, 40).map_err(|m| ConfigError::invalid("podman_config.network.name", m))?;
        if !net.subnet.is_empty() {
            parse_cidr(&net.subnet).map_err(|m| ConfigError::invalid("podman_config.network.subnet", m))?;
        }
        if !(576..=9216).contains(&net.mtu) {
            return Err(ConfigError::invalid(
                "podman_config.network.mtu",
                format!("{} is outside 576..=9216", net.mtu),
            ));
        }
        if !matches!(net.driver.as_str(), "bridge" | "macvlan" | "ipvlan") {
            return Err(ConfigError::invalid(
                "podman_config.network.driver",
                format!("{:?} is not supported (allowed: bridge, macvlan, ipvlan)", net.driver),
            ));
        }
        if !matches!(self.podman_config.security.userns.as_str(), "keep-id" | "host" | "") {
            return Err(ConfigError::invalid(
                "podman_config.security.userns",
                format!(
                    "{:?} is not supported (allowed: keep-id, host)",
                    self.podman_config.security.userns
                ),
            ));
        }
        self.port_range()
            .map_err(|m| ConfigError::invalid("podman_config.container_port_range", m))?;
        self.network.bind_address.parse::<IpAddr>().map_err(|_| {
            ConfigError::invalid(
                "network.bind_address",
                format!("{:?} is not an IP address", self.network.bind_address),
            )
        })?;
        let t = &self.task_execution;
        if t.max_workers == 0 || t.max_workers > 256 {
            return Err(ConfigError::invalid(
                "task_execution.max_workers",
                "must be between 1 and 256",
            ));
        }
        if !(1..=10).contains(&t.default_priority) {
            return Err(ConfigError::invalid(
                "task_execution.default_priority",
                "must be between 1 and 10",
            ));
        }
        if t.task_timeout == 0 {
            return Err(ConfigError::invalid(
                "task_execution.task_timeout",
                "must be at least 1 second",
            ));
        }
        let c = &self.isolated_workspace.cleanup;
        if let (Some(pause), Some(suspend)) = (c.idle_pause_after, c.idle_suspend_after) {
            if suspend <= pause {
                return Err(ConfigError::invalid(
                    "isolated_workspace.cleanup.idle_suspend_after",
                    format!("must be longer than idle_pause_after ({pause} s), or the pause never happens"),
                ));
            }
        }
        for (key, list) in [
            ("pre_task", &self.container_lifecycle.pre_task),
            ("post_task", &self.container_lifecycle.post_task),
        ] {
            for (i, c) in list.iter().enumerate() {
                validate::command(c).map_err(|m| ConfigError::invalid(format!("container_lifecycle.{key}[{i}]"), m))?;
            }
        }
        Ok(())
    }

    /// The effective data-volume size (`storage.volumes.options: size=` wins).
    pub fn volume_size(&self) -> ByteSize {
        self.storage
            .option("size")
            .and_then(|v| ByteSize::parse(v).ok())
            .unwrap_or(self.isolated_workspace.agent_containers.volume_size)
    }

    /// Whether a sandbox workspace whose task failed is kept for debugging.
    pub fn preserve_failed_workspaces(&self) -> bool {
        self.isolated_workspace.cleanup.preserve_on_error || !self.container_lifecycle.cleanup_on_failure
    }

    /// `container_port_range` as an inclusive range.
    pub fn port_range(&self) -> Result<(u16, u16), String> {
        let s = &self.podman_config.container_port_range;
        if s.is_empty() {
            return Ok((20000, 20999));
        }
        let err = || format!("{s:?} is not a port range (example: 20000-20999)");
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let (a, b): (u16, u16) = (
            a.trim().parse().map_err(|_| err())?,
            b.trim().parse().map_err(|_| err())?,
        );
        if a < 1024 || a > b {
            return Err(err());
        }
        Ok((a, b))
    }
}

/// Parses `a.b.c.d/n` (IPv4 only; workspace networks are IPv4).
pub fn parse_cidr(s: &str) -> Result<([u8; 4], u8), String> {
    let err = || format!("{s:?} is not an IPv4 subnet (example: 10.89.0.0/16)");
    let (ip, len) = s.split_once('/').ok_or_else(err)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| err())?;
    let len: u8 = len.parse().map_err(|_| err())?;
    if !(8..=28).contains(&len) {
        return Err(format!("{s:?}: the prefix length must be between 8 and 28"));
    }
    let bits = u32::from(ip);
    if bits & ((1u32 << (32 - len)) - 1) != 0 {
        return Err(format!("{s:?} has host bits set"));
    }
    Ok((ip.octets(), len))
}

/// The first /29 inside `base/len` that overlaps none of `taken` (CIDR strings).
pub fn next_free_block(base: [u8; 4], len: u8, taken: &[String]) -> Option<String> {
    let start = u32::from_be_bytes(base);
    let size = 1u32 << (32 - len);
    let taken: Vec<(u32, u32)> = taken
        .iter()
        .filter_map(|t| {
            let (ip, l) = t.split_once('/')?;
            let ip: std::net::Ipv4Addr = ip.parse().ok()?;
            let l: u32 = l.parse().ok()?;
            let n = 1u32.checked_shl(32 - l).unwrap_or(0);
            Some((u32::from(ip), n.max(1)))
        })
        .collect();
    (0..size / 8)
        .map(|i| start + i * 8)
        .find(|b| !taken.iter().any(|(t, n)| *b < t + n && *t < b + 8))
        .map(|b| {
            let ip = std::net::Ipv4Addr::from(b);
            format!("{ip}/29")
        })
}

/// serde messages mention Rust-isms; make them read like configuration advice.
fn clean_serde_message(m: &str) -> String {
    m.replace("invalid type: ", "wrong type: ").replace("variant", "value")
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Config {
    /// The `network.egress` section and every network policy of the configuration: entries
    /// parse, bundles are well-formed, and every allow list stays within `max_allow`.
    fn validate_egress(&self) -> Result<(), ConfigError> {
        let egress = &self.network.egress;
        for (name, entries) in &egress.bundles {
            validate::name(name, 40).map_err(|m| ConfigError::invalid(format!("network.egress.bundles.{name}"), m))?;
            if entries.is_empty() {
                return Err(ConfigError::invalid(
                    format!("network.egress.bundles.{name}"),
                    "is empty (list host names, wildcards or CIDRs)",
                ));
            }
        }
        let bundles = egress.bundles();
        crate::egress::validate_bundles(&bundles).map_err(|m| ConfigError::invalid("network.egress.bundles", m))?;
        if let Some(bound) = &egress.max_allow {
            crate::egress::EgressPolicy::parse(bound, &[], &bundles)
                .map_err(|e| ConfigError::invalid(format!("network.egress.max_allow[{}]", e.index), e.message))?;
        }
        if egress.proxy_port == 0 {
            return Err(ConfigError::invalid("network.egress.proxy_port", "must be 1-65535"));
        }
        if egress.max_connections == 0 {
            return Err(ConfigError::invalid(
                "network.egress.max_connections",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("idle_timeout", egress.idle_timeout),
            ("connect_timeout", egress.connect_timeout),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(
                    format!("network.egress.{key}"),
                    "must be at least 1 second",
                ));
            }
        }
        for (i, path) in egress.upstream_ca_files.iter().enumerate() {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    format!("network.egress.upstream_ca_files[{i}]"),
                    format!("{:?} is not an absolute path", path.display().to_string()),
                ));
            }
        }
        for (name, addrs) in &egress.resolve {
            for (i, a) in addrs.iter().enumerate() {
                a.parse::<IpAddr>().map_err(|_| {
                    ConfigError::invalid(
                        format!("network.egress.resolve.{name}[{i}]"),
                        format!("{a:?} is not an IP address"),
                    )
                })?;
            }
        }
        let policies = std::iter::once((
            "isolated_workspace.agent_containers.network".to_string(),
            &self.isolated_workspace.agent_containers.network,
        ))
        .chain(
            self.isolated_workspace
                .agent_containers
                .environments
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    e.network.as_ref().map(|n| {
                        (
                            format!("isolated_workspace.agent_containers.environments[{i}].network"),
                            n,
                        )
                    })
                }),
        );
        for (field, policy) in policies {
            egress
                .check(&field, policy)
                .map_err(|(f, m)| ConfigError::invalid(f, m))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_valid_and_fully_known() {
        let l = Config::parse(include_str!("../../../config/standalone-isolated.yaml")).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.network.api_port, 8081);
        assert_eq!(
            l.config.isolated_workspace.agent_containers.base_image,
            LOCAL_BASE_IMAGE
        );
    }

    #[test]
    fn idle_delays_take_seconds_or_units_and_are_off_by_default() {
        let c = Config::default();
        assert_eq!(c.isolated_workspace.cleanup.idle_pause_after, None);
        assert_eq!(c.isolated_workspace.cleanup.idle_suspend_after, None);
        assert!(c.isolated_workspace.auto_resume);
        let l = Config::parse(
            "isolated_workspace:\n  cleanup:\n    idle_pause_after: 90\n    idle_suspend_after: \"2h\"\n",
        )
        .unwrap();
        assert_eq!(l.config.isolated_workspace.cleanup.idle_pause_after, Some(90));
        assert_eq!(l.config.isolated_workspace.cleanup.idle_suspend_after, Some(7200));
        for (text, want) in [
            ("15m", Some(900)),
            ("1d", Some(86_400)),
            ("0", None),
            ("off", None),
            ("30 s", Some(30)),
        ] {
            assert_eq!(parse_idle_after(text).unwrap(), want, "{text}");
        }
        for bad in ["soon", "5w", "-3", "m"] {
            assert!(parse_idle_after(bad).is_err(), "{bad}");
        }
        let err = Config::parse("isolated_workspace:\n  cleanup:\n    idle_pause_after: soon\n").unwrap_err();
        assert!(err.to_string().contains("idle_pause_after"), "{err}");
        let mut c = Config::default();
        c.isolated_workspace.cleanup.idle_pause_after = Some(600);
        c.isolated_workspace.cleanup.idle_suspend_after = Some(60);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("idle_suspend_after"), "{err}");
    }

    #[test]
    fn empty_file_means_defaults() {
        let l = Config::parse("").unwrap();
        assert_eq!(l.config, Config::default());
        assert!(l.warnings.is_empty());
        let l = Config::parse("# only a comment\n").unwrap();
        assert_eq!(l.config, Config::default());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.network.api_port, 8081);
        assert_eq!(c.network.bind_address, "127.0.0.1");
        assert_eq!(c.isolated_workspace.mode, Mode::Sandbox);
        assert_eq!(c.isolated_workspace.agent_containers.volume_size, ByteSize::gib(10));
        assert_eq!(
            c.isolated_workspace.agent_containers.network,
            NetworkPolicy::mode(NetworkMode::Isolated)
        );
        assert_eq!(c.podman_config.network.name, "claude-dev-net");
        c.validate().unwrap();
    }

    #[test]
    fn the_spec_example_parses() {
        let text = r#"
isolated_workspace:
  enabled: true
  mode: "sandbox"
  agent_containers:
    base_image: "ubuntu:22.04"
    persistent_volumes: true
    volume_size: "10Gi"
    resources:
      requests:
        memory: "512Mi"
        cpu: "0.5"
      limits:
        memory: "2Gi"
        cpu: "1.0"
podman_config:
  network:
    name: "claude-dev-net"
    subnet: "10.89.0.0/24"
  security:
    userns: "keep-id"
"#;
        let l = Config::parse(text).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let ac = &l.config.isolated_workspace.agent_containers;
        assert_eq!(ac.base_image, "ubuntu:22.04");
        assert_eq!(ac.resources.limits.cpu, Cpu(1000));
        assert_eq!(ac.resources.requests.cpu, Cpu(500));
        assert_eq!(l.config.podman_config.network.subnet, "10.89.0.0/24");
    }

    #[test]
    fn a_bad_size_names_the_key_path() {
        let text = "isolated_workspace:\n  agent_containers:\n    resources:\n      limits:\n        memory: 2Qi\n";
        let e = Config::parse(text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "isolated_workspace.agent_containers.resources.limits.memory: \"2Qi\" is not a size (examples: 512Mi, 2Gi)"
        );
    }

    #[test]
    fn a_bad_mode_lists_the_allowed_values() {
        let e = Config::parse("isolated_workspace:\n  mode: turbo\n").unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("isolated_workspace.mode: "), "{m}");
        assert!(m.contains("sandbox") && m.contains("hybrid"), "{m}");
    }

    #[test]
    fn malformed_yaml_is_a_syntax_error_with_a_position() {
        let e = Config::parse("isolated_workspace:\n  mode: [unclosed\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax(_)));
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let l = Config::parse("isolated_workspace:\n  enabledd: true\nfoo: 1\n").unwrap();
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(l.warnings.iter().any(|w| w.contains("isolated_workspace.enabledd")));
    }

    #[test]
    fn limits_above_maxima_are_rejected() {
        let e = Config::parse(
            "isolated_workspace:\n  agent_containers:\n    resources:\n      limits:\n        memory: 64Gi\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("above resources.maximums.memory"), "{e}");
        let e = Config::parse("isolated_workspace:\n  agent_containers:\n    volume_size: 100Gi\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("isolated_workspace.agent_containers.volume_size:"),
            "{e}"
        );
    }

    #[test]
    fn custom_environments_are_checked() {
        let e = Config::parse("isolated_workspace:\n  agent_containers:\n    environments:\n      - name: x\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "isolated_workspace.agent_containers.environments[0]: needs one of image, dockerfile or packages"
        );
        let e = Config::parse(
            "isolated_workspace:\n  agent_containers:\n    environments:\n      - name: x\n        dockerfile: \"\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("environments[0].dockerfile: is empty"), "{e}");
        let e = Config::parse("isolated_workspace:\n  agent_containers:\n    environments:\n      - name: x\n        image: \"-v /:/host\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("isolated_workspace.agent_containers.environments[0].image:"),
            "{e}"
        );
        let e = Config::parse("isolated_workspace:\n  agent_containers:\n    environments:\n      - name: x\n        image: a\n        volumes: [\"src:relative\"]\n").unwrap_err();
        assert!(e.to_string().contains("environments[0].volumes[0]"), "{e}");
    }

    #[test]
    fn storage_options_and_paths() {
        let l =
            Config::parse("storage:\n  volumes:\n    driver: overlay\n    options: [\"size=5G\", \"inodes=100k\"]\n")
                .unwrap();
        assert_eq!(l.config.volume_size().bytes(), 5_000_000_000);
        assert_eq!(l.config.storage.volume_inodes(), Some(100_000));
        let p = Storage::default().resolve(Path::new("/home/u"));
        assert_eq!(p.workspaces, Path::new("/home/u/.claude-conductor/isolated"));
        assert_eq!(p.database, Path::new("/home/u/.claude-conductor/conductor.db"));
        assert!(Config::parse("storage:\n  volumes:\n    options: [\"foo=1\"]\n").is_err());
    }

    #[test]
    fn blocks_skip_taken_subnets() {
        assert_eq!(
            next_free_block([10, 89, 0, 0], 24, &[]).as_deref(),
            Some("10.89.0.0/29")
        );
        let taken = vec![
            "10.89.0.0/29".to_string(),
            "10.89.0.8/29".to_string(),
            "10.88.0.0/16".to_string(),
        ];
        assert_eq!(
            next_free_block([10, 89, 0, 0], 24, &taken).as_deref(),
            Some("10.89.0.16/29")
        );
        let all = vec!["10.89.0.0/24".to_string()];
        assert_eq!(next_free_block([10, 89, 0, 0], 24, &all), None);
    }

    #[test]
    fn network_keys() {
        assert!(Config::parse("network:\n  bind_address: localhost\n")
            .unwrap_err()
            .to_string()
            .starts_with("network.bind_address"));
        assert!(Config::parse("network:\n  api_port: 70000\n")
            .unwrap_err()
            .to_string()
            .starts_with("network.api_port"));
        assert!(Config::parse("podman_config:\n  network:\n    subnet: 10.89.0.1/24\n").is_err());
        assert_eq!(parse_cidr("10.89.0.0/24").unwrap(), ([10, 89, 0, 0], 24));
        assert!(Config::parse("podman_config:\n  network:\n    mtu: 9000\n").is_ok());
    }

    #[test]
    fn snapshot_retention_defaults_and_checks() {
        let c = Config::default();
        assert_eq!(c.isolated_workspace.snapshots.max_per_workspace, 10);
        assert_eq!(c.isolated_workspace.snapshots.max_total_size, ByteSize::gib(20));
        let l = Config::parse("isolated_workspace:\n  snapshots:\n    max_per_workspace: 3\n    max_total_size: 5Gi\n")
            .unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(
            l.config.isolated_workspace.snapshots,
            SnapshotRetention {
                max_per_workspace: 3,
                max_total_size: ByteSize::gib(5),
            }
        );
        let e = Config::parse("isolated_workspace:\n  snapshots:\n    max_per_workspace: 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "isolated_workspace.snapshots.max_per_workspace: must be at least 1"
        );
        let e = Config::parse("isolated_workspace:\n  snapshots:\n    max_total_size: 0\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("isolated_workspace.snapshots.max_total_size:"),
            "{e}"
        );
        let e = Config::parse("isolated_workspace:\n  snapshots:\n    max_total_size: lots\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("isolated_workspace.snapshots.max_total_size:"),
            "{e}"
        );
    }

    #[test]
    fn fork_count_bound_defaults_and_checks() {
        assert_eq!(Config::default().isolated_workspace.fork.max_count, 16);
        let l = Config::parse("isolated_workspace:\n  fork:\n    max_count: 4\n").unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.isolated_workspace.fork.max_count, 4);
        let e = Config::parse("isolated_workspace:\n  fork:\n    max_count: 0\n").unwrap_err();
        assert_eq!(e.to_string(), "isolated_workspace.fork.max_count: must be at least 1");
        let e = Config::parse("isolated_workspace:\n  fork:\n    max_count: many\n").unwrap_err();
        assert!(e.to_string().starts_with("isolated_workspace.fork.max_count"), "{e}");
    }

    #[test]
    fn preserve_failed_workspaces_honours_both_keys() {
        let mut c = Config::default();
        assert!(!c.preserve_failed_workspaces());
        c.container_lifecycle.cleanup_on_failure = false;
        assert!(c.preserve_failed_workspaces());
    }

    #[test]
    fn network_policies_are_a_mode_or_a_map_and_their_entries_are_checked_with_the_key() {
        let c = Config::parse(
            "isolated_workspace:\n  agent_containers:\n    network: {allow: [pypi, \"*.example.com:8443\"], deny: [bad.example.com]}\n",
        )
        .unwrap()
        .config;
        let n = &c.isolated_workspace.agent_containers.network;
        assert_eq!(n.mode, None);
        assert_eq!(n.allow.as_deref().map(<[String]>::len), Some(2));
        assert_eq!(n.deny, ["bad.example.com"]);
        for mode in ["isolated", "none", "proxy", "egress"] {
            let c = Config::parse(&format!(
                "isolated_workspace:\n  agent_containers:\n    network: {mode}\n"
            ))
            .unwrap();
            assert!(
                c.config.isolated_workspace.agent_containers.network.mode.is_some(),
                "{mode}"
            );
        }
        let err = Config::parse("isolated_workspace:\n  agent_containers:\n    network: open\n").unwrap_err();
        assert!(err.to_string().contains("network"), "{err}");
        let err = Config::parse("isolated_workspace:\n  agent_containers:\n    network: {allow: [\"a..b\"]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("isolated_workspace.agent_containers.network.allow[0]"),
            "{err}"
        );
        let err = Config::parse("isolated_workspace:\n  agent_containers:\n    network: {allw: [x.com]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allw"), "unknown keys are refused by name: {err}");
    }

    #[test]
    fn secrets_are_validated_by_key() {
        let ok = r#"
network:
  egress:
    upstream_ca_files: [/etc/corp-ca.pem]
secrets:
  max_allow: [github]
  define:
    - name: github
      from_file: /run/secrets/github
      rules:
        - {host: github.com, inject: {type: basic, username: x-access-token}}
        - {host: api.github.com, inject: {type: header, name: Authorization, value: "Bearer {value}"}}
    - name: openai
      from_env: OPENAI_KEY
      rules: [{host: api.openai.com, inject: {type: header, name: Authorization, value: "Bearer {value}"}}]
"#;
        let l = Config::parse(ok).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let s = &l.config.secrets;
        assert_eq!(s.max_allow.as_deref(), Some(&["github".to_string()][..]));
        assert_eq!(s.define.len(), 2);
        assert_eq!(s.define[1].from_env.as_deref(), Some("OPENAI_KEY"));
        assert_eq!(s.define[0].spec().rules.len(), 2);
        assert_eq!(
            l.config.network.egress.upstream_ca_files,
            [PathBuf::from("/etc/corp-ca.pem")]
        );
        let rule = "rules: [{host: a.example, inject: {type: basic, username: git}}]";
        let one = |fields: &str| format!("secrets:\n  define:\n    - {{{fields}, {rule}}}\n");
        let cases = [
            (
                "secrets:\n  define:\n    - {name: a, from_env: A, rules: [{host: a.example, inject: {type: basic, username: git}}, {host: \"a..b\", inject: {type: basic, username: git}}]}\n".to_string(),
                "secrets.define[0].rules[1].host",
            ),
            (one("name: Bad, from_env: A"), "secrets.define[0].name"),
            (one("name: a"), "secrets.define[0]"),
            (one("name: a, from_env: A, from_file: /x"), "secrets.define[0]"),
            (one("name: a, from_file: rel/path"), "secrets.define[0].from_file"),
            (one("name: a, from_env: \"1X\""), "secrets.define[0].from_env"),
            (
                format!("secrets:\n  define:\n    - {{name: a, from_env: A, {rule}}}\n    - {{name: a, from_env: B, {rule}}}\n"),
                "secrets.define[1].name",
            ),
            ("secrets:\n  max_allow: [\"no way\"]\n".to_string(), "secrets.max_allow[0]"),
            (
                "network:\n  egress:\n    upstream_ca_files: [ca.pem]\n".to_string(),
                "network.egress.upstream_ca_files[0]",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn egress_settings_are_validated_and_the_bound_applies_to_the_configured_policies() {
        let ok = "network:\n  egress:\n    max_allow: [pypi, \"*.example.com\"]\n    bundles: {corp: [git.corp.example.com]}\n";
        let c = Config::parse(ok).unwrap().config;
        assert!(c.network.egress.bundles().contains_key("corp"));
        assert!(
            c.network.egress.bundles().contains_key("pypi"),
            "the shipped bundles stay"
        );
        let cases = [
            ("network:\n  egress:\n    max_allow: [\"*\"]\n", "network.egress.max_allow[0]"),
            ("network:\n  egress:\n    bundles: {corp: []}\n", "network.egress.bundles.corp"),
            ("network:\n  egress:\n    bundles: {corp: [pypi]}\n", "network.egress.bundles"),
            ("network:\n  egress:\n    proxy_port: 0\n", "network.egress.proxy_port"),
            ("network:\n  egress:\n    max_connections: 0\n", "network.egress.max_connections"),
            ("network:\n  egress:\n    resolve: {a.test: [nowhere]}\n", "network.egress.resolve.a.test[0]"),
            (
                "network:\n  egress:\n    max_allow: [pypi]\nisolated_workspace:\n  agent_containers:\n    network: {allow: [npm]}\n",
                "isolated_workspace.agent_containers.network.allow[0]",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{key}: {err}");
        }
        // A caller's policy against the bound.
        let egress = &c.network.egress;
        assert!(egress
            .check("network", &NetworkPolicy::allow(&["pypi.org", "a.example.com"]))
            .is_ok());
        let (field, message) = egress
            .check("network", &NetworkPolicy::allow(&["pypi.org", "npmjs.org"]))
            .unwrap_err();
        assert_eq!(field, "network.allow[1]");
        assert!(message.contains("max_allow"), "{message}");
    }
}
