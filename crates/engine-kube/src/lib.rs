//! The Kubernetes backend of conductor.
//!
//! - [`plan`]: what a workspace Pod is made of (pure, no Kubernetes types);
//! - [`render`]: the typed objects of a plan (Pod, PVC, NetworkPolicy) and the RBAC;
//! - [`sandbox`]: kubernetes-sigs/agent-sandbox `v1beta1` kinds and how presets, warm pools
//!   and workspaces become them;
//! - [`snapshot`]: `snapshot.storage.k8s.io/v1` VolumeSnapshot;
//! - [`engine`]: [`KubeEngine`], the core's `Engine` trait over kube-rs;
//! - [`cluster`]: the doctor's checks of a cluster;
//! - [`strict`]: reading a rendered object back through its type, failing on unknown fields.

pub mod cluster;
pub mod engine;
pub mod plan;
pub mod render;
pub mod sandbox;
pub mod snapshot;
pub mod strict;

pub use engine::KubeEngine;
/// The typed Kubernetes API this crate renders (for callers that read the objects back).
pub use k8s_openapi;
pub use plan::PodPlan;

/// The Kubernetes API version the typed objects follow (k8s-openapi feature).
pub const KUBERNETES_API: &str = "1.34";
/// The agent-sandbox release whose `v1beta1` types [`sandbox`] follows.
pub const AGENT_SANDBOX_VERSION: &str = "v0.5.6";
