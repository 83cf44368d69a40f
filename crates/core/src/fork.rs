//! Forks: the decisions of making N workspaces from one workspace's state, without I/O.
//!
//! A fork is created from its source's saved container specification
//! ([`ContainerSpec`], written when the source was made) with the source's identity swapped
//! for its own: [`derive_spec`] takes that specification and a [`ForkIdentity`] and returns
//! the fork's. What identifies a workspace in a specification is its name, image, labels,
//! hostname, the `CONDUCTOR_*` variables, its network, its published host ports, its limits,
//! and the host directories it binds (its data volume, its agent's socket directory, its
//! egress socket directory). Everything else — the user, the working directory, the
//! entrypoint, extra hosts, tmpfs mounts, the hardening — is the source's.
//!
//! [`check_count`] bounds the number of copies by `isolated_workspace.fork.max_count`, and
//! [`check_room`] by the room `isolated_workspace.cleanup.max_containers` leaves.

use std::path::PathBuf;

use crate::engine::{ContainerSpec, Labels, Mount, NetworkAttachment, ResourceLimits};

/// What a fork changes in its source's container specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkIdentity {
    pub name: String,
    pub image: String,
    /// The fork's labels. The source's others (a task's workspace has the task's) are set
    /// empty: a container inherits its image's labels, and a captured image carries the
    /// source's, which would make the fork look like the task's.
    pub labels: Labels,
    pub hostname: String,
    /// Variables set in order: each replaces the value of a variable of that name, or is
    /// added. Later entries win, so conductor's own go last.
    pub env: Vec<(String, String)>,
    /// Host directories of the source (its data volume) and where the fork's are: a bind
    /// mount whose source lies under the first path is moved under the second.
    pub rebase: Vec<(PathBuf, PathBuf)>,
    /// Mounts that replace the source's mount of the same target (the agent's socket
    /// directory and binary, the egress socket directory). One the source lacks is not added.
    pub replace_mounts: Vec<Mount>,
    pub network: NetworkAttachment,
    /// (container port, host port): the source's container ports on new host ports.
    pub published_ports: Vec<(u16, u16)>,
    pub limits: ResourceLimits,
}

/// The fork's container specification: the source's with `id`'s identity.
pub fn derive_spec(source: &ContainerSpec, id: &ForkIdentity) -> ContainerSpec {
    let mut spec = source.clone();
    spec.name = id.name.clone();
    spec.image = id.image.clone();
    spec.labels = id.labels.clone();
    for key in source.labels.keys() {
        spec.labels.entry(key.clone()).or_default();
    }
    spec.hostname = Some(id.hostname.clone());
    for (k, v) in &id.env {
        match spec.env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => spec.env.push((k.clone(), v.clone())),
        }
    }
    for m in &mut spec.mounts {
        if let Some(new) = id.replace_mounts.iter().find(|r| r.target() == m.target()) {
            *m = new.clone();
            continue;
        }
        if let Mount::Bind { source, .. } = m {
            if let Some((from, to)) = id.rebase.iter().find(|(from, _)| source.starts_with(from)) {
                let rest = source.strip_prefix(from).expect("starts with it").to_path_buf();
                *source = to.join(rest);
            }
        }
    }
    spec.network = id.network.clone();
    spec.published_ports = id.published_ports.clone();
    spec.limits = id.limits.clone();
    spec
}

/// Checks a fork's `count` against `isolated_workspace.fork.max_count` (a refusal is the
/// request's fault: HTTP 400 naming `count`).
pub fn check_count(count: u32, max_count: u32) -> Result<(), String> {
    if count == 0 {
        return Err("must be at least 1".into());
    }
    if count > max_count {
        return Err(format!(
            "{count} is above the configured maximum {max_count} (isolated_workspace.fork.max_count)"
        ));
    }
    Ok(())
}

