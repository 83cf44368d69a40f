//! Sidecar services of a task (`services: ["postgres:14", "redis:7"]`).
//!
//! Each sidecar joins the network namespace of the task's workspace (Podman's
//! `--network container:<workspace>`), so the commands reach it on `localhost` at its
//! standard port, and by name through the `/etc/hosts` entries the workspace was created
//! with (`postgres` → 127.0.0.1). Nothing is published and the namespace keeps the
//! workspace's isolation: sidecars see the task's isolated network only. Sidecars carry the
//! workspace's labels with the role `service` and the task id, so removing the workspace
//! removes them first (a container must go before the one whose namespace it joined).
//!
//! Images: a local copy is used when present (`localhost/postgres:14`, then
//! `docker.io/library/postgres:14`), else the image is pulled; when pulling fails (no
//! registry) the images conductor knows (postgres, redis) are built from the Containerfiles
//! in the repository's `services/` folder, compiled into the binary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::handle::WorkspaceHandle;
use conductor_core::engine::{
    BuildSpec, ContainerSpec, ContainerStatus, ExecSpec, Labels, NetworkAttachment, Progress, ProgressSink,
    ResourceLimits, SecurityOptions,
};
use conductor_core::naming;
use conductor_core::resources::{LimitOverrides, WorkspaceLimits};
use conductor_core::task::{service_defaults, KnownService, ServiceDefaults};
use conductor_core::validate;
use tokio::sync::mpsc;

use crate::exec::WORKSPACE_USER;
use crate::tasks::TaskLog;
use crate::{Conductor, Result, ServiceError};

/// The service images the test script prepares: `build_service_images` makes sure these
/// exist locally.
pub const SERVICE_IMAGES: [&str; 2] = ["postgres:14", "redis:7"];
/// How long a sidecar may take to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Longest a single readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit code of the probe script when the workspace has no tool to probe a port with.
const NO_PROBE: i64 = 3;

const REDIS_CONTAINERFILE: &str = include_str!("../../../services/redis/Containerfile");
const POSTGRES_CONTAINERFILE: &str = include_str!("../../../services/postgres/Containerfile");
const POSTGRES_ENTRYPOINT: &str = include_str!("../../../services/postgres/entrypoint.sh");

/// The `/etc/hosts` entries that let a workspace reach sidecars by name.
pub fn service_hosts<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<(String, String)> {
    names
        .into_iter()
        .map(|n| (n.to_string(), "127.0.0.1".to_string()))
        .collect()
}

/// The shell script probing whether `port` accepts connections on 127.0.0.1, run in the
/// workspace (which shares the sidecar's network namespace). Uses `pg_isready` for postgres
/// when the workspace has it (an open port can precede readiness by a moment), else bash's
/// `/dev/tcp`; exits with [`NO_PROBE`] when neither exists.
fn probe_script(known: Option<KnownService>, port: u16) -> String {
    let pg = if known == Some(KnownService::Postgres) {
        format!("if command -v pg_isready >/dev/null 2>&1; then exec pg_isready -q -h 127.0.0.1 -p {port} -t 2; fi\n")
    } else {
        String::new()
    };
    format!(
        "{pg}if command -v bash >/dev/null 2>&1; then exec bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; fi\nexit {NO_PROBE}\n"
    )
}

impl Conductor {
    /// Makes sure the sidecar `image` is available locally and returns the reference to run:
    /// a local copy, else a pulled one, else (postgres and redis, when pulling fails) one
    /// built from conductor's `services/<name>/Containerfile` as `localhost/<name>:<tag>`.
    pub async fn ensure_service_image(&self, image: &str, progress: ProgressSink) -> Result<String> {
        validate::image_ref(image).map_err(|m| ServiceError::invalid("services", m))?;
        let d = service_defaults(image);
        let _one_at_a_time = self.tasks.images.lock().await;
        for candidate in d.local_image_candidates.iter().chain(&d.build_tag) {
            if self.engine.image_inspect(candidate).await?.is_some() {
                return Ok(candidate.clone());
            }
        }
        progress(Progress::Line(format!("pulling service image {}", d.pull_reference)));
        let pull_error = match self.engine.image_pull(&d.pull_reference, progress.clone()).await {
            Ok(_) => return Ok(d.pull_reference),
            Err(e) => e,
        };
        let (Some(known), Some(tag)) = (d.known, &d.build_tag) else {
            return Err(pull_error.into());
        };
        progress(Progress::Line(format!(
            "{pull_error}; building {tag} from conductor's services/{} instead",
            known.as_str()
        )));
        self.build_service_image(known, tag, progress).await?;
        Ok(tag.clone())
    }

