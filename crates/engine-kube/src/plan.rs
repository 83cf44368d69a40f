//! What one workspace Pod is made of, independent of Kubernetes types: the input of
//! [`crate::render`]. Pure: built by the service from the configuration and a preset or
//! workspace, or by [`PodPlan::from_container_spec`] from the engine's container spec.

use conductor_core::config::{KubeMode, KubernetesConfig};
use conductor_core::engine::{ContainerSpec, Labels, Mount, NetworkAttachment};
use conductor_core::naming;

/// Where the agent binary sits in every workspace container (the same path as on Podman).
pub const AGENT_DIR: &str = "/.conductor";
pub const AGENT_PATH: &str = "/.conductor/agent";
/// The agent's socket directory (an `emptyDir`).
pub const SOCKET_DIR: &str = "/run/conductor";
/// Where Podman workspaces in proxy mode see the host's egress socket (on Kubernetes the
/// NetworkPolicy lets them reach the proxy's Service instead).
pub const EGRESS_SOCKET_DIR: &str = "/run/conductor-egress";
/// Name of the workspace container inside the Pod.
pub const WORKSPACE_CONTAINER: &str = "workspace";
/// The workspace user (uid and gid), as on Podman.
pub const WORKSPACE_UID: i64 = 1000;

/// How a workspace's traffic may leave the Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkPlan {
    /// Loopback only: every ingress and egress denied.
    Isolated,
    /// Egress only to the conductor egress proxy (`engine.kubernetes.egress_proxy`).
    Proxy,
    /// Egress to public addresses; private ranges, link-local (metadata) and loopback denied.
    Egress,
}

/// Which seccomp profile the Pod runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    /// A profile installed on the nodes, relative to the kubelet's seccomp directory.
    Localhost(String),
    /// The container runtime's default profile.
    RuntimeDefault,
}

impl Seccomp {
    pub fn from_config(value: &str) -> Seccomp {
        if value == "RuntimeDefault" {
            Seccomp::RuntimeDefault
        } else {
            Seccomp::Localhost(value.to_string())
        }
    }
}

/// CPU and memory of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Res {
    pub memory_bytes: u64,
    /// Billionths of a CPU.
    pub nano_cpus: i64,
}

/// A mount of one of the Pod's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    pub volume: String,
    pub path: String,
    pub sub_path: Option<String>,
    pub readonly: bool,
}

/// One container of the Pod (the workspace or a sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint.
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub requests: Option<Res>,
    pub limits: Res,
    pub readonly_rootfs: bool,
    pub mounts: Vec<MountPlan>,
    /// Ports the container listens on (informational in a PodSpec).
    pub ports: Vec<u16>,
}

/// The workspace's data volume: a PVC whose `workspace/` directory is `/workspace` and whose
/// `volumes/<name>/` directories are the environment's named volumes (the host layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    pub claim: String,
    pub size_bytes: u64,
    pub storage_class: Option<String>,
    /// (name, mount path) of the environment's named sub-volumes.
    pub sub_volumes: Vec<(String, String)>,
}

/// The in-workspace agent: copied from its image by an init container, run as PID 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlan {
    pub image: String,
    /// Arguments after the binary (`init --socket … --root /workspace`).
    pub args: Vec<String>,
}

/// Everything a workspace Pod is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// Object name of the Pod (a DNS subdomain made from the container name).
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub hostname: Option<String>,
    pub workspace: ContainerPlan,
    pub sidecars: Vec<ContainerPlan>,
    pub volume: Option<VolumePlan>,
    /// Size of the in-memory `/tmp` (with a read-only root file system).
    pub tmp_bytes: Option<u64>,
    pub agent: Option<AgentPlan>,
    pub network: NetworkPlan,
    /// `/etc/hosts` entries: (address, names).
    pub host_aliases: Vec<(String, Vec<String>)>,
    pub seccomp: Seccomp,
    pub pull_policy: String,
    pub mode: KubeMode,
}

/// Why a container spec cannot become a Pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PlanError {
    pub field: String,
    pub message: String,
}

fn plan_err(field: &str, message: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        message: message.into(),
    }
}

/// A Kubernetes object name made from a conductor name: lowercase, `_` and other characters
/// outside DNS labels become `-`, at most 253 characters, never ending in `-`.
pub fn object_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    out.truncate(253);
    let trimmed = out.trim_matches('-').to_string();
    if trimmed.is_empty() {
        "conductor".into()
    } else {
        trimmed
    }
}

