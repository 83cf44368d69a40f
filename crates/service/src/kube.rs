//! Kubernetes manifests of presets and workspaces (`conductor kube render`): the plan of a
//! preset is made from the configuration alone (no engine, no cluster), the plan of a
//! workspace from the container spec it was created with. The objects come from
//! `conductor-engine-kube` (typed k8s-openapi and agent-sandbox types).

use conductor_core::config::NetworkMode;
use conductor_core::config::{KubeMode, KubernetesConfig};
use conductor_core::engine::Labels;
use conductor_core::environment::Catalog;
use conductor_core::naming;
use conductor_core::resources::{LimitOverrides, WorkspaceLimits};
use conductor_core::task::service_defaults;
use conductor_core::{validate, Config};
use conductor_engine_kube::plan::{
    agent_args, cluster_image, set_proxy_env, AgentPlan, ContainerPlan, MountPlan, NetworkPlan, PodPlan, Res, Seccomp,
    VolumePlan, AGENT_PATH, WORKSPACE_CONTAINER,
};
use conductor_engine_kube::{render, sandbox};
use serde_json::Value;

use crate::{Conductor, Result, ServiceError};

/// What to render a preset with.
#[derive(Debug, Clone, Default)]
pub struct PresetOptions {
    /// Sidecar images (`redis:7`), containers of the same Pod.
    pub services: Vec<String>,
    /// Renders for this agent (the Pod's name and labels); `None`: a placeholder agent.
    pub agent_id: Option<String>,
    /// Overrides `engine.kubernetes.mode`.
    pub mode: Option<KubeMode>,
}

fn network_plan(mode: NetworkMode) -> NetworkPlan {
    match mode {
        NetworkMode::Isolated => NetworkPlan::Isolated,
        NetworkMode::Proxy => NetworkPlan::Proxy,
        NetworkMode::Egress => NetworkPlan::Egress,
    }
}