/// Checks that `count` more workspaces fit beside the `live` ones that hold a container
/// within `max_containers` (a refusal is HTTP 429; the message names `count`).
pub fn check_room(count: u32, live: usize, max_containers: u32) -> Result<(), String> {
    let room = (max_containers as usize).saturating_sub(live);
    if count as usize > room {
        return Err(format!(
            "count {count}: {live} workspaces exist and the configured maximum \
             (isolated_workspace.cleanup.max_containers) is {max_containers}, which leaves room for {room}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SecurityOptions;

    fn source() -> ContainerSpec {
        ContainerSpec {
            name: "claude-agent-a1-11111111".into(),
            image: "localhost/conductor/minimal:abc".into(),
            labels: Labels::from([
                ("io.conductor.workspace".to_string(), "ws-111111111111".to_string()),
                ("io.conductor.task".to_string(), "task-1".to_string()),
            ]),
            env: vec![
                ("CONDUCTOR_WORKSPACE_ID".into(), "ws-111111111111".into()),
                ("CONDUCTOR_AGENT_ID".into(), "a1".into()),
                ("MODE".into(), "source".into()),
                ("HTTP_PROXY".into(), "http://127.0.0.1:3128".into()),
            ],
            entrypoint: Some(vec!["/agent".into(), "init".into()]),
            cmd: Some(Vec::new()),
            user: Some("1000:1000".into()),
            workdir: Some("/workspace".into()),
            hostname: Some("11111111".into()),
            mounts: vec![
                Mount::Bind {
                    source: "/data/isolated/agent_a1/python/mnt/workspace".into(),
                    target: "/workspace".into(),
                    readonly: false,
                },
                Mount::Bind {
                    source: "/data/isolated/agent_a1/python/mnt/volumes/src".into(),
                    target: "/workspace/src".into(),
                    readonly: false,
                },
                Mount::Tmpfs {
                    target: "/tmp".into(),
                    size_bytes: 1 << 20,
                    options: vec!["noexec".into()],
                },
                Mount::Bind {
                    source: "/usr/lib/conductor/agent".into(),
                    target: "/.conductor/agent".into(),
                    readonly: true,
                },
                Mount::Bind {
                    source: "/data/agents/ws-111111111111".into(),
                    target: "/.conductor/sock".into(),
                    readonly: false,
                },
            ],
            network: NetworkAttachment::Network("claude-dev-net-11111111".into()),
            extra_hosts: vec![("redis".into(), "127.0.0.1".into())],
            published_ports: vec![(8000, 20001)],
            limits: ResourceLimits {
                memory_bytes: 1 << 30,
                nano_cpus: 1_000_000_000,
                pids: 512,
                nofile: 1024,
                nproc: 1024,
            },
            security: SecurityOptions {
                cap_drop_all: true,
                no_new_privileges: true,
                seccomp_profile: Some("/data/seccomp.json".into()),
                readonly_rootfs: true,
            },
        }
    }

    fn identity() -> ForkIdentity {
        ForkIdentity {
            name: "claude-agent-b2-22222222".into(),
            image: "localhost/conductor-snapshots/ws-222222222222:fork".into(),
            labels: Labels::from([("io.conductor.workspace".to_string(), "ws-222222222222".to_string())]),
            hostname: "22222222".into(),
            env: vec![
                ("CONDUCTOR_WORKSPACE_ID".into(), "ws-222222222222".into()),
                ("CONDUCTOR_AGENT_ID".into(), "b2".into()),
                ("MODE".into(), "fork".into()),
                ("EXTRA".into(), "1".into()),
            ],
            rebase: vec![(
                "/data/isolated/agent_a1/python".into(),
                "/data/isolated/agent_b2/ws-222222222222".into(),
            )],
            replace_mounts: vec![
                Mount::Bind {
                    source: "/data/agents/ws-222222222222".into(),
                    target: "/.conductor/sock".into(),
                    readonly: false,
                },
                Mount::Bind {
                    source: "/data/egress/ws-222222222222".into(),
                    target: "/.conductor/egress".into(),
                    readonly: true,
                },
            ],
            network: NetworkAttachment::Network("claude-dev-net-22222222".into()),
            published_ports: vec![(8000, 20002)],
            limits: ResourceLimits {
                memory_bytes: 512 << 20,
                nano_cpus: 500_000_000,
                pids: 256,
                nofile: 1024,
                nproc: 1024,
            },
        }
    }

    #[test]
    fn the_fork_takes_its_own_identity_and_keeps_the_rest() {
        let (src, id) = (source(), identity());
        let fork = derive_spec(&src, &id);
        assert_eq!(fork.name, id.name);
        assert_eq!(fork.image, id.image);
        assert_eq!(
            fork.labels,
            Labels::from([
                ("io.conductor.workspace".to_string(), "ws-222222222222".to_string()),
                ("io.conductor.task".to_string(), String::new()),
            ]),
            "the source's task label is blanked, not inherited"
        );
        assert_eq!(fork.hostname.as_deref(), Some("22222222"));
        assert_eq!(
            fork.env,
            vec![
                ("CONDUCTOR_WORKSPACE_ID".to_string(), "ws-222222222222".to_string()),
                ("CONDUCTOR_AGENT_ID".to_string(), "b2".to_string()),
                ("MODE".to_string(), "fork".to_string()),
                ("HTTP_PROXY".to_string(), "http://127.0.0.1:3128".to_string()),
                ("EXTRA".to_string(), "1".to_string()),
            ]
        );
        assert_eq!(fork.network, id.network);
        assert_eq!(fork.published_ports, vec![(8000, 20002)]);
        assert_eq!(fork.limits, id.limits);
        // The source's, untouched.
        assert_eq!(
            (&fork.entrypoint, &fork.cmd, &fork.user, &fork.workdir),
            (&src.entrypoint, &src.cmd, &src.user, &src.workdir)
        );
        assert_eq!(fork.extra_hosts, src.extra_hosts);
        assert_eq!(fork.security, src.security);
    }

    #[test]
    fn mounts_move_to_the_forks_directories() {
        let fork = derive_spec(&source(), &identity());
        let binds: Vec<(String, String)> = fork
            .mounts
            .iter()
            .filter_map(|m| match m {
                Mount::Bind { source, target, .. } => Some((source.display().to_string(), target.clone())),
                Mount::Tmpfs { .. } => None,
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("/data/isolated/agent_b2/ws-222222222222/mnt/workspace", "/workspace"),
                (
                    "/data/isolated/agent_b2/ws-222222222222/mnt/volumes/src",
                    "/workspace/src"
                ),
                ("/usr/lib/conductor/agent", "/.conductor/agent"),
                ("/data/agents/ws-222222222222", "/.conductor/sock"),
            ]
            .map(|(s, t)| (s.to_string(), t.to_string()))
        );
        assert!(
            fork.mounts
                .iter()
                .any(|m| matches!(m, Mount::Tmpfs { target, .. } if target == "/tmp")),
            "the tmpfs stays"
        );
        assert_eq!(fork.mounts.len(), 5, "a replacement the source lacks is not added");
    }

    #[test]
    fn counts_are_bounded_by_the_configuration_and_the_room_left() {
        assert_eq!(check_count(1, 16), Ok(()));
        assert_eq!(check_count(16, 16), Ok(()));
        assert!(check_count(0, 16).unwrap_err().contains("at least 1"));
        assert!(check_count(17, 16)
            .unwrap_err()
            .contains("isolated_workspace.fork.max_count"));
        assert_eq!(check_room(16, 4, 20), Ok(()));
        let m = check_room(5, 17, 20).unwrap_err();
        assert!(m.starts_with("count 5"), "{m}");
        assert!(m.contains("max_containers") && m.contains("room for 3"), "{m}");
        assert!(check_room(1, 25, 20).is_err(), "more live than the maximum");
    }
}
