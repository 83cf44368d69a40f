//! Reading an object back through its typed model, refusing any field the model does not
//! know: how the tests prove a rendered object is valid for the targeted API version.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Deserializes `value` as `T`, failing on every field `T` ignores, then checks that `T`
/// serializes back to exactly `value` (nothing dropped, nothing reshaped).
pub fn roundtrip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let typed: T = serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
        .map_err(|e| format!("does not parse: {e}"))?;
    // kube-derive's custom resources write their `apiVersion` and `kind` themselves and
    // skip them when reading; the comparison below still proves they come back unchanged.
    unknown.retain(|p| p != "apiVersion" && p != "kind");
    if !unknown.is_empty() {
        return Err(format!("fields unknown to the API types: {}", unknown.join(", ")));
    }
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back != value {
        return Err(format!(
            "changed by a round trip through the API types:\nrendered: {value}\nread back: {back}"
        ));
    }
    Ok(typed)
}

/// Reads a rendered object back through the type its `apiVersion` and `kind` name (every
/// kind conductor renders: core Pod, PVC and ServiceAccount, NetworkPolicy, RBAC, the
/// agent-sandbox kinds and VolumeSnapshot), with [`roundtrip`]'s checks. Returns
/// `apiVersion/kind`.
pub fn check_object(value: &Value) -> Result<String, String> {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let api = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    let key = format!("{api}/{kind}");
    let r = match key.as_str() {
        "v1/Pod" => roundtrip::<Pod>(value).map(drop),
        "v1/PersistentVolumeClaim" => roundtrip::<PersistentVolumeClaim>(value).map(drop),
        "v1/ServiceAccount" => roundtrip::<ServiceAccount>(value).map(drop),
        "networking.k8s.io/v1/NetworkPolicy" => roundtrip::<NetworkPolicy>(value).map(drop),
        "rbac.authorization.k8s.io/v1/Role" => roundtrip::<Role>(value).map(drop),
        "rbac.authorization.k8s.io/v1/RoleBinding" => roundtrip::<RoleBinding>(value).map(drop),
        "rbac.authorization.k8s.io/v1/ClusterRole" => roundtrip::<ClusterRole>(value).map(drop),
        "rbac.authorization.k8s.io/v1/ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(value).map(drop),
        "agents.x-k8s.io/v1beta1/Sandbox" => roundtrip::<crate::sandbox::Sandbox>(value).map(drop),
        "extensions.agents.x-k8s.io/v1beta1/SandboxTemplate" => {
            roundtrip::<crate::sandbox::SandboxTemplate>(value).map(drop)
        }
        "extensions.agents.x-k8s.io/v1beta1/SandboxWarmPool" => {
            roundtrip::<crate::sandbox::SandboxWarmPool>(value).map(drop)
        }
        "extensions.agents.x-k8s.io/v1beta1/SandboxClaim" => roundtrip::<crate::sandbox::SandboxClaim>(value).map(drop),
        "snapshot.storage.k8s.io/v1/VolumeSnapshot" => roundtrip::<crate::snapshot::VolumeSnapshot>(value).map(drop),
        _ => Err("not a kind conductor renders".to_string()),
    };
    r.map(|()| key.clone())
        .map_err(|e| format!("{key} {:?}: {e}", value["metadata"]["name"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn an_unknown_field_is_an_error() {
        let ok = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}});
        roundtrip::<Pod>(&ok).unwrap();
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "securityContext": {"noNewPrivileges": true}}]}});
        let e = roundtrip::<Pod>(&bad).unwrap_err();
        assert!(e.contains("noNewPrivileges"), "{e}");
        let wrong_kind = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {}});
        assert!(roundtrip::<Pod>(&wrong_kind).is_err());
    }
}