/// The agent's command line inside a Pod: PID 1 on the socket directory's `emptyDir`.
pub fn agent_args() -> Vec<String> {
    vec![
        "init".into(),
        "--socket".into(),
        format!("{SOCKET_DIR}/agent.sock"),
        "--root".into(),
        "/workspace".into(),
    ]
}

/// A locally built image as the cluster names it: `localhost/` replaced by
/// `engine.kubernetes.image_registry` when one is set.
pub fn cluster_image(kube: &KubernetesConfig, image: &str) -> String {
    match (&kube.image_registry, image.strip_prefix("localhost/")) {
        (Some(registry), Some(rest)) => format!("{}/{rest}", registry.trim_end_matches('/')),
        _ => image.to_string(),
    }
}

/// Points `HTTP(S)_PROXY` (both cases) at the cluster's egress proxy, and keeps loopback
/// (sidecars) out of it.
pub fn set_proxy_env(env: &mut Vec<(String, String)>, kube: &KubernetesConfig) {
    let url = format!("http://{}:{}", kube.egress_proxy.host, kube.egress_proxy.port);
    let names = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ];
    env.retain(|(k, _)| !names.contains(&k.as_str()));
    for n in &names[..4] {
        env.push((n.to_string(), url.clone()));
    }
    for n in &names[4..] {
        env.push((n.to_string(), "localhost,127.0.0.1,::1".into()));
    }
}

impl PodPlan {
    /// The Pod of an engine container spec (what [`crate::KubeEngine`] creates): the
    /// workspace's bind mounts become the PVC (`/workspace`, its `volumes/<name>`
    /// directories), the agent's mounts an init container and an `emptyDir`, tmpfs an
    /// in-memory `emptyDir`. Any other host mount is refused: a cluster has no host path.
    pub fn from_container_spec(
        spec: &ContainerSpec,
        kube: &KubernetesConfig,
        volume_bytes: u64,
    ) -> Result<PodPlan, PlanError> {
        let name = object_name(&spec.name);
        let mut mounts = Vec::new();
        let mut sub_volumes = Vec::new();
        let mut has_workspace = false;
        let mut agent = false;
        let mut tmp_bytes = None;
        let mut proxied = false;
        for m in &spec.mounts {
            match m {
                Mount::Bind { target, .. } if target == "/workspace" => has_workspace = true,
                Mount::Bind { target, .. } if target == AGENT_PATH => agent = true,
                Mount::Bind { target, .. } if target == SOCKET_DIR => {}
                Mount::Bind { target, .. } if target == EGRESS_SOCKET_DIR => proxied = true,
                Mount::Bind { source, target, .. } => {
                    let parent = source.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
                    let leaf = source.file_name().and_then(|n| n.to_str());
                    match (parent, leaf) {
                        (Some("volumes"), Some(leaf)) => sub_volumes.push((leaf.to_string(), target.clone())),
                        _ => {
                            return Err(plan_err(
                                "mounts",
                                format!(
                                    "{target}: a host directory cannot be mounted into a Pod (only the workspace volume and its named volumes)"
                                ),
                            ))
                        }
                    }
                }
                Mount::Tmpfs { target, size_bytes, .. } if target == "/tmp" => tmp_bytes = Some(*size_bytes),
                Mount::Tmpfs { target, .. } => {
                    return Err(plan_err(
                        "mounts",
                        format!("{target}: only /tmp can be an in-memory volume"),
                    ))
                }
            }
        }
        if !spec.published_ports.is_empty() {
            return Err(plan_err(
                "ports",
                "publishing ports on the host does not exist on Kubernetes (use a Service)",
            ));
        }
        match spec.user.as_deref() {
            None | Some("1000") | Some("1000:1000") => {}
            Some(other) => {
                return Err(plan_err(
                    "user",
                    format!("{other}: workspace Pods run as uid 1000 (runAsNonRoot)"),
                ))
            }
        }
        let network = match &spec.network {
            NetworkAttachment::None if proxied => NetworkPlan::Proxy,
            NetworkAttachment::None => NetworkPlan::Isolated,
            NetworkAttachment::Network(_) => NetworkPlan::Egress,
            NetworkAttachment::Container(_) => {
                return Err(plan_err(
                    "network",
                    "a sidecar is a container of its workspace's Pod, not a Pod of its own",
                ))
            }
        };
        let volume = has_workspace.then(|| VolumePlan {
            claim: format!("{name}-workspace"),
            size_bytes: volume_bytes,
            storage_class: kube.storage_class.clone(),
            sub_volumes,
        });
        let (command, args) = match (&spec.entrypoint, agent) {
            (Some(ep), true) if ep.first().map(String::as_str) == Some(AGENT_PATH) => {
                (Some(vec![AGENT_PATH.to_string()]), Some(agent_args()))
            }
            (ep, _) => (ep.clone(), spec.cmd.clone().filter(|c| !c.is_empty())),
        };
        if volume.is_some() {
            mounts.push(MountPlan {
                volume: "workspace".into(),
                path: "/workspace".into(),
                sub_path: Some("workspace".into()),
                readonly: false,
            });
        }
        let limits = Res {
            memory_bytes: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus,
        };
        let mut env = spec.env.clone();
        if network == NetworkPlan::Proxy {
            // The proxy's Service, not the agent's loopback relay of a Podman workspace.
            set_proxy_env(&mut env, kube);
        }
        let workspace = ContainerPlan {
            name: WORKSPACE_CONTAINER.into(),
            image: cluster_image(kube, &spec.image),
            command,
            args,
            env,
            workdir: spec.workdir.clone(),
            requests: None,
            limits,
            readonly_rootfs: spec.security.readonly_rootfs,
            mounts,
            ports: Vec::new(),
        };
        let mut plan = PodPlan {
            name,
            namespace: kube.namespace.clone(),
            labels: spec.labels.clone(),
            annotations: Labels::new(),
            hostname: spec.hostname.clone(),
            workspace,
            sidecars: Vec::new(),
            volume,
            tmp_bytes,
            agent: agent.then(|| AgentPlan {
                image: kube.agent_image.clone(),
                args: agent_args(),
            }),
            network,
            host_aliases: Vec::new(),
            seccomp: if spec.security.seccomp_profile.is_some() {
                Seccomp::from_config(&kube.seccomp_profile)
            } else {
                Seccomp::RuntimeDefault
            },
            pull_policy: kube.image_pull_policy.clone(),
            mode: KubeMode::Pod,
        };
        plan.finish_mounts();
        for (name, ip) in &spec.extra_hosts {
            plan.add_host_alias(ip, name);
        }
        Ok(plan)
    }

