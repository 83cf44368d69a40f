//! Names and labels of everything conductor creates, so that every object can be found
//! again from the engine alone (after a crash, by `podman ps --filter label=…`).

use crate::engine::Labels;

/// Label carrying the workspace id on containers, networks and images.
pub const LABEL_WORKSPACE: &str = "io.conductor.workspace";
pub const LABEL_AGENT: &str = "io.conductor.agent";
pub const LABEL_ENVIRONMENT: &str = "io.conductor.environment";
/// Identifies the conductor instance (its data directory) that owns the object, so two
/// instances on one machine never reconcile each other's containers away.
pub const LABEL_INSTANCE: &str = "io.conductor.instance";
/// Role of a container: `workspace`, `service` (sidecar) or `holder` (network namespace).
pub const LABEL_ROLE: &str = "io.conductor.role";
pub const LABEL_TASK: &str = "io.conductor.task";
/// Hash of an environment definition, on images.
pub const LABEL_DEFINITION: &str = "io.conductor.definition";
pub const LABEL_VERSION: &str = "io.conductor.version";
/// On a fork's container: the id of the workspace it was forked from.
pub const LABEL_FORK_OF: &str = "io.conductor.fork-of";

/// Container name of a workspace: `claude-agent-<agent-id>-<short id>` as in the spec.
pub fn workspace_container(agent_id: &str, workspace_id: &str) -> String {
    format!("claude-agent-{agent_id}-{}", short_id(workspace_id))
}

/// Container name of a sidecar service of a workspace: `claude-agent-<agent>-<short>-svc-<name>`.
pub fn service_container(agent_id: &str, workspace_id: &str, service: &str) -> String {
    format!("{}-svc-{service}", workspace_container(agent_id, workspace_id))
}

/// Name of the network of one workspace: `<prefix>-<short id>`.
pub fn workspace_network(prefix: &str, workspace_id: &str) -> String {
    format!("{prefix}-{}", short_id(workspace_id))
}

/// The short form of an id: its last 8 characters after the `ws-`/`task-` prefix.
pub fn short_id(id: &str) -> &str {
    let body = id.rsplit('-').next().unwrap_or(id);
    &body[..body.len().min(8)]
}

/// Directory name of an agent under the workspaces path: `agent_<agent-id>`.
pub fn agent_dir(agent_id: &str) -> String {
    format!("agent_{agent_id}")
}

/// The labels every object of a workspace carries.
pub fn workspace_labels(instance: &str, workspace_id: &str, agent_id: &str, environment: &str) -> Labels {
    Labels::from([
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_WORKSPACE.to_string(), workspace_id.to_string()),
        (LABEL_AGENT.to_string(), agent_id.to_string()),
        (LABEL_ENVIRONMENT.to_string(), environment.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_follow_the_spec() {
        assert_eq!(workspace_container("a1", "ws-0123456789ab"), "claude-agent-a1-01234567");
        assert_eq!(
            service_container("a1", "ws-0123456789ab", "redis"),
            "claude-agent-a1-01234567-svc-redis"
        );
        assert_eq!(
            workspace_network("claude-dev-net", "ws-0123456789ab"),
            "claude-dev-net-01234567"
        );
        assert_eq!(agent_dir("a1"), "agent_a1");
    }

    #[test]
    fn labels_identify_the_owner() {
        let l = workspace_labels("inst", "ws-1", "a1", "minimal");
        assert_eq!(l[LABEL_WORKSPACE], "ws-1");
        assert_eq!(l[LABEL_AGENT], "a1");
        assert_eq!(l[LABEL_ENVIRONMENT], "minimal");
        assert_eq!(l[LABEL_INSTANCE], "inst");
    }
}
