"""``WorkspaceIsolationManager``: the spec's per-agent view of workspaces.

The manager addresses workspaces by *agent id*, as the spec's examples do::

    from conductor.workspace_isolation import WorkspaceIsolationManager

    manager = WorkspaceIsolationManager(config)   # dict, YAML path, or omitted
    await manager.create_workspace("agent-1", "python-dev")
    result = await manager.execute_in_workspace("agent-1", "python3 -m pytest -q")
    await manager.create_snapshot("agent-1", "before-deployment")
    await manager.restore_snapshot("agent-1", "before-deployment")
    await manager.cleanup_workspace("agent-1", preserve_volumes=False)

An agent's workspace is the one this manager created for it, else the agent's only live
workspace on the service. An agent with several live workspaces must be disambiguated by
creating through this manager (or by using :class:`conductor.client.AsyncConductorClient`
with workspace ids). All calls go to the HTTP API of a running ``conductor serve``; the
configuration only tells the manager where that service is (``network.bind_address`` and
``network.api_port``) and where its API key file is.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from .client import AsyncConductorClient
from .errors import NotFoundError, ValidationError
from .models import ExecResult, Snapshot, Workspace
from .settings import ConfigLike

__all__ = ["WorkspaceIsolationManager"]


class WorkspaceIsolationManager:
    """Creates, drives, snapshots and cleans up one workspace per agent.

    Args:
        config: a conductor configuration (dict or path of the YAML file), or ``None`` for
            ``CONDUCTOR_URL`` / the default address.
        url: the service URL, overriding the configuration.
        token: the API token, overriding ``CONDUCTOR_TOKEN`` and the configuration.
        client: an existing client to use instead of making one.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        url: Optional[str] = None,
        token: Optional[str] = None,
        client: Optional[AsyncConductorClient] = None,
    ) -> None:
        self.client = client or AsyncConductorClient(url, token, config=config)
        self._workspaces: Dict[str, str] = {}

    def __repr__(self) -> str:
        return f"WorkspaceIsolationManager(url={self.client.url!r})"

    async def __aenter__(self) -> "WorkspaceIsolationManager":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the HTTP connections (workspaces are left as they are)."""
        await self.client.aclose()

    async def workspace_id(self, agent_id: str) -> str:
        """The id of the agent's workspace (see the module documentation)."""
        known = self._workspaces.get(agent_id)
        if known is not None:
            return known
        live = [w for w in await self.client.list_workspaces(agent_id=agent_id) if w.state in ("running", "stopped")]
        if not live:
            raise NotFoundError(
                f"agent '{agent_id}' has no live workspace; create one with create_workspace",
                code="not_found",
                field="agent_id",
            )
        if len(live) > 1:
            ids = ", ".join(w.id for w in live)
            raise ValidationError(
                f"agent '{agent_id}' has {len(live)} live workspaces ({ids}); "
                "use the client with a workspace id",
                code="invalid_request",
                field="agent_id",
            )
        return live[0].id

    async def create_workspace(
        self,
        agent_id: str,
        environment: str,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        network: Optional[str] = None,
    ) -> Workspace:
        """Creates and starts a workspace for the agent from an environment (e.g.
        ``"python-dev"``); it becomes the agent's workspace for this manager."""
        ws = await self.client.create_workspace(agent_id, environment, limits=limits, network=network)
        self._workspaces[agent_id] = ws.id
        return ws

    async def get_workspace(self, agent_id: str) -> Workspace:
        """The agent's workspace with its live resource usage."""
        return await self.client.get_workspace(await self.workspace_id(agent_id))

    async def execute_in_workspace(
        self,
        agent_id: str,
        command: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> ExecResult:
        """Runs a shell command line in the agent's workspace; the result has
        ``exit_code``, ``stdout`` and ``stderr`` (also as ``result["exit_code"]`` …)."""
        return await self.client.exec(await self.workspace_id(agent_id), command, timeout=timeout, env=env, cwd=cwd)

    async def create_snapshot(self, agent_id: str, snapshot_name: str, *, overwrite: bool = False) -> Snapshot:
        """Saves the complete state of the agent's workspace under ``snapshot_name``."""
        return await self.client.create_snapshot(await self.workspace_id(agent_id), snapshot_name, overwrite=overwrite)

    async def restore_snapshot(self, agent_id: str, snapshot_name: str) -> Workspace:
        """Brings the agent's workspace back to the snapshot; it runs afterwards."""
        return await self.client.restore_snapshot(await self.workspace_id(agent_id), snapshot_name)

    async def list_snapshots(self, agent_id: str) -> List[Snapshot]:
        """The snapshots of the agent's workspace, oldest first."""
        return await self.client.list_snapshots(await self.workspace_id(agent_id))

    async def delete_snapshot(self, agent_id: str, snapshot_name: str) -> None:
        await self.client.delete_snapshot(await self.workspace_id(agent_id), snapshot_name)

    async def cleanup_workspace(self, agent_id: str, preserve_volumes: bool = False) -> List[Workspace]:
        """Removes every live workspace of the agent; ``preserve_volumes=True`` keeps their
        data for a later workspace of the same agent and environment (for debugging).
        Returns the removed workspaces; raises :class:`NotFoundError` when there is none."""
        ids = [w.id for w in await self.client.list_workspaces(agent_id=agent_id)]
        self._workspaces.pop(agent_id, None)
        if not ids:
            raise NotFoundError(f"agent '{agent_id}' has no live workspace", code="not_found", field="agent_id")
        removed = []
        for workspace_id in ids:
            try:
                removed.append(await self.client.delete_workspace(workspace_id, keep_volumes=preserve_volumes))
            except NotFoundError:
                continue
        return removed

    async def list_workspaces(self, agent_id: Optional[str] = None) -> List[Workspace]:
        """The live workspaces (of one agent, when given), oldest first."""
        return await self.client.list_workspaces(agent_id=agent_id)
