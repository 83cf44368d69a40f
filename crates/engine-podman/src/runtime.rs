//! Which OCI runtime runs our containers, and why.
//!
//! crun is Podman's default and the faster runtime, but it refuses to run on hosts with
//! hybrid cgroups v1 ("cgroups in hybrid mode not supported"), where runc works. With
//! `RuntimeChoice::Auto` we therefore pick runc when crun is not installed, crun outright on
//! a unified cgroup v2 host, and otherwise *try* crun: one throw-away container with crun from a local image. If that fails
//! while the same container runs with runc, crun is broken here and runc is used; when both
//! fail the image is to blame and the cgroup version decides. The decision and its reason
//! are reported by `conductor doctor`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use conductor_core::config::{RuntimeChoice, LOCAL_BASE_IMAGE};
use tokio::process::Command;

/// How the host mounts its cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupVersion {
    /// cgroup2 mounted on `/sys/fs/cgroup`.
    V2,
    /// cgroup v1 controllers plus a cgroup2 hierarchy (`/sys/fs/cgroup/unified`).
    V1Hybrid,
    V1,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V2 => "v2",
            CgroupVersion::V1Hybrid => "v1 (hybrid)",
            CgroupVersion::V1 => "v1",
        })
    }
}

impl CgroupVersion {
    /// Reads the host's cgroup layout from `/proc/self/mounts`.
    pub(crate) fn detect() -> CgroupVersion {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        Self::from_mounts(&mounts)
    }

    fn from_mounts(mounts: &str) -> CgroupVersion {
        let mut hybrid = false;
        for line in mounts.lines() {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(target), Some(fs_type)) = (fields.next(), fields.next()) else {
                continue;
            };
            if fs_type != "cgroup2" {
                continue;
            }
            if target == "/sys/fs/cgroup" {
                return CgroupVersion::V2;
            }
            if target.starts_with("/sys/fs/cgroup/") {
                hybrid = true;
            }
        }
        if hybrid {
            CgroupVersion::V1Hybrid
        } else {
            CgroupVersion::V1
        }
    }
}

/// The OCI runtime picked for this engine and the reason, for `EngineInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuntimeDecision {
    pub(crate) name: String,
    pub(crate) reason: String,
}

