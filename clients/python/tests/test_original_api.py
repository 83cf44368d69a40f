"""Code written for the original claude-conductor ``conductor.workspace_isolation`` module,
run unchanged against the real service.

The tests use only the original's calls and return shapes: ``WorkspaceIsolationManager``
built from the original's configuration dict, ``create_workspace(agent_id,
environment="minimal")`` returning a ``WorkspaceContainer``, ``execute_in_workspace`` with
an argv returning ``(returncode, stdout, stderr)``, ``create_snapshot`` returning a name,
``restore_snapshot``, ``cleanup_workspace``, ``cleanup_old_containers``,
``get_workspace_info`` (synchronous, a dict or ``None``) and ``list_workspaces`` (dicts),
plus the exceptions the original raised (``ValueError`` for an agent without a workspace,
``RuntimeError`` for a failed operation). The agent ids follow the original's examples
(``agent_001``).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from typing import Any, Dict, Iterator

import pytest

from conductor.workspace_isolation import WorkspaceIsolationManager


def original_config(service: Any, tmp_path: Any) -> Dict[str, Any]:
    """The original's configuration (the sections its ``standalone-isolated.yaml`` has),
    with ``network`` naming the test service."""
    return {
        "num_agents": 2,
        "max_workers": 4,
        "task_timeout": 300,
        "agent_config": {"workspace_isolation": "podman", "max_memory_usage": "2g"},
        "container_config": {"runtime": "podman", "image": "ubuntu:22.04", "privileged": False},
        "isolated_workspace": {
            "enabled": True,
            "mode": "sandbox",
            "agent_containers": {
                "base_image": "ubuntu:22.04",
                "persistent_volumes": True,
                "volume_size": "10Gi",
                "environments": [
                    {"name": "python-dev", "image": "python:3.11-slim", "packages": ["pytest"]},
                ],
                "capabilities": {"add": [], "drop": ["ALL"]},
                "resources": {"requests": {"memory": "512Mi", "cpu": "0.5"}, "limits": {"memory": "2Gi", "cpu": "1.0"}},
            },
        },
        "podman_config": {
            "socket_path": "/run/user/1000/podman/podman.sock",
            "runtime": "crun",
            "network": {"mode": "bridge", "name": "claude-dev-net", "subnet": "10.89.0.0/24", "enable_dns": True},
            "security": {"userns": "keep-id", "seccomp_profile": "default"},
        },
        "storage": {
            "workspace_path": str(tmp_path / "workspace"),
            "isolated_workspaces_path": str(tmp_path / "isolated"),
            "logs_path": str(tmp_path / "logs"),
        },
        "network": {
            "dashboard_port": 8080,
            "api_port": service.port,
            "bind_address": "127.0.0.1",
            "enable_cors": True,
        },
        "features": {"container_management": True, "workspace_snapshots": True},
        "dev_environments": {"presets": [{"name": "minimal", "base_image": "alpine:latest", "packages": ["git"]}]},
        "task_execution": {"isolation": {"snapshot_before_task": True, "restore_on_error": True}},
        "container_lifecycle": {"cleanup_policy": {"max_age_hours": 24, "max_containers": 10}},
        "security": {"enable_authentication": False, "api_key_required": False},
    }


@pytest.fixture
def agent(service: Any) -> Iterator[str]:
    """An agent id in the original's style; its workspaces are removed afterwards."""
    name = f"agent_{uuid.uuid4().hex[:8]}"
    yield name
    with service.http() as http:  # whatever a failed test left, of this agent and its "other"
        for w in http.get("/workspaces").json()["workspaces"]:
            if w["agent_id"] in (name, f"{name}_other"):
                http.delete(f"/workspaces/{w['id']}", params={"keep_volumes": "false"})


