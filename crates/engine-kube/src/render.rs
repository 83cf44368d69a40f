//! Typed Kubernetes objects of a workspace: the Pod (hardened as on Podman), its PVC and
//! its NetworkPolicy, plus the RBAC conductor needs. Pure functions of a [`PodPlan`].

use std::collections::BTreeMap;

use conductor_core::config::KubernetesConfig;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HostAlias, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccount, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::plan::{ContainerPlan, NetworkPlan, PodPlan, Res, Seccomp, AGENT_DIR, AGENT_PATH, WORKSPACE_UID};

/// Annotation naming the conductor version that rendered an object.
pub const ANNOTATION_VERSION: &str = "conductor.io/version";
/// Name of the ServiceAccount, Role and bindings of `conductor kube render rbac`.
pub const RBAC_NAME: &str = "conductor";

/// Ranges a workspace in `egress` mode never reaches: private, shared, loopback and
/// link-local (cloud metadata) addresses.
pub const DENIED_V4: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "0.0.0.0/8",
];
pub const DENIED_V6: &[&str] = &["fc00::/7", "fe80::/10", "::1/128"];

fn strings(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then(|| map.clone())
}

fn quantity_cpu(nano: i64) -> Quantity {
    Quantity(format!("{}m", (nano / 1_000_000).max(1)))
}

fn quantity_bytes(bytes: u64) -> Quantity {
    Quantity(bytes.to_string())
}

fn resources(req: Option<Res>, lim: Res) -> ResourceRequirements {
    let map = |r: Res| {
        BTreeMap::from([
            ("cpu".to_string(), quantity_cpu(r.nano_cpus)),
            ("memory".to_string(), quantity_bytes(r.memory_bytes)),
        ])
    };
    ResourceRequirements {
        limits: Some(map(lim)),
        requests: Some(map(req.unwrap_or(lim))),
        ..Default::default()
    }
}

/// The container hardening of every workspace and sidecar container (what Podman applies:
/// no capability, no privilege gain, uid 1000, optionally a read-only root).
fn hardened(readonly_rootfs: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(readonly_rootfs),
        run_as_non_root: Some(true),
        run_as_user: Some(WORKSPACE_UID),
        run_as_group: Some(WORKSPACE_UID),
        ..Default::default()
    }
}

fn seccomp(s: &Seccomp) -> SeccompProfile {
    match s {
        Seccomp::Localhost(path) => SeccompProfile {
            type_: "Localhost".into(),
            localhost_profile: Some(path.clone()),
        },
        Seccomp::RuntimeDefault => SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        },
    }
}

