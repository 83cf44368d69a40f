//! Shared set-up for the integration tests: every test gets its own data directory,
//! configuration, store and private Podman service, and removes what it made even when it
//! fails (the `Drop` of [`TestEnv`] reconciles away every container and network of its
//! instance and unmounts its volumes). Tests run on a multi-thread runtime so that `Drop`
//! can block on that cleanup.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use conductor_core::engine::{Progress, ProgressSink};
use conductor_core::Config;
use conductor_service::Conductor;

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub conductor: Option<Conductor>,
}

/// A configuration whose data lives in `dir`, plus `extra` YAML merged on top.
pub fn config_text(dir: &std::path::Path, extra: &str) -> String {
    format!("storage:\n  base_path: {}\n{extra}", dir.display())
}

pub fn quiet() -> ProgressSink {
    Arc::new(|_p: Progress| {})
}

impl TestEnv {
    /// Opens a conductor with `extra` configuration YAML (top-level keys other than storage).
    pub async fn new(extra: &str) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("conductor-test-")
            .tempdir_in(test_root())
            .expect("temp dir");
        let text = config_text(dir.path(), extra);
        std::fs::write(dir.path().join("config.yaml"), &text).unwrap();
        let config = Config::parse(&text).expect("test config").config;
        let conductor = Conductor::open(config).await.expect("open conductor");
        TestEnv {
            dir,
            conductor: Some(conductor),
        }
    }

    pub fn c(&self) -> &Conductor {
        self.conductor.as_ref().expect("conductor")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }
}

/// Test data lives on the disk (not /tmp, which may be a small tmpfs).
pub fn test_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("it");
    std::fs::create_dir_all(&root).unwrap();
    root
}

impl Drop for TestEnv {
    /// Runs on the test's own (multi-thread) runtime, also when the test panicked.
    fn drop(&mut self) {
        let Some(c) = self.conductor.take() else { return };
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let all = c
                    .list_workspaces(&conductor_service::workspaces::ListFilter::default())
                    .unwrap_or_default();
                for w in all {
                    let _ = c.remove_workspace(&w.id, Some(false)).await;
                }
                let _ = c.reconcile().await;
                drop(c);
            })
        });
    }
}
