//! `snapshot.storage.k8s.io/v1` VolumeSnapshot (the CSI external-snapshotter API, not part
//! of k8s-openapi): a snapshot of a workspace's PVC, and the PVC restored from it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, TypedLocalObjectReference};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    plural = "volumesnapshots",
    namespaced,
    status = "VolumeSnapshotStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    pub source: VolumeSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    #[serde(default)]
    pub ready_to_use: Option<bool>,
    #[serde(default)]
    pub restore_size: Option<String>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
    #[serde(default)]
    pub bound_volume_snapshot_content_name: Option<String>,
    #[serde(default)]
    pub creation_time: Option<String>,
}

/// The VolumeSnapshot `name` of workspace `id`'s PVC (`<id>-workspace`), labelled with the
/// workspace.
pub fn volume_snapshot(id: &str, name: &str, namespace: &str, class: Option<&str>) -> VolumeSnapshot {
    let mut snap = VolumeSnapshot::new(
        name,
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some(format!("{id}-workspace")),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: class.map(str::to_string),
        },
    );
    snap.metadata.namespace = Some(namespace.to_string());
    snap.metadata.labels = Some(BTreeMap::from([(
        conductor_core::naming::LABEL_WORKSPACE.to_string(),
        id.to_string(),
    )]));
    snap
}

/// The PVC `old` made again from the VolumeSnapshot `snapshot` (same name, labels, size
/// and class; bound afresh).
pub fn restored_claim(old: &PersistentVolumeClaim, snapshot: &str) -> PersistentVolumeClaim {
    let mut fresh = PersistentVolumeClaim {
        metadata: kube::api::ObjectMeta {
            name: old.metadata.name.clone(),
            namespace: old.metadata.namespace.clone(),
            labels: old.metadata.labels.clone(),
            annotations: old.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: old.spec.clone(),
        status: None,
    };
    if let Some(spec) = fresh.spec.as_mut() {
        spec.volume_name = None;
        spec.data_source = Some(TypedLocalObjectReference {
            api_group: Some("snapshot.storage.k8s.io".into()),
            kind: "VolumeSnapshot".into(),
            name: snapshot.to_string(),
        });
        spec.data_source_ref = None;
    }
    fresh
}