fn container(c: &ContainerPlan, pull_policy: &str) -> Container {
    Container {
        name: c.name.clone(),
        image: Some(c.image.clone()),
        image_pull_policy: Some(pull_policy.to_string()),
        command: c.command.clone(),
        args: c.args.clone(),
        env: (!c.env.is_empty()).then(|| {
            c.env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    value_from: None,
                })
                .collect()
        }),
        working_dir: c.workdir.clone(),
        resources: Some(resources(c.requests, c.limits)),
        security_context: Some(hardened(c.readonly_rootfs)),
        volume_mounts: (!c.mounts.is_empty()).then(|| {
            c.mounts
                .iter()
                .map(|m| VolumeMount {
                    name: m.volume.clone(),
                    mount_path: m.path.clone(),
                    sub_path: m.sub_path.clone(),
                    read_only: m.readonly.then_some(true),
                    ..Default::default()
                })
                .collect()
        }),
        ports: (!c.ports.is_empty()).then(|| {
            c.ports
                .iter()
                .map(|p| ContainerPort {
                    container_port: i32::from(*p),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// Object metadata with conductor's labels and the version annotation.
pub fn meta(name: &str, namespace: &str, labels: &BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: strings(labels),
        annotations: Some(BTreeMap::from([(
            ANNOTATION_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])),
        ..Default::default()
    }
}

/// The PodSpec of a workspace: hardened containers, the agent as PID 1 (copied from its
/// image by an init container into an `emptyDir`), the PVC at `/workspace`, sidecars as
/// containers of the same Pod (they share its loopback; their names resolve to 127.0.0.1).
pub fn pod_spec(plan: &PodPlan) -> PodSpec {
    let mut volumes = Vec::new();
    if let Some(v) = &plan.volume {
        volumes.push(Volume {
            name: "workspace".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: v.claim.clone(),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    if let Some(bytes) = plan.tmp_bytes {
        volumes.push(Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(quantity_bytes(bytes)),
            }),
            ..Default::default()
        });
    }
    let mut init_containers = None;
    if let Some(agent) = &plan.agent {
        for (name, size) in [("conductor-agent", 64u64 << 20), ("conductor-run", 1 << 20)] {
            volumes.push(Volume {
                name: name.into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(quantity_bytes(size)),
                }),
                ..Default::default()
            });
        }
        let install = ContainerPlan {
            name: "conductor-agent-install".into(),
            image: agent.image.clone(),
            command: Some(vec!["/conductor-agent".into(), "install".into(), AGENT_PATH.into()]),
            args: None,
            env: Vec::new(),
            workdir: None,
            requests: None,
            limits: Res {
                memory_bytes: 64 << 20,
                nano_cpus: 100_000_000,
            },
            readonly_rootfs: true,
            mounts: vec![crate::plan::MountPlan {
                volume: "conductor-agent".into(),
                path: AGENT_DIR.into(),
                sub_path: None,
                readonly: false,
            }],
            ports: Vec::new(),
        };
        init_containers = Some(vec![container(&install, &plan.pull_policy)]);
    }
    let mut containers = vec![container(&plan.workspace, &plan.pull_policy)];
    containers.extend(plan.sidecars.iter().map(|s| container(s, &plan.pull_policy)));
    PodSpec {
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        hostname: plan.hostname.clone(),
        restart_policy: Some("Never".into()),
        termination_grace_period_seconds: Some(10),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(WORKSPACE_UID),
            run_as_group: Some(WORKSPACE_UID),
            run_as_non_root: Some(true),
            fs_group: Some(WORKSPACE_UID),
            seccomp_profile: Some(seccomp(&plan.seccomp)),
            ..Default::default()
        }),
        host_aliases: (!plan.host_aliases.is_empty()).then(|| {
            plan.host_aliases
                .iter()
                .map(|(ip, names)| HostAlias {
                    ip: ip.clone(),
                    hostnames: Some(names.clone()),
                })
                .collect()
        }),
        init_containers,
        containers,
        volumes: (!volumes.is_empty()).then_some(volumes),
        ..Default::default()
    }
}

/// The workspace's Pod.
pub fn pod(plan: &PodPlan) -> Pod {
    let mut metadata = meta(&plan.name, &plan.namespace, &plan.labels);
    if let Some(a) = metadata.annotations.as_mut() {
        a.extend(plan.annotations.clone());
    }
    Pod {
        metadata,
        spec: Some(pod_spec(plan)),
        status: None,
    }
}

/// The PVC behind `/workspace`, sized as the workspace's volume (the quota).
pub fn pvc_spec(size_bytes: u64, storage_class: Option<&str>) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([("storage".to_string(), quantity_bytes(size_bytes))])),
            limits: None,
        }),
        storage_class_name: storage_class.map(str::to_string),
        volume_mode: Some("Filesystem".into()),
        ..Default::default()
    }
}

pub fn pvc(plan: &PodPlan) -> Option<PersistentVolumeClaim> {
    let v = plan.volume.as_ref()?;
    Some(PersistentVolumeClaim {
        metadata: meta(&v.claim, &plan.namespace, &plan.selector()),
        spec: Some(pvc_spec(v.size_bytes, v.storage_class.as_deref())),
        status: None,
    })
}