    /// Adds the mounts every plan derives from its parts: the named sub-volumes, `/tmp`,
    /// the agent's binary and socket directories. Call once after the parts are set.
    pub fn finish_mounts(&mut self) {
        if let Some(v) = &self.volume {
            for (n, target) in &v.sub_volumes {
                self.workspace.mounts.push(MountPlan {
                    volume: "workspace".into(),
                    path: target.clone(),
                    sub_path: Some(format!("volumes/{n}")),
                    readonly: false,
                });
            }
        }
        if self.tmp_bytes.is_some() {
            self.workspace.mounts.push(MountPlan {
                volume: "tmp".into(),
                path: "/tmp".into(),
                sub_path: None,
                readonly: false,
            });
        }
        if self.agent.is_some() {
            self.workspace.mounts.push(MountPlan {
                volume: "conductor-agent".into(),
                path: AGENT_DIR.into(),
                sub_path: None,
                readonly: true,
            });
            self.workspace.mounts.push(MountPlan {
                volume: "conductor-run".into(),
                path: SOCKET_DIR.into(),
                sub_path: None,
                readonly: false,
            });
        }
    }

    /// Maps `name` to `ip` in the Pod's `/etc/hosts` (sidecars are `127.0.0.1`: they share
    /// the Pod's network namespace).
    pub fn add_host_alias(&mut self, ip: &str, name: &str) {
        match self.host_aliases.iter_mut().find(|(a, _)| a == ip) {
            Some((_, names)) if names.iter().any(|n| n == name) => {}
            Some((_, names)) => names.push(name.to_string()),
            None => self.host_aliases.push((ip.to_string(), vec![name.to_string()])),
        }
    }