async def test_workspace_lifecycle_as_the_original(service: Any, agent: str, tmp_path: Any) -> None:
    manager = WorkspaceIsolationManager(original_config(service, tmp_path))

    workspace = await manager.create_workspace(agent)  # environment="minimal"
    assert workspace.container_id
    assert workspace.config.name.startswith(f"claude-agent-{agent}-")
    assert workspace.config.agent_id == agent
    assert workspace.status == "running"
    assert workspace.workspace_path
    assert isinstance(workspace.created_at, datetime)
    assert datetime.now() - timedelta(minutes=5) < workspace.created_at <= datetime.now() + timedelta(seconds=5)
    assert manager.containers[agent].container_id == workspace.container_id

    # An argv, run without a shell: the original's List[str].
    returncode, stdout, stderr = await manager.execute_in_workspace(agent, ["sh", "-c", "echo one > /workspace/f"])
    assert (returncode, stdout, stderr) == (0, "", "")
    exit_code, stdout, stderr = await manager.execute_in_workspace(agent, ["cat", "/workspace/f"])
    assert (exit_code, stdout, stderr) == (0, "one\n", "")
    exit_code, stdout, _ = await manager.execute_in_workspace(agent, ["echo", "$HOME", "a  b", "*"])
    assert (exit_code, stdout) == (0, "$HOME a  b *\n")  # no shell: nothing expanded
    result = await manager.execute_in_workspace(agent, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result[0] == 3 and result[1] == "out\n" and result[2] == "err\n"
    code, _, stderr = await manager.execute_in_workspace(agent, ["no-such-program-here"])
    assert code == 127 and "no-such-program-here" in stderr  # as `podman exec` reports it
    # agent.py's way: a command line split on spaces.
    code, stdout, _ = await manager.execute_in_workspace(agent, "ls -a /workspace".split())
    assert code == 0 and "f" in stdout.split()

    info = manager.get_workspace_info(agent)
    assert info is not None
    assert info["container_id"] == workspace.container_id
    assert info["agent_id"] == agent
    assert info["status"] == "running"
    assert datetime.fromisoformat(info["created_at"]) == workspace.created_at
    assert info["workspace_path"] == workspace.workspace_path
    assert info["image"] and info["memory_limit"] and info["cpu_limit"]
    assert isinstance(info["stats"], dict) and info["stats"]
    assert manager.get_workspace_info(f"{agent}-never") is None

    workspaces = await manager.list_workspaces()
    mine = [w for w in workspaces if w["agent_id"] == agent]
    assert [w["container_id"] for w in mine] == [workspace.container_id]

    await manager.cleanup_workspace(agent, preserve_volumes=False)
    assert agent not in manager.containers
    assert manager.get_workspace_info(agent) is None
    await manager.cleanup_workspace(agent)  # an agent without a workspace: nothing happens
    with pytest.raises(ValueError):
        await manager.execute_in_workspace(agent, ["true"])


async def test_snapshots_as_the_original(service: Any, agent: str, tmp_path: Any) -> None:
    manager = WorkspaceIsolationManager(original_config(service, tmp_path))
    await manager.create_workspace(agent, "minimal")
    await manager.execute_in_workspace(agent, ["sh", "-c", "echo v1 > /workspace/state.txt"])

    snapshot_name = await manager.create_snapshot(agent)
    assert isinstance(snapshot_name, str)
    assert re.fullmatch(r"snapshot-\d{8}_\d{6}(-\d+)?", snapshot_name), snapshot_name
    another = await manager.create_snapshot(agent)
    assert another != snapshot_name
    assert await manager.create_snapshot(agent, "after_setup") == "after_setup"

    await manager.execute_in_workspace(agent, ["sh", "-c", "echo v2 > /workspace/state.txt; touch /workspace/new"])
    await manager.restore_snapshot(agent, snapshot_name)
    code, stdout, _ = await manager.execute_in_workspace(agent, ["cat", "/workspace/state.txt"])
    assert (code, stdout) == (0, "v1\n")
    code, _, _ = await manager.execute_in_workspace(agent, ["test", "-e", "/workspace/new"])
    assert code == 1

    # Taking a name again replaces that snapshot, as the original's `podman commit` did.
    await manager.execute_in_workspace(agent, ["sh", "-c", "echo v3 > /workspace/state.txt"])
    assert await manager.create_snapshot(agent, "after_setup") == "after_setup"
    await manager.execute_in_workspace(agent, ["rm", "/workspace/state.txt"])
    await manager.restore_snapshot(agent, "after_setup")
    assert await manager.execute_in_workspace(agent, ["cat", "/workspace/state.txt"]) == (0, "v3\n", "")

    with pytest.raises(RuntimeError):
        await manager.restore_snapshot(agent, "never-taken")
    assert (await manager.execute_in_workspace(agent, ["true"]))[0] == 0  # still there

    await manager.cleanup_workspace(agent, preserve_volumes=False)
    with pytest.raises(ValueError):
        await manager.create_snapshot(agent)
    with pytest.raises(ValueError):
        await manager.restore_snapshot(agent, snapshot_name)


async def test_the_agents_isolated_task_flow(service: Any, agent: str, tmp_path: Any) -> None:
    """The original agent's ``_execute_isolated_task``: snapshot, run, restore on error."""
    manager = WorkspaceIsolationManager(original_config(service, tmp_path))
    container = await manager.create_workspace(agent, "python-dev")
    await manager.create_snapshot(agent, "initial")
    task_id = uuid.uuid4().hex[:8]

    await manager.create_snapshot(agent, f"pre-task-{task_id}")
    results = []
    for cmd in ["mkdir -p /workspace/src", "touch /workspace/src/partial", "false", "echo never"]:
        exit_code, stdout, stderr = await manager.execute_in_workspace(agent, cmd.split())
        results.append({"command": cmd, "exit_code": exit_code, "stdout": stdout, "stderr": stderr})
        if exit_code != 0:
            await manager.restore_snapshot(agent, f"pre-task-{task_id}")
            break
    assert [r["exit_code"] for r in results] == [0, 0, 1]
    exit_code, _, _ = await manager.execute_in_workspace(agent, ["test", "-e", "/workspace/src/partial"])
    assert exit_code == 1  # rolled back

    exit_code, stdout, stderr = await manager.execute_in_workspace(
        agent, ["python", "-c", "print('Hello from isolated workspace!')"]
    )
    assert (exit_code, stdout, stderr) == (0, "Hello from isolated workspace!\n", "")
    workspace_info = manager.get_workspace_info(agent)
    assert workspace_info is not None and workspace_info["container_id"] == manager.containers[agent].container_id
    assert manager.containers[agent].config.name == container.config.name
    await manager.cleanup_workspace(agent, preserve_volumes=False)


async def test_cleanup_old_containers(service: Any, agent: str, tmp_path: Any) -> None:
    config = original_config(service, tmp_path)
    manager = WorkspaceIsolationManager(config)
    other = WorkspaceIsolationManager(config)
    other_agent = f"{agent}_other"
    try:
        await manager.create_workspace(agent)
        await other.create_workspace(other_agent)

        await manager.cleanup_old_containers()  # max_age_hours=24: the workspace is new
        assert manager.get_workspace_info(agent) is not None

        await manager.cleanup_old_containers(max_age_hours=0)  # older than now: removed
        assert agent not in manager.containers
        assert manager.get_workspace_info(agent) is None
        # Another manager's workspace is not this manager's to clean up.
        assert other.get_workspace_info(other_agent) is not None
    finally:
        await other.cleanup_workspace(other_agent)