fn dns_rule() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    "kube-system".to_string(),
                )])),
                ..Default::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())])),
                ..Default::default()
            }),
            ip_block: None,
        }]),
        ports: Some(
            ["UDP", "TCP"]
                .into_iter()
                .map(|p| NetworkPolicyPort {
                    protocol: Some(p.into()),
                    port: Some(IntOrString::Int(53)),
                    end_port: None,
                })
                .collect(),
        ),
    }
}

/// The egress rules of a network mode: none (`isolated`: everything denied), the proxy
/// alone (`proxy`; DNS too when the proxy is named by a host name), or public addresses
/// (`egress`; never private ranges, loopback or link-local metadata).
pub fn egress_rules(network: NetworkPlan, kube: &KubernetesConfig) -> Vec<NetworkPolicyEgressRule> {
    match network {
        NetworkPlan::Isolated => Vec::new(),
        NetworkPlan::Proxy => {
            let p = &kube.egress_proxy;
            let mut rules = vec![NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_string(),
                            p.namespace.clone(),
                        )])),
                        ..Default::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(p.pod_labels.clone()),
                        ..Default::default()
                    }),
                    ip_block: None,
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    protocol: Some("TCP".into()),
                    port: Some(IntOrString::Int(i32::from(p.port))),
                    end_port: None,
                }]),
            }];
            if p.host.parse::<std::net::IpAddr>().is_err() {
                rules.push(dns_rule());
            }
            rules
        }
        NetworkPlan::Egress => vec![
            NetworkPolicyEgressRule {
                to: Some(vec![
                    NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: "0.0.0.0/0".into(),
                            except: Some(DENIED_V4.iter().map(|s| s.to_string()).collect()),
                        }),
                        ..Default::default()
                    },
                    NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: "::/0".into(),
                            except: Some(DENIED_V6.iter().map(|s| s.to_string()).collect()),
                        }),
                        ..Default::default()
                    },
                ]),
                ports: None,
            },
            dns_rule(),
        ],
    }
}

/// The NetworkPolicy of pods matching `selector`: ingress always denied, egress as the
/// network mode says.
pub fn network_policy(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    network: NetworkPlan,
    kube: &KubernetesConfig,
) -> NetworkPolicy {
    let egress = egress_rules(network, kube);
    NetworkPolicy {
        metadata: meta(name, namespace, labels),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: None,
            egress: (!egress.is_empty()).then_some(egress),
        }),
    }
}

