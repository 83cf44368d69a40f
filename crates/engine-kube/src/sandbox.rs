//! kubernetes-sigs/agent-sandbox, `v1beta1`: the four kinds conductor writes or reads, and
//! how presets, warm pools and workspaces become them.
//!
//! Targeted version: the `v1beta1` API of agent-sandbox **v0.5.6** (the types are unchanged
//! up to commit 2fd412d of `main`), read from `api/v1beta1/sandbox_types.go` and
//! `extensions/api/v1beta1/{sandboxtemplate,sandboxwarmpool,sandboxclaim}_types.go`. In
//! `v1beta1` a claim names a warm pool (`spec.warmPoolRef`), not a template: a cold start is a
//! claim on a pool of `replicas: 0`. conductor never runs a controller against these kinds;
//! the project's controllers do, and conductor adopts the Pod a claim got.

use std::collections::BTreeMap;

use conductor_core::config::KubernetesConfig;
use conductor_core::engine::Labels;
use conductor_core::naming;
use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::plan::PodPlan;
use crate::render;

/// Annotation of a Sandbox naming its Pod (the Sandbox's name when absent).
pub const ANNOTATION_POD_NAME: &str = "agents.x-k8s.io/pod-name";

/// `spec.podTemplate`: a PodSpec plus the labels and annotations copied to the Pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodTemplate {
    pub spec: PodSpec,
    #[serde(default)]
    pub metadata: PodMetadata,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `EmbeddedObjectMetadata` of a volume claim template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EmbeddedObjectMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A PVC made per Sandbox, named `<metadata.name>-<sandbox>` and mounted as the volume
/// `<metadata.name>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PersistentVolumeClaimTemplate {
    pub metadata: EmbeddedObjectMetadata,
    pub spec: PersistentVolumeClaimSpec,
}

/// `agents.x-k8s.io/v1beta1` Sandbox: one Pod, its PVCs and optionally a headless Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agents.x-k8s.io",
    version = "v1beta1",
    kind = "Sandbox",
    plural = "sandboxes",
    namespaced,
    status = "SandboxStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    pub pod_template: PodTemplate,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<PersistentVolumeClaimTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<bool>,
    /// RFC 3339 time at which the Pod is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<String>,
    /// `Delete` or `Retain` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<String>,
    /// `Running` (the default) or `Suspended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_mode: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default, rename = "serviceFQDN", skip_serializing_if = "Option::is_none")]
    pub service_fqdn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// `spec.networkPolicy` of a template (conductor leaves it unset and manages its own).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TemplateNetworkPolicy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<k8s_openapi::api::networking::v1::NetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<k8s_openapi::api::networking::v1::NetworkPolicyEgressRule>,
}

/// `extensions.agents.x-k8s.io/v1beta1` SandboxTemplate: a preset.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1beta1",
    kind = "SandboxTemplate",
    plural = "sandboxtemplates",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateSpec {
    pub pod_template: PodTemplate,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<PersistentVolumeClaimTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<TemplateNetworkPolicy>,
    /// `Managed` (the default) or `Unmanaged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy_management: Option<String>,
    /// `Allowed`, `Overrides` or `Disallowed` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars_injection_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim_templates_policy: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NameRef {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct WarmPoolUpdateStrategy {
    /// `Recreate` or `OnReplenish` (the default).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
}

/// `extensions.agents.x-k8s.io/v1beta1` SandboxWarmPool: pre-started Sandboxes of a template.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1beta1",
    kind = "SandboxWarmPool",
    plural = "sandboxwarmpools",
    namespaced,
    status = "SandboxWarmPoolStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    pub sandbox_template_ref: NameRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_strategy: Option<WarmPoolUpdateStrategy>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolStatus {
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default)]
    pub observed_generation: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimLifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i32>,
    /// `Delete`, `DeleteForeground` or `Retain` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<String>,
}

/// `extensions.agents.x-k8s.io/v1beta1` SandboxClaim: a workspace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "extensions.agents.x-k8s.io",
    version = "v1beta1",
    kind = "SandboxClaim",
    plural = "sandboxclaims",
    namespaced,
    status = "SandboxClaimStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimSpec {
    pub warm_pool_ref: NameRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<ClaimLifecycle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_pod_metadata: Option<PodMetadata>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ClaimedSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SandboxClaimStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub sandbox: ClaimedSandbox,
}

/// Name of a preset's SandboxTemplate and SandboxWarmPool.
pub fn preset_object_name(environment: &str) -> String {
    crate::plan::object_name(&format!("conductor-{environment}"))
}

/// The labels a preset's Pods carry from their template (the NetworkPolicy's selector):
/// the environment and the role, never the instance, so that the policy selects every Pod of
/// the preset whoever claimed it.
pub fn preset_labels(plan: &PodPlan) -> Labels {
    plan.labels
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), naming::LABEL_ENVIRONMENT | naming::LABEL_ROLE))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The pod template of a preset: the workspace PodSpec, whose `/workspace` volume comes from
/// the `workspace` volume claim template (the controller names the PVC and adds the volume).
fn blueprint(plan: &PodPlan) -> (PodTemplate, Vec<PersistentVolumeClaimTemplate>) {
    let mut spec = render::pod_spec(plan);
    if let Some(vols) = spec.volumes.as_mut() {
        vols.retain(|v| v.name != "workspace");
    }
    if spec.volumes.as_ref().is_some_and(Vec::is_empty) {
        spec.volumes = None;
    }
    let claims = plan
        .volume
        .iter()
        .map(|v| PersistentVolumeClaimTemplate {
            metadata: EmbeddedObjectMetadata {
                name: Some("workspace".into()),
                labels: preset_labels(plan),
                annotations: BTreeMap::new(),
            },
            spec: render::pvc_spec(v.size_bytes, v.storage_class.as_deref()),
        })
        .collect();
    (
        PodTemplate {
            spec,
            metadata: PodMetadata {
                labels: preset_labels(plan),
                annotations: BTreeMap::new(),
            },
        },
        claims,
    )
}