impl RuntimeDecision {
    fn new(name: &str, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// Resolves `choice` into a runtime name. `podman` is the CLI used for the probe, when
/// installed.
pub(crate) async fn decide(choice: RuntimeChoice, podman: Option<&Path>, cgroup: CgroupVersion) -> RuntimeDecision {
    decide_with(choice, podman, cgroup, crun_installed()).await
}

async fn decide_with(
    choice: RuntimeChoice,
    podman: Option<&Path>,
    cgroup: CgroupVersion,
    crun_installed: bool,
) -> RuntimeDecision {
    match choice {
        RuntimeChoice::Crun => RuntimeDecision::new("crun", "configured (podman_config.runtime: crun)"),
        RuntimeChoice::Runc => RuntimeDecision::new("runc", "configured (podman_config.runtime: runc)"),
        RuntimeChoice::Auto if !crun_installed => RuntimeDecision::new(
            "runc",
            format!("auto: crun is not installed (cgroups {cgroup}); using runc"),
        ),
        RuntimeChoice::Auto if cgroup == CgroupVersion::V2 => {
            RuntimeDecision::new("crun", "auto: cgroup v2 unified, crun supports it")
        }
        RuntimeChoice::Auto => {
            let probe_image = match podman {
                Some(podman) => local_image(podman).await,
                None => None,
            };
            match (podman, probe_image) {
                (Some(podman), Some(image)) => probe(podman, &image, cgroup).await,
                _ => RuntimeDecision::new(
                    "runc",
                    format!("auto: cgroups {cgroup} and no local image to probe crun with; using runc"),
                ),
            }
        }
    }
}

/// Whether a crun binary is on `PATH` or in one of the directories Podman searches.
fn crun_installed() -> bool {
    const PODMAN_RUNTIME_DIRS: [&str; 6] = [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/local/sbin",
        "/bin",
        "/sbin",
    ];
    crate::find_in_path("crun").is_some()
        || PODMAN_RUNTIME_DIRS
            .iter()
            .any(|dir| Path::new(dir).join("crun").is_file())
}

/// Runs the probe container with crun, and with runc when crun fails.
async fn probe(podman: &Path, image: &str, cgroup: CgroupVersion) -> RuntimeDecision {
    let crun_error = match run_probe(podman, "crun", image).await {
        Ok(()) => {
            return RuntimeDecision::new(
                "crun",
                format!("auto: a probe container ran with crun (cgroups {cgroup})"),
            )
        }
        Err(error) => error,
    };
    match run_probe(podman, "runc", image).await {
        Ok(()) => RuntimeDecision::new(
            "runc",
            format!("auto: crun failed on this host (cgroups {cgroup}: {crun_error}); using runc"),
        ),
        Err(runc_error) => RuntimeDecision::new(
            "runc",
            format!(
                "auto: the probe with image '{image}' failed with crun ({crun_error}) and with runc \
                 ({runc_error}); cgroups {cgroup}, so using runc"
            ),
        ),
    }
}

/// A local image to run the probe from: conductor's base image when present, else any.
async fn local_image(podman: &Path) -> Option<String> {
    let output = Command::new(podman)
        .args(["images", "--noheading", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"])
        .kill_on_drop(true)
        .output()
        .await
        .ok()?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let images: Vec<(&str, &str)> = listing.lines().filter_map(|line| line.split_once(' ')).collect();
    images
        .iter()
        .find(|(_, name)| *name == LOCAL_BASE_IMAGE)
        .or_else(|| images.first())
        .map(|(id, _)| id.to_string())
}

/// Runs `true` in a throw-away container with `runtime`; the error is podman's last line.
async fn run_probe(podman: &Path, runtime: &str, image: &str) -> Result<(), String> {
    // The ulimits are needed on hosts whose hard limits are below Podman's defaults (see
    // containers.rs), or every runtime would fail the probe.
    let run = Command::new(podman)
        .args(["run", "--rm", "--runtime", runtime])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
        ])
        .args([image, "true"])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Err(_) => Err("no result within 60 s".into()),
        Ok(Err(error)) => Err(format!("cannot run podman: {error}")),
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("");
            Err(format!("{} ({})", last.trim(), output.status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_layouts_are_recognised() {
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(CgroupVersion::from_mounts(v2), CgroupVersion::V2);
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(CgroupVersion::from_mounts(hybrid), CgroupVersion::V1Hybrid);
        let v1 = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n";
        assert_eq!(CgroupVersion::from_mounts(v1), CgroupVersion::V1);
    }

    #[tokio::test]
    async fn explicit_choices_are_honoured_without_probing() {
        let crun = decide_with(RuntimeChoice::Crun, None, CgroupVersion::V1Hybrid, false).await;
        assert_eq!(crun.name, "crun");
        let runc = decide_with(RuntimeChoice::Runc, None, CgroupVersion::V2, true).await;
        assert_eq!(runc.name, "runc");
    }

    #[tokio::test]
    async fn auto_without_a_probe_follows_installation_and_cgroup_version() {
        assert_eq!(
            decide_with(RuntimeChoice::Auto, None, CgroupVersion::V2, true)
                .await
                .name,
            "crun"
        );
        let missing = decide_with(RuntimeChoice::Auto, None, CgroupVersion::V2, false).await;
        assert_eq!(missing.name, "runc");
        assert!(missing.reason.contains("crun is not installed"), "{}", missing.reason);
        let v1 = decide_with(RuntimeChoice::Auto, None, CgroupVersion::V1, true).await;
        assert_eq!(v1.name, "runc");
        assert!(v1.reason.contains("no local image"), "{}", v1.reason);
    }

    /// Runs real probe containers: needs podman and conductor's base image.
    #[tokio::test]
    async fn the_probe_falls_back_to_runc_where_crun_fails() {
        let podman = crate::find_in_path("podman").expect("podman is not installed");
        let cgroup = CgroupVersion::detect();
        if cgroup == CgroupVersion::V2 {
            return; // crun works on cgroup v2; nothing falls back.
        }
        let image = local_image(&podman)
            .await
            .expect("no local image: build localhost/conductor/base:bookworm first");
        let decision = probe(&podman, &image, cgroup).await;
        assert_eq!(decision.name, "runc", "{decision:?}");
        assert!(
            decision.reason.starts_with("auto: crun failed on this host"),
            "{}",
            decision.reason
        );
    }
}
