//! The one place a configuration's container backend is chosen and connected.
//!
//! Today that is Podman (`crates/engine-podman`), through its REST socket. A second backend
//! (Kubernetes) adds an arm here and its implementations of the host-bound seams listed in
//! docs/architecture.md ("Seams inside the service"); the workflows above take an
//! `Arc<dyn Engine>` and do not change.

use std::path::PathBuf;
use std::sync::Arc;

use conductor_core::config::DataPaths;
use conductor_core::engine::Engine;
use conductor_core::Config;
use conductor_engine_podman::{PodmanEngine, PodmanOptions, ServiceRole};

use crate::Result;

/// Connects the engine `config` names, for a process in `role`.
pub async fn connect_engine(config: &Config, paths: &DataPaths, role: ServiceRole) -> Result<Arc<dyn Engine>> {
    let engine = PodmanEngine::connect(PodmanOptions {
        socket_path: config
            .podman_config
            .socket_path
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        data_dir: paths.base.clone(),
        runtime: config.podman_config.runtime,
        role,
    })
    .await?;
    Ok(Arc::new(engine))
}