/// A preset as a SandboxTemplate. conductor manages the NetworkPolicy itself
/// ([`preset_network_policy`]), so the template's is `Unmanaged` (the controller's default
/// allows the public internet, which `isolated` must not); env injection stays `Disallowed`.
pub fn sandbox_template(plan: &PodPlan) -> SandboxTemplate {
    let (pod_template, volume_claim_templates) = blueprint(plan);
    let name = preset_object_name(plan_environment(plan));
    let mut t = SandboxTemplate::new(
        &name,
        SandboxTemplateSpec {
            pod_template,
            volume_claim_templates,
            service: Some(false),
            network_policy: None,
            network_policy_management: Some("Unmanaged".into()),
            env_vars_injection_policy: Some("Disallowed".into()),
            volume_claim_templates_policy: Some("Disallowed".into()),
        },
    );
    t.metadata = render::meta(&name, &plan.namespace, &preset_labels(plan));
    t
}

fn plan_environment(plan: &PodPlan) -> &str {
    plan.labels
        .get(naming::LABEL_ENVIRONMENT)
        .map(String::as_str)
        .unwrap_or("workspace")
}

/// A preset's warm pool: `replicas` started Sandboxes; 0 makes every claim a cold start.
pub fn warm_pool(plan: &PodPlan, replicas: u32) -> SandboxWarmPool {
    let name = preset_object_name(plan_environment(plan));
    let mut p = SandboxWarmPool::new(
        &name,
        SandboxWarmPoolSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            sandbox_template_ref: NameRef { name: name.clone() },
            update_strategy: Some(WarmPoolUpdateStrategy {
                type_: Some("OnReplenish".into()),
            }),
        },
    );
    p.metadata = render::meta(&name, &plan.namespace, &preset_labels(plan));
    p
}

/// A workspace as a claim on its preset's pool; the workspace's own labels go onto the Pod
/// through `additionalPodMetadata` (reconcile finds it by them).
pub fn claim(plan: &PodPlan) -> SandboxClaim {
    let pool = preset_object_name(plan_environment(plan));
    let mut c = SandboxClaim::new(
        &plan.name,
        SandboxClaimSpec {
            warm_pool_ref: NameRef { name: pool },
            lifecycle: None,
            additional_pod_metadata: Some(PodMetadata {
                labels: plan.selector(),
                annotations: BTreeMap::new(),
            }),
        },
    );
    c.metadata = render::meta(&plan.name, &plan.namespace, &plan.selector());
    c
}

/// A workspace as a Sandbox of its own (a cold start without a pool).
pub fn sandbox(plan: &PodPlan) -> Sandbox {
    let (mut pod_template, volume_claim_templates) = blueprint(plan);
    pod_template.metadata.labels = plan.selector();
    let mut s = Sandbox::new(
        &plan.name,
        SandboxSpec {
            pod_template,
            volume_claim_templates,
            service: Some(false),
            shutdown_time: None,
            shutdown_policy: None,
            operating_mode: Some("Running".into()),
        },
    );
    s.metadata = render::meta(&plan.name, &plan.namespace, &plan.selector());
    s
}

/// The NetworkPolicy of every Pod of a preset (warm ones included).
pub fn preset_network_policy(plan: &PodPlan, kube: &KubernetesConfig) -> NetworkPolicy {
    let name = preset_object_name(plan_environment(plan));
    render::network_policy(
        &name,
        &plan.namespace,
        &preset_labels(plan),
        preset_labels(plan),
        plan.network,
        kube,
    )
}

/// The name of the Pod a Sandbox runs.
pub fn pod_name(sandbox: &Sandbox) -> String {
    sandbox
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_POD_NAME))
        .cloned()
        .or_else(|| sandbox.metadata.name.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NetworkPlan;

    #[test]
    fn a_preset_becomes_a_template_a_pool_and_claims() {
        let plan = crate::render::tests::plan(NetworkPlan::Isolated);
        let t = sandbox_template(&plan);
        assert_eq!(t.metadata.name.as_deref(), Some("conductor-minimal"));
        assert_eq!(t.spec.network_policy_management.as_deref(), Some("Unmanaged"));
        let vols: Vec<_> = t
            .spec
            .pod_template
            .spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        assert!(!vols.contains(&"workspace".to_string()), "the claim template makes it");
        assert_eq!(
            t.spec.volume_claim_templates[0].metadata.name.as_deref(),
            Some("workspace")
        );
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["apiVersion"], "extensions.agents.x-k8s.io/v1beta1");
        assert_eq!(v["kind"], "SandboxTemplate");
        assert!(v["spec"]["podTemplate"]["spec"]["containers"].is_array());

        let p = serde_json::to_value(warm_pool(&plan, 0)).unwrap();
        assert_eq!(p["spec"]["replicas"], 0);
        assert_eq!(p["spec"]["sandboxTemplateRef"]["name"], "conductor-minimal");

        let c = serde_json::to_value(claim(&plan)).unwrap();
        assert_eq!(c["spec"]["warmPoolRef"]["name"], "conductor-minimal");
        assert_eq!(
            c["spec"]["additionalPodMetadata"]["labels"]["io.conductor.workspace"],
            "ws-3f2c9a1b0000"
        );
        let s = serde_json::to_value(sandbox(&plan)).unwrap();
        assert_eq!(s["apiVersion"], "agents.x-k8s.io/v1beta1");
        assert_eq!(s["spec"]["operatingMode"], "Running");
    }
}