/// The NetworkPolicy of one workspace Pod.
pub fn workspace_network_policy(plan: &PodPlan, kube: &KubernetesConfig) -> NetworkPolicy {
    network_policy(
        &plan.name,
        &plan.namespace,
        &plan.selector(),
        plan.selector(),
        plan.network,
        kube,
    )
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The namespaced rules conductor needs, verb by verb (`conductor kube render rbac`).
pub fn role_rules(agent_sandbox: bool) -> Vec<PolicyRule> {
    let mut rules = vec![
        // Workspaces: create, watch until running, inspect, list for reconcile, delete.
        rule(&[""], &["pods"], &["create", "get", "list", "watch", "delete"]),
        // Exec and files go through the agent over the exec subresource (a WebSocket
        // upgrade of GET; create for clients that POST).
        rule(&[""], &["pods/exec"], &["create", "get"]),
        rule(&[""], &["pods/log"], &["get"]),
        rule(&[""], &["persistentvolumeclaims"], &["create", "get", "list", "delete"]),
        rule(
            &["networking.k8s.io"],
            &["networkpolicies"],
            &["create", "get", "list", "delete"],
        ),
        rule(
            &["snapshot.storage.k8s.io"],
            &["volumesnapshots"],
            &["create", "get", "list", "delete"],
        ),
    ];
    if agent_sandbox {
        rules.push(rule(
            &["extensions.agents.x-k8s.io"],
            &["sandboxclaims"],
            &["create", "get", "list", "watch", "delete"],
        ));
        rules.push(rule(
            &["extensions.agents.x-k8s.io"],
            &["sandboxtemplates", "sandboxwarmpools"],
            &["create", "get", "list", "patch"],
        ));
        rules.push(rule(&["agents.x-k8s.io"], &["sandboxes"], &["get", "list", "watch"]));
    }
    rules
}

/// Cluster-scoped reads of `conductor doctor` (storage and snapshot classes).
pub fn cluster_rules() -> Vec<PolicyRule> {
    vec![
        rule(&["storage.k8s.io"], &["storageclasses"], &["get", "list"]),
        rule(
            &["snapshot.storage.k8s.io"],
            &["volumesnapshotclasses"],
            &["get", "list"],
        ),
    ]
}

/// The RBAC objects of conductor's service account, in apply order.
pub struct Rbac {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub cluster_role: ClusterRole,
    pub cluster_role_binding: ClusterRoleBinding,
}

pub fn rbac(kube: &KubernetesConfig) -> Rbac {
    let ns = &kube.namespace;
    let labels = BTreeMap::from([("app.kubernetes.io/name".to_string(), "conductor".to_string())]);
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: RBAC_NAME.into(),
        namespace: Some(ns.clone()),
        api_group: None,
    };
    let agent_sandbox = kube.mode == conductor_core::config::KubeMode::AgentSandbox;
    let cluster_name = format!("{RBAC_NAME}-{ns}");
    let mut cluster_meta = meta(&cluster_name, ns, &labels);
    cluster_meta.namespace = None;
    Rbac {
        service_account: ServiceAccount {
            metadata: meta(RBAC_NAME, ns, &labels),
            automount_service_account_token: Some(true),
            ..Default::default()
        },
        role: Role {
            metadata: meta(RBAC_NAME, ns, &labels),
            rules: Some(role_rules(agent_sandbox)),
        },
        role_binding: RoleBinding {
            metadata: meta(RBAC_NAME, ns, &labels),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: RBAC_NAME.into(),
            },
            subjects: Some(vec![subject.clone()]),
        },
        cluster_role: ClusterRole {
            metadata: cluster_meta.clone(),
            rules: Some(cluster_rules()),
            aggregation_rule: None,
        },
        cluster_role_binding: ClusterRoleBinding {
            metadata: cluster_meta,
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: cluster_name,
            },
            subjects: Some(vec![subject]),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::{AgentPlan, MountPlan, VolumePlan};
    use conductor_core::config::KubeMode;

    pub(crate) fn plan(network: NetworkPlan) -> PodPlan {
        let mut p = PodPlan {
            name: "claude-agent-a1-3f2c9a1b".into(),
            namespace: "agents".into(),
            labels: conductor_core::naming::workspace_labels("i1", "ws-3f2c9a1b0000", "a1", "minimal"),
            annotations: Default::default(),
            hostname: Some("3f2c9a1b".into()),
            workspace: ContainerPlan {
                name: "workspace".into(),
                image: "localhost/conductor/minimal:x".into(),
                command: Some(vec![AGENT_PATH.into()]),
                args: Some(crate::plan::agent_args()),
                env: vec![("A".into(), "1".into())],
                workdir: Some("/workspace".into()),
                requests: Some(Res {
                    memory_bytes: 256 << 20,
                    nano_cpus: 500_000_000,
                }),
                limits: Res {
                    memory_bytes: 512 << 20,
                    nano_cpus: 1_500_000_000,
                },
                readonly_rootfs: true,
                mounts: vec![MountPlan {
                    volume: "workspace".into(),
                    path: "/workspace".into(),
                    sub_path: Some("workspace".into()),
                    readonly: false,
                }],
                ports: vec![],
            },
            sidecars: vec![],
            volume: Some(VolumePlan {
                claim: "claude-agent-a1-3f2c9a1b-workspace".into(),
                size_bytes: 1 << 30,
                storage_class: Some("fast".into()),
                sub_volumes: vec![],
            }),
            tmp_bytes: Some(64 << 20),
            agent: Some(AgentPlan {
                image: "localhost/conductor/agent:0.1.0".into(),
                args: crate::plan::agent_args(),
            }),
            network,
            host_aliases: vec![],
            seccomp: Seccomp::Localhost("conductor/seccomp.json".into()),
            pull_policy: "IfNotPresent".into(),
            mode: KubeMode::Pod,
        };
        p.finish_mounts();
        p
    }

    #[test]
    fn the_pod_carries_the_podman_hardening() {
        let pod = pod(&plan(NetworkPlan::Isolated));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.enable_service_links, Some(false));
        let psc = spec.security_context.unwrap();
        assert_eq!(
            (psc.run_as_user, psc.run_as_group, psc.run_as_non_root),
            (Some(1000), Some(1000), Some(true))
        );
        let sp = psc.seccomp_profile.unwrap();
        assert_eq!(sp.type_, "Localhost");
        assert_eq!(sp.localhost_profile.as_deref(), Some("conductor/seccomp.json"));
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "1500m");
        assert_eq!(r.limits.as_ref().unwrap()["memory"].0, (512u64 << 20).to_string());
        assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "500m");
        // The agent is PID 1, copied in by the init container.
        assert_eq!(c.command.as_deref(), Some(&[AGENT_PATH.to_string()][..]));
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(init.command.as_ref().unwrap()[1], "install");
        let names: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["workspace", "tmp", "conductor-agent", "conductor-run"]);
    }

    #[test]
    fn network_policies_deny_private_ranges_and_metadata() {
        let kube = KubernetesConfig::default();
        let iso = workspace_network_policy(&plan(NetworkPlan::Isolated), &kube)
            .spec
            .unwrap();
        assert_eq!(
            iso.policy_types.as_deref(),
            Some(&["Ingress".to_string(), "Egress".to_string()][..])
        );
        assert!(
            iso.egress.is_none() && iso.ingress.is_none(),
            "isolated: nothing allowed"
        );
        let sel = iso.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(sel["io.conductor.workspace"], "ws-3f2c9a1b0000");

        let proxy = workspace_network_policy(&plan(NetworkPlan::Proxy), &kube).spec.unwrap();
        let rules = proxy.egress.unwrap();
        assert_eq!(rules.len(), 2, "the proxy, and DNS because the proxy is a name");
        assert!(rules
            .iter()
            .all(|r| r.to.as_ref().unwrap().iter().all(|p| p.ip_block.is_none())));
        let mut by_ip = kube.clone();
        by_ip.egress_proxy.host = "10.96.0.20".into();
        assert_eq!(egress_rules(NetworkPlan::Proxy, &by_ip).len(), 1);

        let eg = egress_rules(NetworkPlan::Egress, &kube);
        let blocks: Vec<_> = eg[0]
            .to
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.ip_block.clone().unwrap())
            .collect();
        let except = blocks[0].except.clone().unwrap();
        for r in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"] {
            assert!(except.contains(&r.to_string()), "{r}");
        }
        assert!(blocks[1].except.as_ref().unwrap().contains(&"fe80::/10".to_string()));
    }

    #[test]
    fn rbac_has_exactly_the_verbs_needed() {
        let kube = KubernetesConfig::default();
        let r = rbac(&kube);
        let rules = r.role.rules.unwrap();
        assert!(rules.iter().all(|r| !r.verbs.iter().any(|v| v == "*")));
        assert!(!rules
            .iter()
            .any(|r| r.resources.as_ref().unwrap().iter().any(|x| x.starts_with("sandbox"))));
        let with_as = role_rules(true);
        assert!(with_as
            .iter()
            .any(|r| r.resources.as_ref().unwrap().contains(&"sandboxclaims".to_string())));
        assert_eq!(
            r.role_binding.subjects.unwrap()[0].namespace.as_deref(),
            Some("conductor")
        );
    }
}