    /// The selector of this workspace's Pod (its conductor labels that name it).
    pub fn selector(&self) -> Labels {
        self.labels
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    naming::LABEL_WORKSPACE | naming::LABEL_INSTANCE | naming::LABEL_ENVIRONMENT | naming::LABEL_ROLE
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conductor_core::engine::{ResourceLimits, SecurityOptions};
    use std::path::PathBuf;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "claude-agent-a_1-3f2c9a1b".into(),
            image: "localhost/conductor/python-dev:abc".into(),
            labels: naming::workspace_labels("i1", "ws-3f2c9a1b0000", "a_1", "python-dev"),
            env: vec![("A".into(), "1".into())],
            entrypoint: Some(vec![AGENT_PATH.into(), "init".into()]),
            cmd: Some(Vec::new()),
            user: Some("1000".into()),
            workdir: Some("/workspace".into()),
            hostname: Some("3f2c9a1b".into()),
            mounts: vec![
                Mount::Bind {
                    source: PathBuf::from("/v/m/workspace"),
                    target: "/workspace".into(),
                    readonly: false,
                },
                Mount::Bind {
                    source: PathBuf::from("/v/m/volumes/cache"),
                    target: "/home/agent/.cache".into(),
                    readonly: false,
                },
                Mount::Bind {
                    source: PathBuf::from("/usr/lib/conductor/agent"),
                    target: AGENT_PATH.into(),
                    readonly: true,
                },
                Mount::Bind {
                    source: PathBuf::from("/data/agents/ws"),
                    target: SOCKET_DIR.into(),
                    readonly: false,
                },
                Mount::Tmpfs {
                    target: "/tmp".into(),
                    size_bytes: 64 << 20,
                    options: vec![],
                },
            ],
            network: NetworkAttachment::None,
            extra_hosts: vec![("db".into(), "127.0.0.1".into())],
            published_ports: vec![],
            limits: ResourceLimits {
                memory_bytes: 512 << 20,
                nano_cpus: 1_500_000_000,
                pids: 256,
                nofile: 1024,
                nproc: 512,
            },
            security: SecurityOptions {
                cap_drop_all: true,
                no_new_privileges: true,
                seccomp_profile: Some(PathBuf::from("/etc/conductor/seccomp.json")),
                readonly_rootfs: true,
            },
        }
    }

    #[test]
    fn a_container_spec_becomes_a_pod_plan() {
        let kube = KubernetesConfig {
            image_registry: Some("registry.example.com/c".into()),
            ..Default::default()
        };
        let p = PodPlan::from_container_spec(&spec(), &kube, 1 << 30).unwrap();
        assert_eq!(p.name, "claude-agent-a-1-3f2c9a1b");
        assert_eq!(p.workspace.image, "registry.example.com/c/conductor/python-dev:abc");
        assert_eq!(p.workspace.command.as_deref(), Some(&[AGENT_PATH.to_string()][..]));
        assert_eq!(p.workspace.args, Some(agent_args()));
        let v = p.volume.as_ref().unwrap();
        assert_eq!(v.claim, "claude-agent-a-1-3f2c9a1b-workspace");
        assert_eq!(
            v.sub_volumes,
            vec![("cache".to_string(), "/home/agent/.cache".to_string())]
        );
        let paths: Vec<_> = p.workspace.mounts.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/workspace", "/home/agent/.cache", "/tmp", AGENT_DIR, SOCKET_DIR]
        );
        assert_eq!(p.tmp_bytes, Some(64 << 20));
        assert_eq!(p.seccomp, Seccomp::Localhost("conductor-seccomp.json".into()));
        assert_eq!(p.host_aliases, vec![("127.0.0.1".to_string(), vec!["db".to_string()])]);
        assert_eq!(p.network, NetworkPlan::Isolated);
    }

    #[test]
    fn host_only_features_are_refused_by_field() {
        let kube = KubernetesConfig::default();
        let mut s = spec();
        s.mounts.push(Mount::Bind {
            source: PathBuf::from("/etc"),
            target: "/host-etc".into(),
            readonly: true,
        });
        assert_eq!(PodPlan::from_container_spec(&s, &kube, 1).unwrap_err().field, "mounts");
        let mut s = spec();
        s.published_ports.push((80, 8080));
        assert_eq!(PodPlan::from_container_spec(&s, &kube, 1).unwrap_err().field, "ports");
        let mut s = spec();
        s.user = Some("0".into());
        assert_eq!(PodPlan::from_container_spec(&s, &kube, 1).unwrap_err().field, "user");
        let mut s = spec();
        s.network = NetworkAttachment::Container("x".into());
        assert_eq!(PodPlan::from_container_spec(&s, &kube, 1).unwrap_err().field, "network");
    }

    #[test]
    fn object_names_are_dns_names() {
        assert_eq!(object_name("claude-agent-My_Agent.1-ab"), "claude-agent-my-agent-1-ab");
        assert_eq!(object_name("__"), "conductor");
        assert!(conductor_core::validate::dns_subdomain(&object_name(&"a_".repeat(300))).is_ok());
    }
}