/// The Pod plan of a workspace of `preset`, from the configuration alone.
pub fn preset_plan(config: &Config, preset: &str, opts: &PresetOptions, instance: &str) -> Result<PodPlan> {
    let kube = &config.engine.kubernetes;
    let catalog = Catalog::from_config(config);
    let env = catalog
        .require(preset)
        .map_err(|m| ServiceError::invalid("environment", m))?;
    let agent_id = opts.agent_id.clone().unwrap_or_else(|| "agent".into());
    validate::agent_id(&agent_id).map_err(|m| ServiceError::invalid("agent_id", m))?;
    let limits = WorkspaceLimits::resolve(config, &LimitOverrides::default())
        .map_err(|e| ServiceError::invalid(format!("limits.{}", e.field), e.message))?;
    let ac = &config.isolated_workspace.agent_containers;
    let mut layers = vec![ac.network.layer()];
    if let Some(n) = &env.network {
        layers.push(n.layer());
    }
    let network = network_plan(conductor_core::egress::resolve(&layers).mode);
    let image = cluster_image(kube, env.plan(&ac.base_image).reference());
    let name = conductor_engine_kube::plan::object_name(&format!("claude-agent-{agent_id}-{preset}"));
    let mut labels = Labels::from([
        (naming::LABEL_INSTANCE.to_string(), instance.to_string()),
        (naming::LABEL_AGENT.to_string(), agent_id.clone()),
        (naming::LABEL_ENVIRONMENT.to_string(), preset.to_string()),
        (naming::LABEL_ROLE.to_string(), "workspace".to_string()),
    ]);
    labels.insert(naming::LABEL_VERSION.into(), env!("CARGO_PKG_VERSION").into());
    let mut env_vars = vec![("CONDUCTOR_AGENT_ID".to_string(), agent_id.clone())];
    if network == NetworkPlan::Proxy {
        set_proxy_env(&mut env_vars, kube);
    }
    let res = |memory: u64, nano: i64| Res {
        memory_bytes: memory,
        nano_cpus: nano,
    };
    let requests = res(
        ac.resources.requests.memory.bytes(),
        ac.resources.requests.cpu.nano_cpus(),
    );
    let lim = res(limits.memory.bytes(), limits.cpu.nano_cpus());
    let workspace = ContainerPlan {
        name: WORKSPACE_CONTAINER.into(),
        image,
        command: Some(vec![AGENT_PATH.into()]),
        args: Some(agent_args()),
        env: env_vars,
        workdir: Some("/workspace".into()),
        requests: Some(requests),
        limits: lim,
        readonly_rootfs: ac.readonly_rootfs,
        mounts: vec![MountPlan {
            volume: "workspace".into(),
            path: "/workspace".into(),
            sub_path: Some("workspace".into()),
            readonly: false,
        }],
        ports: Vec::new(),
    };
    let mut sidecars = Vec::new();
    let mut aliases = Vec::new();
    for (i, image) in opts.services.iter().enumerate() {
        validate::image_ref(image).map_err(|m| ServiceError::invalid(format!("services[{i}]"), m))?;
        let d = service_defaults(image);
        if sidecars.iter().any(|s: &ContainerPlan| s.name == d.name) || d.name == WORKSPACE_CONTAINER {
            return Err(ServiceError::invalid(
                format!("services[{i}]"),
                format!("a second container named {:?}", d.name),
            ));
        }
        validate::dns_label(&d.name).map_err(|m| ServiceError::invalid(format!("services[{i}]"), m))?;
        // Locally built sidecars keep their local tag (mapped to the registry); others are
        // pulled by the nodes.
        let reference = match (&d.known, &d.build_tag) {
            (Some(_), Some(tag)) => cluster_image(kube, tag),
            _ => d.pull_reference.clone(),
        };
        sidecars.push(ContainerPlan {
            name: d.name.clone(),
            image: reference,
            command: None,
            args: d.cmd.clone(),
            env: d.env.clone(),
            workdir: None,
            requests: Some(requests),
            limits: lim,
            readonly_rootfs: false,
            mounts: Vec::new(),
            ports: d.port.into_iter().collect(),
        });
        aliases.push(d.name);
    }
    let mut plan = PodPlan {
        name: name.clone(),
        namespace: kube.namespace.clone(),
        labels,
        annotations: Labels::new(),
        hostname: Some(conductor_engine_kube::plan::object_name(preset)),
        workspace,
        sidecars,
        volume: Some(VolumePlan {
            claim: format!("{name}-workspace"),
            size_bytes: limits.volume_size.bytes(),
            storage_class: kube.storage_class.clone(),
            sub_volumes: env.volumes.iter().map(|v| (v.name.clone(), v.target.clone())).collect(),
        }),
        tmp_bytes: ac.readonly_rootfs.then(|| ac.tmpfs_size.bytes()),
        agent: Some(AgentPlan {
            image: kube.agent_image.clone(),
            args: agent_args(),
        }),
        network,
        host_aliases: Vec::new(),
        seccomp: Seccomp::from_config(&kube.seccomp_profile),
        pull_policy: kube.image_pull_policy.clone(),
        mode: opts.mode.unwrap_or(kube.mode),
    };
    for a in aliases {
        plan.add_host_alias("127.0.0.1", &a);
    }
    plan.finish_mounts();
    Ok(plan)
}

fn json<T: serde::Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).expect("typed Kubernetes objects serialize")
}

/// The objects of a plan, in apply order: in `pod` mode the NetworkPolicy, the PVC and the
/// Pod; in `agent-sandbox` mode the NetworkPolicy, SandboxTemplate, SandboxWarmPool (of
/// `warm` replicas) and a SandboxClaim.
pub fn manifests(plan: &PodPlan, kube: &KubernetesConfig, warm: u32) -> Vec<Value> {
    match plan.mode {
        KubeMode::Pod => {
            let mut out = vec![json(&render::workspace_network_policy(plan, kube))];
            out.extend(render::pvc(plan).map(|p| json(&p)));
            out.push(json(&render::pod(plan)));
            out
        }
        KubeMode::AgentSandbox => vec![
            json(&sandbox::preset_network_policy(plan, kube)),
            json(&sandbox::sandbox_template(plan)),
            json(&sandbox::warm_pool(plan, warm)),
            json(&sandbox::claim(plan)),
        ],
    }
}

/// The RBAC objects of `conductor kube render rbac`.
pub fn rbac_manifests(kube: &KubernetesConfig) -> Vec<Value> {
    let r = render::rbac(kube);
    vec![
        json(&r.service_account),
        json(&r.role),
        json(&r.role_binding),
        json(&r.cluster_role),
        json(&r.cluster_role_binding),
    ]
}

