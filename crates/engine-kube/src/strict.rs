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
