//! `conductor doctor`: what conductor needs from the host, what it found, and a one-line fix
//! for every problem.

use std::path::Path;

use conductor_core::Config;
use serde::Serialize;

use crate::{host, Conductor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub value: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
    fn push(&mut self, name: &str, status: Status, value: impl Into<String>, fix: Option<&str>) {
        self.checks.push(Check {
            name: name.into(),
            status,
            value: value.into(),
            fix: fix.map(str::to_string),
        });
    }
}

fn tool(name: &str) -> Option<String> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// Runs every check; never fails: problems become lines of the report.
pub async fn run(config: Config) -> Report {
    if config.engine.backend == conductor_core::config::EngineBackend::Kubernetes {
        return kubernetes(&config).await;
    }
    let mut r = Report { checks: Vec::new() };
    match tool("podman") {
        Some(p) => r.push("podman binary", Status::Ok, p, None),
        None => r.push(
            "podman binary",
            Status::Fail,
            "not installed",
            Some("podman is not installed: run scripts/setup.sh or apt-get install podman"),
        ),
    }
    let cg = host::cgroup_version();
    r.push("cgroups", Status::Ok, cg.describe(), None);
    for (t, fix) in [
        (
            "runc",
            "runc is not installed: apt-get install runc (needed where crun fails, e.g. cgroups v1)",
        ),
        (
            "debootstrap",
            "debootstrap is not installed: run scripts/setup.sh or apt-get install debootstrap",
        ),
        (
            "mkfs.ext4",
            "mkfs.ext4 is missing: apt-get install e2fsprogs (needed for storage limits)",
        ),
    ] {
        match tool(t) {
            Some(p) => r.push(t, Status::Ok, p, None),
            None => r.push(
                t,
                if t == "runc" && cg.is_v2() {
                    Status::Warn
                } else {
                    Status::Fail
                },
                "not installed",
                Some(fix),
            ),
        }
    }
    match tool("mkfs.xfs") {
        Some(p) => r.push(
            "mkfs.xfs",
            Status::Ok,
            format!("{p} (reflink pool: fast snapshots)"),
            None,
        ),
        None => r.push(
            "mkfs.xfs",
            Status::Warn,
            "not installed: snapshots copy whole volumes",
            Some("apt-get install xfsprogs (or run scripts/setup.sh)"),
        ),
    }
    if host::is_root() {
        r.push(
            "storage limits",
            Status::Ok,
            "loop-mounted ext4 per workspace (running as root)",
            None,
        );
    } else {
        r.push(
            "storage limits",
            Status::Warn,
            "not root: workspace volumes are plain directories without a size limit",
            Some("run conductor as root (sudo) to enforce volume_size"),
        );
    }
    let conductor = match Conductor::open(config).await {
        Ok(c) => c,
        Err(e) => {
            r.push(
                "podman API",
                Status::Fail,
                e.to_string(),
                Some("run scripts/setup.sh, then conductor doctor again"),
            );
            return r;
        }
    };
    match conductor.engine.info().await {
        Ok(info) => {
            r.push(
                "podman version",
                Status::Ok,
                format!("{} (API {})", info.version, info.api_version),
                None,
            );
            let how = if info.managed {
                "started by conductor"
            } else {
                "podman_config.socket_path"
            };
            r.push("API socket", Status::Ok, format!("{} ({how})", info.endpoint), None);
            r.push(
                "OCI runtime",
                Status::Ok,
                format!("{}: {}", info.runtime, info.runtime_reason),
                None,
            );
            r.push("storage driver", Status::Ok, info.storage_driver, None);
        }
        Err(e) => r.push(
            "podman API",
            Status::Fail,
            e.to_string(),
            Some("check `podman system info`"),
        ),
    }
    r.push(
        "data directory",
        Status::Ok,
        conductor.paths.base.display().to_string(),
        None,
    );
    match conductor.environments().await {
        Ok(envs) => {
            for e in envs {
                if e.built {
                    let size = e
                        .size_bytes
                        .map(|b| format!(", {} MB", b / 1_000_000))
                        .unwrap_or_default();
                    r.push(
                        &format!("env {}", e.name),
                        Status::Ok,
                        format!("{}{size}", e.image),
                        None,
                    );
                } else {
                    let fix = format!("conductor env build {}", e.name);
                    r.push(
                        &format!("env {}", e.name),
                        Status::Warn,
                        format!("not built ({})", e.image),
                        Some(&fix),
                    );
                }
            }
        }
        Err(e) => r.push("environments", Status::Fail, e.to_string(), None),
    }
    r
}

/// The doctor of `engine: kubernetes`: the cluster's checks (reachable, namespace, RBAC,
/// storage and snapshot classes, NetworkPolicy, agent-sandbox CRDs); no host check.
async fn kubernetes(config: &Config) -> Report {
    let mut r = Report { checks: Vec::new() };
    let kube = &config.engine.kubernetes;
    let engine = match conductor_engine_kube::KubeEngine::connect(kube, config.volume_size().bytes()).await {
        Ok(e) => e,
        Err(e) => {
            r.push(
                "cluster",
                Status::Fail,
                e.to_string(),
                Some("set engine.kubernetes.kubeconfig (or KUBECONFIG), or run conductor in the cluster"),
            );
            return r;
        }
    };
    for c in conductor_engine_kube::cluster::checks(engine.client(), kube).await {
        let fix = (!c.ok).then(|| match c.name.as_str() {
            "rbac" => "conductor kube render rbac | kubectl apply -f -".to_string(),
            "snapshot class" => {
                "install a CSI driver with snapshots and a VolumeSnapshotClass, or do without snapshots".to_string()
            }
            "agent-sandbox" => "install kubernetes-sigs/agent-sandbox, or set engine.kubernetes.mode: pod".to_string(),
            _ => "see docs/kubernetes.md".to_string(),
        });
        let status = match (c.ok, c.name.as_str()) {
            (true, _) => Status::Ok,
            // Snapshots are optional: without a class they are refused, nothing else.
            (false, "snapshot class") => Status::Warn,
            (false, _) => Status::Fail,
        };
        r.push(&c.name, status, c.detail, fix.as_deref());
    }
    r
}