/// Objects as one YAML stream (`---` between documents), for `kubectl apply -f -`.
pub fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("JSON values serialize as YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The Containerfile of the agent image: the static agent alone (the init container runs
/// `/conductor-agent install`, which copies it into the Pod's agent volume).
pub const AGENT_CONTAINERFILE: &str =
    "FROM scratch\nCOPY conductor-agent /conductor-agent\nENTRYPOINT [\"/conductor-agent\"]\n";

impl Conductor {
    /// Builds `engine.kubernetes.agent_image` (or `tag`) with the local engine from the
    /// static agent binary this conductor mounts into Podman workspaces; push it to the
    /// cluster's registry (docs/kubernetes.md, "Install").
    pub async fn build_agent_image(
        &self,
        tag: Option<&str>,
        progress: conductor_core::engine::ProgressSink,
    ) -> Result<conductor_core::engine::ImageInfo> {
        let tag = tag.unwrap_or(&self.config.engine.kubernetes.agent_image).to_string();
        validate::image_ref(&tag).map_err(|m| ServiceError::invalid("tag", m))?;
        let binary = crate::agent_client::binary(&self.config).ok_or_else(|| {
            ServiceError::invalid(
                "isolated_workspace.agent_containers.agent_binary",
                "no static conductor-agent binary was found (build it: RUSTFLAGS=\"-C target-feature=+crt-static\" \
                 cargo build --release --target x86_64-unknown-linux-gnu -p conductor-agent)",
            )
        })?;
        let bytes = std::fs::read(&binary).map_err(|e| ServiceError::host(format!("read {}", binary.display()), e))?;
        let spec = conductor_core::engine::BuildSpec {
            tag: tag.clone(),
            containerfile: AGENT_CONTAINERFILE.into(),
            context_files: vec![("conductor-agent".into(), bytes, 0o755)],
            build_args: Default::default(),
            labels: Labels::from([(naming::LABEL_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string())]),
            host_network: false,
        };
        Ok(self.engine.image_build(spec, progress).await?)
    }

    /// The Pod plan of an existing workspace, from the container spec it was created with.
    pub fn kube_workspace_plan(&self, id: &str, mode: Option<KubeMode>) -> Result<PodPlan> {
        let record = self.record(id)?;
        let spec = self.load_container_spec(&record.id)?;
        let kube = &self.config.engine.kubernetes;
        let mut plan = PodPlan::from_container_spec(&spec, kube, record.limits.volume_size.bytes())
            .map_err(|e| ServiceError::invalid(e.field, e.message))?;
        let ac = &self.config.isolated_workspace.agent_containers;
        plan.workspace.requests = Some(Res {
            memory_bytes: ac
                .resources
                .requests
                .memory
                .bytes()
                .min(plan.workspace.limits.memory_bytes),
            nano_cpus: ac
                .resources
                .requests
                .cpu
                .nano_cpus()
                .min(plan.workspace.limits.nano_cpus),
        });
        if let Some(m) = mode {
            plan.mode = m;
        } else {
            plan.mode = kube.mode;
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_renders_in_both_modes() {
        let config = Config::default();
        for preset in [
            "minimal",
            "python-dev",
            "nodejs-dev",
            "fullstack",
            "python-ml",
            "security-tools",
        ] {
            for mode in [KubeMode::Pod, KubeMode::AgentSandbox] {
                let opts = PresetOptions {
                    services: vec!["redis:7".into()],
                    agent_id: None,
                    mode: Some(mode),
                };
                let plan = preset_plan(&config, preset, &opts, "i1").unwrap();
                let docs = manifests(&plan, &config.engine.kubernetes, 0);
                assert!(!docs.is_empty());
                assert!(to_yaml(&docs).contains("kind: NetworkPolicy"));
            }
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let config = Config::default();
        let e = preset_plan(&config, "nope", &PresetOptions::default(), "i1").unwrap_err();
        assert!(e.to_string().contains("environment"), "{e}");
        let opts = PresetOptions {
            services: vec!["redis:7".into(), "docker.io/library/redis:6".into()],
            ..Default::default()
        };
        let e = preset_plan(&config, "minimal", &opts, "i1").unwrap_err();
        assert!(e.to_string().contains("services[1]"), "{e}");
        let opts = PresetOptions {
            agent_id: Some("Bad Agent".into()),
            ..Default::default()
        };
        assert!(preset_plan(&config, "minimal", &opts, "i1")
            .unwrap_err()
            .to_string()
            .contains("agent_id"));
    }
}