    async fn build_service_image(&self, known: KnownService, tag: &str, progress: ProgressSink) -> Result<()> {
        self.ensure_base(progress.clone()).await?;
        let (containerfile, context_files) = match known {
            KnownService::Redis => (REDIS_CONTAINERFILE, Vec::new()),
            KnownService::Postgres => (
                POSTGRES_CONTAINERFILE,
                vec![(
                    "entrypoint.sh".to_string(),
                    POSTGRES_ENTRYPOINT.as_bytes().to_vec(),
                    0o755,
                )],
            ),
        };
        let spec = BuildSpec {
            tag: tag.to_string(),
            containerfile: containerfile.to_string(),
            context_files,
            build_args: [("BASE_IMAGE".to_string(), self.base_image().to_string())].into(),
            labels: Labels::from([(naming::LABEL_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string())]),
            host_network: true,
        };
        self.engine.image_build(spec, progress).await?;
        Ok(())
    }

    /// Makes sure every image of [`SERVICE_IMAGES`] exists locally (building it without a
    /// registry); returns the references.
    pub async fn build_service_images(&self, progress: ProgressSink) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for image in SERVICE_IMAGES {
            out.push(self.ensure_service_image(image, progress.clone()).await?);
        }
        Ok(out)
    }

    /// Starts the task's sidecars in the network namespace of workspace `ws` and waits
    /// until each accepts connections. Errors name the service.
    pub(crate) async fn start_services(
        &self,
        handle: &WorkspaceHandle,
        task_id: &str,
        images: &[String],
        log: &TaskLog,
    ) -> Result<()> {
        let ws = &handle.record;
        let workspace = handle.container().to_string();
        let limits = WorkspaceLimits::resolve(&self.config, &LimitOverrides::default())
            .map_err(|e| ServiceError::invalid(format!("limits.{}", e.field), e.message))?;
        let step_log = log.clone();
        let progress: ProgressSink = Arc::new(move |p| {
            if let Progress::Step { index, total, text } = p {
                step_log.system(&format!("service image: STEP {index}/{total}: {text}"));
            }
        });
        let mut started = Vec::new();
        for image in images {
            let d = service_defaults(image);
            let reference = self.ensure_service_image(image, progress.clone()).await?;
            let name = naming::service_container(&ws.agent_id, &ws.id, &d.name);
            // A leftover of an interrupted task would block the name.
            self.engine.container_remove(&name).await?;
            let mut labels = naming::workspace_labels(&self.instance, &ws.id, &ws.agent_id, &ws.environment);
            labels.insert(naming::LABEL_ROLE.into(), "service".into());
            labels.insert(naming::LABEL_TASK.into(), task_id.into());
            let spec = ContainerSpec {
                name: name.clone(),
                image: reference.clone(),
                labels,
                env: d.env.clone(),
                entrypoint: None,
                cmd: d.cmd.clone(),
                user: d.user.clone(),
                workdir: None,
                hostname: None,
                mounts: Vec::new(),
                network: NetworkAttachment::Container(workspace.clone()),
                extra_hosts: Vec::new(),
                published_ports: Vec::new(),
                limits: ResourceLimits {
                    memory_bytes: limits.memory.bytes(),
                    nano_cpus: limits.cpu.nano_cpus(),
                    pids: limits.pids,
                    nofile: limits.nofile,
                    nproc: limits.nproc,
                },
                security: SecurityOptions {
                    cap_drop_all: true,
                    no_new_privileges: true,
                    seccomp_profile: Some(self.seccomp_path().to_path_buf()),
                    readonly_rootfs: false,
                },
            };
            let id = self.engine.container_create(&spec).await?;
            self.engine.container_start(&id).await?;
            log.system(&format!("service '{}' started from {reference}", d.name));
            started.push((id, d, image));
        }
        for (id, d, image) in &started {
            self.wait_ready(&workspace, id, d, image).await?;
            log.system(&format!("service '{}' is ready", d.name));
        }
        Ok(())
    }

    /// Polls until the sidecar accepts connections on its port (or, without a known port,
    /// runs), failing early when it exits.
    async fn wait_ready(&self, workspace: &str, container: &str, d: &ServiceDefaults, image: &str) -> Result<()> {
        let op = || format!("start service '{}' ({image})", d.name);
        let begin = Instant::now();
        loop {
            let info = self
                .engine
                .container_inspect(container)
                .await?
                .ok_or_else(|| ServiceError::host(op(), "its container disappeared"))?;
            if info.status == ContainerStatus::Exited {
                return Err(ServiceError::host(
                    op(),
                    format!(
                        "it exited with code {} before it was ready",
                        info.exit_code.unwrap_or(-1)
                    ),
                ));
            }
            if info.status == ContainerStatus::Running {
                let Some(port) = d.port else { return Ok(()) };
                match self.probe(workspace, d.known, port).await? {
                    0 => return Ok(()),
                    NO_PROBE => {
                        tracing::info!(service = %d.name, "no port probe in the workspace; running counts as ready");
                        return Ok(());
                    }
                    _ => {}
                }
                if begin.elapsed() > READY_TIMEOUT {
                    return Err(ServiceError::host(
                        op(),
                        format!(
                            "it did not accept connections on port {port} within {} s",
                            READY_TIMEOUT.as_secs()
                        ),
                    ));
                }
            } else if begin.elapsed() > READY_TIMEOUT {
                return Err(ServiceError::host(
                    op(),
                    format!("it was not running within {} s", READY_TIMEOUT.as_secs()),
                ));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Runs one readiness probe in the workspace; returns its exit code (a probe that hangs
    /// counts as "not ready").
    async fn probe(&self, workspace: &str, known: Option<KnownService>, port: u16) -> Result<i64> {
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), probe_script(known, port)],
            user: Some(WORKSPACE_USER.into()),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(8);
        let drain = async move { while rx.recv().await.is_some() {} };
        let run = async {
            let (code, ()) = tokio::join!(self.engine.exec(workspace, spec, tx), drain);
            code
        };
        match tokio::time::timeout(PROBE_TIMEOUT, run).await {
            Ok(code) => Ok(code?),
            Err(_) => Ok(1),
        }
    }

    /// Removes the sidecars of a task (the workspace itself stays).
    pub(crate) async fn remove_task_services(&self, task_id: &str) -> Result<()> {
        let sidecars = self
            .engine
            .container_list(&[
                (naming::LABEL_INSTANCE, Some(self.instance.as_str())),
                (naming::LABEL_TASK, Some(task_id)),
                (naming::LABEL_ROLE, Some("service")),
            ])
            .await?;
        for c in sidecars {
            self.engine.container_remove(&c.id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_prefer_pg_isready_for_postgres_only() {
        let pg = probe_script(Some(KnownService::Postgres), 5432);
        assert!(pg.contains("pg_isready -q -h 127.0.0.1 -p 5432"), "{pg}");
        assert!(pg.contains("/dev/tcp/127.0.0.1/5432"), "{pg}");
        let redis = probe_script(Some(KnownService::Redis), 6379);
        assert!(!redis.contains("pg_isready"), "{redis}");
        assert!(redis.ends_with("exit 3\n"), "{redis}");
    }

    #[test]
    fn hosts_point_at_loopback() {
        assert_eq!(
            service_hosts(["postgres", "redis"]),
            vec![
                ("postgres".to_string(), "127.0.0.1".to_string()),
                ("redis".to_string(), "127.0.0.1".to_string())
            ]
        );
    }

    #[test]
    fn the_service_containerfiles_are_embedded() {
        assert!(REDIS_CONTAINERFILE.contains("redis-server"));
        assert!(POSTGRES_CONTAINERFILE.contains("COPY entrypoint.sh"));
        assert!(POSTGRES_ENTRYPOINT.starts_with("#!/bin/bash"));
    }
}
