//! What `conductor doctor` checks on a cluster: reachable, the namespace, every permission
//! of [`crate::render::role_rules`], the storage and snapshot classes, the NetworkPolicy API
//! and, in agent-sandbox mode, its CRDs.

use conductor_core::config::{KubeMode, KubernetesConfig};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::discovery::ApiResource;
use kube::Client;

/// One line of the doctor's cluster section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> ClusterCheck {
    ClusterCheck {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// A VolumeSnapshotClass of the cluster.
#[derive(Debug, Clone)]
pub struct SnapshotClass {
    pub name: String,
    pub default: bool,
}

/// The cluster's VolumeSnapshotClasses; an error when the snapshot API is not installed.
pub async fn snapshot_classes(client: &Client) -> Result<Vec<SnapshotClass>, String> {
    let ar = ApiResource {
        group: "snapshot.storage.k8s.io".into(),
        version: "v1".into(),
        api_version: "snapshot.storage.k8s.io/v1".into(),
        kind: "VolumeSnapshotClass".into(),
        plural: "volumesnapshotclasses".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let list = api.list(&ListParams::default()).await.map_err(|e| match e {
        kube::Error::Api(s) if s.is_not_found() => {
            "the VolumeSnapshot API (snapshot.storage.k8s.io/v1) is not installed".to_string()
        }
        other => format!("list VolumeSnapshotClasses: {other}"),
    })?;
    Ok(list
        .into_iter()
        .map(|o| SnapshotClass {
            default: o
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("snapshot.storage.kubernetes.io/is-default-class"))
                .is_some_and(|v| v == "true"),
            name: o.metadata.name.unwrap_or_default(),
        })
        .collect())
}

async fn allowed(client: &Client, ns: &str, group: &str, resource: &str, verb: &str) -> Result<bool, String> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r.to_string(), Some(s.to_string())),
        None => (resource.to_string(), None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_string()),
                group: Some(group.to_string()),
                resource: Some(resource),
                subresource,
                verb: Some(verb.to_string()),
                ..Default::default()
            }),
            non_resource_attributes: None,
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.status.is_some_and(|s| s.allowed))
}

async fn served(client: &Client, api_version: &str, plural: &str) -> Result<bool, String> {
    match client.list_api_group_resources(api_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Every cluster check, in order; the first failing one that blocks the rest ends the list.
pub async fn checks(client: &Client, kube: &KubernetesConfig) -> Vec<ClusterCheck> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => out.push(check("cluster", true, format!("Kubernetes {} answers", v.git_version))),
        Err(e) => {
            out.push(check("cluster", false, format!("unreachable: {e}")));
            return out;
        }
    }
    let ns = &kube.namespace;
    match Api::<Namespace>::all(client.clone()).get_opt(ns).await {
        Ok(Some(_)) => out.push(check("namespace", true, format!("{ns} exists"))),
        Ok(None) => out.push(check(
            "namespace",
            false,
            format!("{ns} does not exist (kubectl create namespace {ns})"),
        )),
        // A namespaced service account often may not read namespaces: not a failure.
        Err(e) => out.push(check("namespace", true, format!("{ns} (cannot read namespaces: {e})"))),
    }
    let mut missing = Vec::new();
    for rule in crate::render::role_rules(kube.mode == KubeMode::AgentSandbox) {
        let group = rule
            .api_groups
            .as_ref()
            .and_then(|g| g.first())
            .cloned()
            .unwrap_or_default();
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                match allowed(client, ns, &group, resource, verb).await {
                    Ok(true) => {}
                    Ok(false) => missing.push(format!("{verb} {resource}")),
                    Err(e) => missing.push(format!("{verb} {resource} (review failed: {e})")),
                }
            }
        }
    }
    out.push(if missing.is_empty() {
        check(
            "rbac",
            true,
            "every permission of `conductor kube render rbac` is granted",
        )
    } else {
        check("rbac", false, format!("missing in {ns}: {}", missing.join(", ")))
    });
    match Api::<StorageClass>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            let default = list.items.iter().find(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                    .is_some_and(|v| v == "true")
            });
            out.push(match (&kube.storage_class, default) {
                (Some(name), _) if list.items.iter().any(|c| c.metadata.name.as_deref() == Some(name)) => {
                    check("storage class", true, format!("{name} exists"))
                }
                (Some(name), _) => check(
                    "storage class",
                    false,
                    format!("{name} (engine.kubernetes.storage_class) does not exist"),
                ),
                (None, Some(d)) => check(
                    "storage class",
                    true,
                    format!("the default class {}", d.metadata.name.clone().unwrap_or_default()),
                ),
                (None, None) => check(
                    "storage class",
                    false,
                    "no default StorageClass: set engine.kubernetes.storage_class",
                ),
            });
        }
        Err(e) => out.push(check(
            "storage class",
            false,
            format!("cannot list StorageClasses: {e}"),
        )),
    }
    out.push(match snapshot_classes(client).await {
        Ok(c) if c.is_empty() => check(
            "snapshot class",
            false,
            "none: snapshots are not supported on this cluster",
        ),
        Ok(c) => check(
            "snapshot class",
            true,
            c.iter().map(|c| c.name.clone()).collect::<Vec<_>>().join(", "),
        ),
        Err(e) => check("snapshot class", false, format!("{e}: snapshots are not supported")),
    });
    out.push(match served(client, "networking.k8s.io/v1", "networkpolicies").await {
        Ok(true) => check(
            "network policy",
            true,
            "the NetworkPolicy API is served (it is enforced only by a CNI plugin that implements it, e.g. Calico or Cilium)",
        ),
        Ok(false) => check("network policy", false, "the NetworkPolicy API is not served: workspaces would not be isolated"),
        Err(e) => check("network policy", false, e),
    });
    if kube.mode == KubeMode::AgentSandbox {
        for (api, plural) in [
            ("agents.x-k8s.io/v1beta1", "sandboxes"),
            ("extensions.agents.x-k8s.io/v1beta1", "sandboxclaims"),
            ("extensions.agents.x-k8s.io/v1beta1", "sandboxtemplates"),
            ("extensions.agents.x-k8s.io/v1beta1", "sandboxwarmpools"),
        ] {
            out.push(match served(client, api, plural).await {
                Ok(true) => check("agent-sandbox", true, format!("{plural} ({api}) served")),
                Ok(false) => check(
                    "agent-sandbox",
                    false,
                    format!("{plural} ({api}) not served: install kubernetes-sigs/agent-sandbox v0.5 or later"),
                ),
                Err(e) => check("agent-sandbox", false, e),
            });
        }
    }
    out
}
