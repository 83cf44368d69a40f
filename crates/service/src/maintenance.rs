//! Background upkeep of a running service: image preloading at start and the periodic
//! cleanup policy (`max_age_hours`, `max_containers`).

use std::sync::Arc;
use std::time::Duration;

use conductor_core::engine::{Progress, ProgressSink};

use crate::{Conductor, Result};

/// How often the cleanup policy runs in `conductor serve`.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);

impl Conductor {
    /// Makes sure every `podman_config.preload_images` entry exists, pulling missing ones.
    /// Returns the failures (reference, reason); they are warnings, not fatal.
    pub async fn preload_images(&self) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        let quiet: ProgressSink = Arc::new(|_: Progress| {});
        for image in &self.config.podman_config.preload_images {
            let present = matches!(self.engine.image_inspect(image).await, Ok(Some(_)));
            if !present {
                if let Err(e) = self.engine.image_pull(image, quiet.clone()).await {
                    failed.push((image.clone(), e.to_string()));
                }
            }
        }
        failed
    }

    /// Workspaces a running task is using (never removed by cleanup).
    pub fn busy_workspaces(&self) -> Result<Vec<String>> {
        Ok(self
            .store
            .running_tasks()?
            .into_iter()
            .filter_map(|t| t.workspace_id)
            .collect())
    }
}

/// Runs the cleanup policy every [`CLEANUP_INTERVAL`] until the task is aborted.
pub fn spawn_cleanup(conductor: Arc<Conductor>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
        tick.tick().await; // the first tick is immediate; serve has just reconciled
        loop {
            tick.tick().await;
            let busy = match conductor.busy_workspaces() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("cleanup skipped: {e}");
                    continue;
                }
            };
            match conductor.cleanup(&busy).await {
                Ok(r) if !r.expired.is_empty() || !r.over_count.is_empty() => {
                    tracing::info!(
                        "cleanup removed {:?} (idle too long) and {:?} (over max_containers)",
                        r.expired,
                        r.over_count
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cleanup failed: {e}"),
            }
        }
    })
}
