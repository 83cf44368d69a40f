"""``WorkspaceIsolationManager``: workspaces per agent, with the original Python API.

The manager addresses workspaces by *agent id* and keeps the interface of the original
claude-conductor module ``conductor.workspace_isolation`` (same names, signatures and
return shapes), so code written for it runs unchanged::

    from conductor.workspace_isolation import WorkspaceIsolationManager

    manager = WorkspaceIsolationManager(config)   # the original's dict, a YAML path, or omitted
    workspace = await manager.create_workspace("agent-1", "python-dev")
    print(workspace.container_id, workspace.config.name, workspace.status, workspace.created_at)

    code, out, err = await manager.execute_in_workspace("agent-1", ["python3", "-c", "print(1)"])
    result = await manager.execute_in_workspace("agent-1", "cd /workspace && ls")   # a shell line too
    print(result.exit_code, result.stdout, result.duration_ms)

    name = await manager.create_snapshot("agent-1")            # "snapshot-20250101_120000"
    await manager.restore_snapshot("agent-1", name)
    manager.get_workspace_info("agent-1")                      # dict, or None (synchronous)
    await manager.list_workspaces()                            # [dict, ...]
    await manager.cleanup_workspace("agent-1", preserve_volumes=False)
    await manager.cleanup_old_containers(max_age_hours=24)

An agent's workspace is the one this manager created (or restored) for it, else the
agent's only live workspace on the service. An agent with several live workspaces must be
disambiguated by creating through this manager (or by using
:class:`conductor.client.AsyncConductorClient` with workspace ids).

All calls go to the HTTP API of a running ``conductor serve``; the configuration only tells
the manager where that service is (``network.bind_address`` / ``network.api_port``) and
where its API key file is. Every other key of the original's configuration is accepted and
kept in :attr:`WorkspaceIsolationManager.config`, but the service's own configuration
decides images, limits and networks. Where this manager differs from the original, the
README's section "Differences from the original WorkspaceIsolationManager" says so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union, overload
from urllib.parse import quote

from .client import AsyncConductorClient, CommandLike, NetworkLike
from .errors import ConflictError, NotFoundError, NoWorkspaceError, ValidationError
from .models import ExecResult, Limits, Snapshot, Workspace, WorkspaceUsage
from .settings import ConfigLike, load_config

__all__ = [
    "ContainerConfig",
    "WorkspaceContainer",
    "WorkspaceInfo",
    "SnapshotName",
    "WorkspaceIsolationManager",
    "WORKSPACE_PATH",
]

#: Where a workspace's files are, inside its container.
WORKSPACE_PATH = "/workspace"

#: The reserved agent that owns the service's idle warm-pool workspaces.
_WARM_POOL_AGENT = "warm-pool"

#: Most suffixes tried for a generated snapshot name that is taken.
_MAX_NAME_ATTEMPTS = 100


def _section(config: Mapping[str, Any], name: str) -> Dict[str, Any]:
    value = config.get(name)
    return dict(value) if isinstance(value, Mapping) else {}


def _local_time(epoch_ms: int) -> datetime:
    """Milliseconds since the epoch as a naive local time, as ``datetime.now()`` gives (the
    original's ``created_at``), so it compares with ``datetime.now() - timedelta(...)``."""
    return datetime.fromtimestamp(epoch_ms / 1000.0)


@dataclass
class ContainerConfig:
    """How a workspace's container is set up (the original's ``ContainerConfig``).

    Filled from what the service reports: ``name`` is the container name
    (``claude-agent-<agent>-<id>``), ``image`` the image it runs, ``memory_limit`` /
    ``cpu_limit`` its limits, ``network_mode`` its network (``"none"`` for loopback only),
    ``user`` the uid:gid commands run as, ``environment`` the variables the service sets;
    every capability is dropped. ``volumes`` is empty: the workspace's data volume is the
    service's and is not mounted from a host path the caller chooses."""

    name: str
    image: str
    agent_id: str
    memory_limit: str = "2g"
    cpu_limit: str = "1.0"
    volumes: Dict[str, str] = field(default_factory=dict)
    environment: Dict[str, str] = field(default_factory=dict)
    capabilities_add: List[str] = field(default_factory=list)
    capabilities_drop: List[str] = field(default_factory=list)
    network_mode: str = "bridge"
    privileged: bool = False
    user: Optional[str] = None

    @classmethod
    def of(cls, ws: Workspace) -> "ContainerConfig":
        """The configuration of a workspace as the service reports it."""
        return cls(
            name=ws.container_name,
            image=ws.image,
            agent_id=ws.agent_id,
            memory_limit=ws.limits.memory,
            cpu_limit=ws.limits.cpu,
            environment={"CONDUCTOR_WORKSPACE_ID": ws.id, "CONDUCTOR_AGENT_ID": ws.agent_id},
            capabilities_drop=["ALL"],
            network_mode=ws.network or "none",
            user="1000:1000",
        )


def _empty_config() -> ContainerConfig:
    return ContainerConfig(name="", image="", agent_id="")


@dataclass(frozen=True, init=False)
class WorkspaceContainer(Workspace):
    """A workspace as the original's ``WorkspaceContainer`` and as the client's
    :class:`~conductor.models.Workspace` (it is one).

    The original's fields: ``container_id`` (the container's name, which every ``podman``
    command accepts as an id), ``config`` (:class:`ContainerConfig`), ``created_at`` (a
    naive local :class:`~datetime.datetime`), ``status`` (the workspace's state, e.g.
    ``"running"``), ``workspace_path`` (``/workspace``, inside the container) and ``ports``
    (published container port → host port on 127.0.0.1, when known). The client's:
    ``id``, ``agent_id``, ``environment``, ``state``, ``image``, ``container_name``,
    ``network``, ``network_policy``, ``limits``, ``last_used_at``, ``error``, ``usage``,
    ``secrets``; ``created_at_ms`` is the creation time in milliseconds since the epoch (the client's
    ``created_at``).

    Constructed positionally, the arguments are the original's
    (``container_id, config, created_at, status, workspace_path, ports``); the rest are
    keywords.
    """

    container_id: str = ""
    config: ContainerConfig = field(default_factory=_empty_config)
    created_at: datetime = field(default_factory=datetime.now)  # type: ignore[assignment]
    status: str = "created"
    workspace_path: str = WORKSPACE_PATH
    ports: Dict[str, int] = field(default_factory=dict)
    created_at_ms: int = 0

    def __init__(
        self,
        container_id: str = "",
        config: Optional[ContainerConfig] = None,
        created_at: Optional[datetime] = None,
        status: str = "created",
        workspace_path: str = WORKSPACE_PATH,
        ports: Optional[Dict[str, int]] = None,
        *,
        id: str = "",
        agent_id: str = "",
        environment: str = "",
        state: str = "",
        image: str = "",
        container_name: str = "",
        network: Optional[str] = None,
        network_policy: Optional[Dict[str, Any]] = None,
        limits: Optional[Limits] = None,
        created_at_ms: Optional[int] = None,
        last_used_at: int = 0,
        error: Optional[str] = None,
        usage: Optional[WorkspaceUsage] = None,
        secrets: Optional[List[str]] = None,
    ) -> None:
        config = config if config is not None else _empty_config()
        if created_at is None:
            created_at = _local_time(created_at_ms) if created_at_ms else datetime.now()
        if created_at_ms is None:
            created_at_ms = int(created_at.timestamp() * 1000)
        values: Dict[str, Any] = {
            "id": id or container_id,
            "agent_id": agent_id or config.agent_id,
            "environment": environment,
            "state": state or status,
            "image": image or config.image,
            "container_name": container_name or config.name or container_id,
            "network": network,
            "network_policy": network_policy,
            "limits": limits if limits is not None else Limits(memory=config.memory_limit, cpu=config.cpu_limit),
            "created_at": created_at,
            "last_used_at": last_used_at,
            "error": error,
            "usage": usage,
            "secrets": list(secrets or []),
            "container_id": container_id or container_name or config.name,
            "config": config,
            "status": status if status != "created" or not state else state,
            "workspace_path": workspace_path,
            "ports": dict(ports or {}),
            "created_at_ms": created_at_ms,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorkspaceContainer":
        """From the service's JSON for a workspace."""
        return cls.of(Workspace.from_dict(data))

    @classmethod
    def of(cls, ws: Workspace) -> "WorkspaceContainer":
        """The client's workspace with the original's fields added."""
        ports: Dict[str, int] = {}
        if ws.usage is not None:
            for p in ws.usage.published_ports:
                if "container_port" in p and "host_port" in p:
                    ports[str(p["container_port"])] = int(p["host_port"])
        return cls(
            container_id=ws.container_name or ws.id,
            config=ContainerConfig.of(ws),
            created_at=_local_time(ws.created_at),
            status=ws.state,
            workspace_path=WORKSPACE_PATH,
            ports=ports,
            id=ws.id,
            agent_id=ws.agent_id,
            environment=ws.environment,
            state=ws.state,
            image=ws.image,
            container_name=ws.container_name,
            network=ws.network,
            network_policy=ws.network_policy,
            limits=ws.limits,
            created_at_ms=ws.created_at,
            last_used_at=ws.last_used_at,
            error=ws.error,
            usage=ws.usage,
            secrets=ws.secrets,
        )

    def workspace(self) -> Workspace:
        """The client's :class:`~conductor.models.Workspace` (``created_at`` in milliseconds)."""
        return Workspace(
            id=self.id,
            agent_id=self.agent_id,
            environment=self.environment,
            state=self.state,
            image=self.image,
            container_name=self.container_name,
            network=self.network,
            network_policy=self.network_policy,
            limits=self.limits,
            created_at=self.created_at_ms,
            last_used_at=self.last_used_at,
            error=self.error,
            usage=self.usage,
            secrets=list(self.secrets),
        )


class WorkspaceInfo(Dict[str, Any]):
    """What ``get_workspace_info`` and ``list_workspaces`` return: the original's dict.

    Its keys are the original's, ``container_id``, ``agent_id``, ``status``, ``created_at``
    (ISO 8601, local time), ``workspace_path``, ``image``, ``memory_limit``,
    ``cpu_limit`` and ``stats`` (the live usage: ``cpu_percent``, ``memory_bytes``,
    ``pids``, ``disk_used_bytes``…; empty when the workspace is not running), plus ``id``,
    ``workspace_id``, ``environment``, ``state``, ``container_name``, ``network``,
    ``network_policy``, ``limits``, ``created_at_ms``, ``last_used_at`` and ``error``.

    Its *attributes* are those of the client's :class:`~conductor.models.Workspace`
    (``info.id``, ``info.state``, ``info.created_at`` in milliseconds…), as this
    manager's ``list_workspaces`` returned before.
    """

    def __init__(self, workspace: Workspace) -> None:
        usage = workspace.usage.to_dict() if workspace.usage is not None else {}
        super().__init__(
            container_id=workspace.container_name or workspace.id,
            agent_id=workspace.agent_id,
            status=workspace.state,
            created_at=_local_time(workspace.created_at).isoformat(),
            workspace_path=WORKSPACE_PATH,
            image=workspace.image,
            memory_limit=workspace.limits.memory,
            cpu_limit=workspace.limits.cpu,
            stats=usage,
            id=workspace.id,
            workspace_id=workspace.id,
            environment=workspace.environment,
            state=workspace.state,
            container_name=workspace.container_name,
            network=workspace.network,
            network_policy=workspace.network_policy,
            limits=workspace.limits.to_dict(),
            created_at_ms=workspace.created_at,
            last_used_at=workspace.last_used_at,
            error=workspace.error,
        )
        self.__dict__["_workspace"] = workspace

    @property
    def workspace(self) -> Workspace:
        """The client's :class:`~conductor.models.Workspace`."""
        return self.__dict__["_workspace"]  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "_workspace" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_workspace"], name)


class SnapshotName(str):
    """What ``create_snapshot`` returns: the snapshot's name (a ``str``, as the original
    returned), with the snapshot's details as attributes: ``name``, ``workspace_id``,
    ``created_at``, ``size_bytes``, ``state`` (and ``snap["size_bytes"]``, ``to_dict()``)."""

    def __new__(cls, snapshot: Snapshot) -> "SnapshotName":
        self = super().__new__(cls, snapshot.name)
        self.__dict__["snapshot"] = snapshot
        return self

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot as the client returns it."""
        return self.__dict__["snapshot"]  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def workspace_id(self) -> str:
        return self.snapshot.workspace_id

    @property
    def created_at(self) -> str:
        return self.snapshot.created_at

    @property
    def size_bytes(self) -> int:
        return self.snapshot.size_bytes

    @property
    def state(self) -> str:
        return self.snapshot.state

    @overload  # type: ignore[override]
    def __getitem__(self, key: str) -> Any: ...

    @overload
    def __getitem__(self, key: Union[int, slice]) -> str: ...

    def __getitem__(self, key: Any) -> Any:
        """``snap["size_bytes"]`` by field name; ``snap[0]`` / ``snap[:4]`` as the string."""
        if isinstance(key, str):
            return self.snapshot[key]
        return str.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.snapshot.get(key, default)

    def to_dict(self) -> Dict[str, Any]:
        return self.snapshot.to_dict()

    def __reduce__(self) -> Any:
        return (SnapshotName, (self.snapshot,))

    def __repr__(self) -> str:
        return f"SnapshotName({str.__repr__(self)}, workspace_id={self.workspace_id!r})"


def _generated_snapshot_name() -> str:
    """The original's name for an unnamed snapshot: ``snapshot-YYYYmmdd_HHMMSS`` (local
    time), which the service's snapshot names (lowercase letters, digits, ``-_.``) allow."""
    return f"snapshot-{datetime.now().strftime('%Y%m%d_%H%M%S')}"


class WorkspaceIsolationManager:
    """Creates, drives, snapshots and cleans up one workspace per agent.

    Args:
        config: a configuration: the original's dict (every key accepted; ``network``
            and ``security`` locate the service, the rest is kept in :attr:`config`), the
            path of a conductor YAML file, or ``None`` for ``CONDUCTOR_URL`` / the
            default address.
        url: the service URL, overriding the configuration.
        token: the API token, overriding ``CONDUCTOR_TOKEN`` and the configuration.
        client: an existing client to use instead of making one.

    Attributes (as the original's): ``config`` (the configuration as a mapping),
    ``isolated_config`` (its ``isolated_workspace`` section), ``podman_config`` (its
    ``podman_config`` section), ``workspace_base`` (``storage.isolated_workspaces_path``
    expanded, or ``None``; nothing is made there) and ``containers`` (agent id →
    :class:`WorkspaceContainer` of the workspaces this manager created or restored).
    Constructing the manager does not contact the service.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        url: Optional[str] = None,
        token: Optional[str] = None,
        client: Optional[AsyncConductorClient] = None,
    ) -> None:
        self.config: Mapping[str, Any] = load_config(config)
        self.isolated_config: Dict[str, Any] = _section(self.config, "isolated_workspace")
        self.podman_config: Dict[str, Any] = _section(self.config, "podman_config")
        base = _section(self.config, "storage").get("isolated_workspaces_path")
        self.workspace_base: Optional[Path] = Path(str(base)).expanduser() if base else None
        self.containers: Dict[str, WorkspaceContainer] = {}
        self.client = client or AsyncConductorClient(url, token, config=self.config)

    def __repr__(self) -> str:
        return f"WorkspaceIsolationManager(url={self.client.url!r})"

    async def __aenter__(self) -> "WorkspaceIsolationManager":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the HTTP connections (workspaces are left as they are)."""
        await self.client.aclose()

    # -- which workspace is the agent's -------------------------------------------------

    def _no_workspace(self, agent_id: str) -> NoWorkspaceError:
        return NoWorkspaceError(
            f"No workspace found for agent {agent_id}: it has no live workspace; create one with create_workspace",
            code="not_found",
            field="agent_id",
        )

    def _one_live(self, agent_id: str, workspaces: List[Workspace]) -> Optional[str]:
        live = [w for w in workspaces if w.state in ("running", "stopped")]
        if not live:
            return None
        if len(live) > 1:
            ids = ", ".join(w.id for w in live)
            raise ValidationError(
                f"agent '{agent_id}' has {len(live)} live workspaces ({ids}); use the client with a workspace id",
                code="invalid_request",
                field="agent_id",
            )
        return live[0].id

    async def workspace_id(self, agent_id: str) -> str:
        """The id of the agent's workspace (see the module documentation); raises
        :class:`~conductor.errors.NoWorkspaceError` (a ``ValueError``) when it has none."""
        known = self.containers.get(agent_id)
        if known is not None:
            return known.id
        found = self._one_live(agent_id, await self.client.list_workspaces(agent_id=agent_id))
        if found is None:
            raise self._no_workspace(agent_id)
        return found

    def _workspace_id_blocking(self, agent_id: str) -> Optional[str]:
        known = self.containers.get(agent_id)
        if known is not None:
            return known.id
        body = self.client._request_blocking("GET", "/workspaces", params={"agent_id": agent_id})
        return self._one_live(agent_id, [Workspace.from_dict(w) for w in body["workspaces"]])

    def _remember(self, ws: Workspace) -> WorkspaceContainer:
        container = WorkspaceContainer.of(ws)
        self.containers[ws.agent_id] = container
        return container

    # -- the original's methods ---------------------------------------------------------

    async def create_workspace(
        self,
        agent_id: str,
        environment: str = "minimal",
        *,
        limits: Optional[Mapping[str, Any]] = None,
        network: Optional[NetworkLike] = None,
        allow: Optional[Iterable[str]] = None,
        deny: Optional[Iterable[str]] = None,
        secrets: Optional[Iterable[str]] = None,
    ) -> WorkspaceContainer:
        """Creates and starts a workspace for the agent from an environment (e.g.
        ``"python-dev"``); it becomes the agent's workspace for this manager.
        ``limits`` (``memory``, ``cpu``, ``pids``, ``volume_size``) and the network
        (``network``: ``"isolated"``, ``"none"``, ``"proxy"``, ``"egress"`` or a mapping;
        ``allow`` / ``deny`` entry lists for proxy mode, see
        :meth:`AsyncConductorClient.create_workspace`) override the service's defaults;
        ``secrets`` names registered secrets the workspace may use."""
        ws = await self.client.create_workspace(
            agent_id, environment, limits=limits, network=network, allow=allow, deny=deny, secrets=secrets
        )
        return self._remember(ws)

    async def execute_in_workspace(
        self,
        agent_id: str,
        command: CommandLike,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> ExecResult:
        """Runs a command in the agent's workspace: an argv (``["sh", "-c", "…"]``,
        executed directly, as the original did) or a shell command line (a ``str``).

        The result unpacks as the original's ``(returncode, stdout, stderr)`` and also has
        ``exit_code``, ``stdout``, ``stderr``, ``duration_ms`` and ``timed_out``. A command
        running longer than ``timeout`` seconds (default: the service's
        ``task_execution.task_timeout``) is killed with exit code 124."""
        return await self.client.exec(await self.workspace_id(agent_id), command, timeout=timeout, env=env, cwd=cwd)

    async def create_snapshot(
        self,
        agent_id: str,
        snapshot_name: Optional[str] = None,
        *,
        overwrite: Optional[bool] = None,
    ) -> SnapshotName:
        """Saves the complete state of the agent's workspace and returns the snapshot's name.

        Without a name one is generated as the original did, ``snapshot-YYYYmmdd_HHMMSS``
        (with ``-2``, ``-3``… appended when that name is taken). A given name replaces an
        existing snapshot of that name, as the original's did, unless ``overwrite=False``
        (then the name being taken raises :class:`~conductor.errors.ConflictError`)."""
        workspace = await self.workspace_id(agent_id)
        if snapshot_name is not None:
            replace = True if overwrite is None else overwrite
            return SnapshotName(await self.client.create_snapshot(workspace, snapshot_name, overwrite=replace))
        base = _generated_snapshot_name()
        name = base
        for _ in range(_MAX_NAME_ATTEMPTS):
            try:
                return SnapshotName(await self.client.create_snapshot(workspace, name, overwrite=False))
            except ConflictError:
                taken: Set[str] = {s.name for s in await self.client.list_snapshots(workspace)}
                if name not in taken:
                    raise  # a conflict other than the name (e.g. the workspace is not running)
                # The first free suffix (one exists among len(taken) + 1 candidates).
                name = next(f"{base}-{n}" for n in range(2, len(taken) + 3) if f"{base}-{n}" not in taken)
        raise ConflictError(f"no free snapshot name after {base}", code="conflict", field="snapshot_name")

    async def restore_snapshot(self, agent_id: str, snapshot_name: str) -> WorkspaceContainer:
        """Brings the agent's workspace back to the snapshot (its files and its container's
        file system); it runs afterwards. Returns the workspace (the original returned
        ``None``)."""
        ws = await self.client.restore_snapshot(await self.workspace_id(agent_id), snapshot_name)
        return self._remember(ws)

    async def cleanup_workspace(self, agent_id: str, preserve_volumes: bool = False) -> List[Workspace]:
        """Removes every live workspace of the agent; ``preserve_volumes=True`` keeps their
        data for a later workspace of the same agent and environment (for debugging).
        Returns the removed workspaces; an agent without workspaces is no error (``[]``),
        as in the original."""
        self.containers.pop(agent_id, None)
        removed = []
        for w in await self.client.list_workspaces(agent_id=agent_id):
            try:
                removed.append(await self.client.delete_workspace(w.id, keep_volumes=preserve_volumes))
            except NotFoundError:
                continue
        return removed

    async def cleanup_old_containers(self, max_age_hours: float = 24, *, all_agents: bool = False) -> List[Workspace]:
        """Removes, data included, the workspaces created more than ``max_age_hours`` ago.

        As in the original, only the workspaces this manager created or restored (those in
        :attr:`containers`) are considered, so one manager never removes another client's
        workspaces on a shared service. ``all_agents=True`` considers every live workspace
        of the service instead (except the service's idle warm pool, which it renews
        itself). Returns the removed workspaces."""
        cutoff_ms = (time.time() - float(max_age_hours) * 3600.0) * 1000.0
        mine = {c.id: agent for agent, c in self.containers.items()}
        removed: List[Workspace] = []
        for w in await self.client.list_workspaces():
            if all_agents:
                if w.agent_id == _WARM_POOL_AGENT:
                    continue
            elif w.id not in mine:
                continue
            if w.created_at >= cutoff_ms:
                continue
            try:
                removed.append(await self.client.delete_workspace(w.id, keep_volumes=False))
            except NotFoundError:
                pass
            agent = mine.get(w.id) or w.agent_id
            known = self.containers.get(agent)
            if known is not None and known.id == w.id:
                del self.containers[agent]
        return removed

    def get_workspace_info(self, agent_id: str) -> Optional[WorkspaceInfo]:
        """The agent's workspace as the original's dict, with live usage under ``stats``;
        ``None`` when the agent has no workspace. Synchronous, as in the original: it
        blocks the calling thread for one or two requests to the service."""
        workspace_id = self._workspace_id_blocking(agent_id)
        if workspace_id is None:
            return None
        try:
            body = self.client._request_blocking("GET", f"/workspaces/{quote(workspace_id, safe='')}")
        except NotFoundError:
            return None
        ws = Workspace.from_dict(body)
        if agent_id in self.containers:
            self._remember(ws)
        return WorkspaceInfo(ws)

    async def list_workspaces(self, agent_id: Optional[str] = None) -> List[WorkspaceInfo]:
        """The live workspaces of the service (of one agent, when given), oldest first, as
        the original's dicts with live usage under ``stats``."""
        listed = await self.client.list_workspaces(agent_id=agent_id)

        async def detailed(w: Workspace) -> WorkspaceInfo:
            if w.state != "running":
                return WorkspaceInfo(w)
            try:
                return WorkspaceInfo(await self.client.get_workspace(w.id))
            except NotFoundError:
                return WorkspaceInfo(w)

        return list(await asyncio.gather(*(detailed(w) for w in listed)))

    # -- more than the original ---------------------------------------------------------

    async def get_workspace(self, agent_id: str) -> WorkspaceContainer:
        """The agent's workspace with its live resource usage (``usage``)."""
        ws = await self.client.get_workspace(await self.workspace_id(agent_id))
        if agent_id in self.containers:
            return self._remember(ws)
        return WorkspaceContainer.of(ws)

    async def egress(
        self,
        agent_id: str,
        *,
        limit: Optional[int] = None,
        decision: Optional[str] = None,
        after: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        """The outbound connection attempts of the agent's workspace (proxy mode), oldest
        first (see :meth:`AsyncConductorClient.egress`)."""
        return await self.client.egress(await self.workspace_id(agent_id), limit=limit, decision=decision, after=after)

    async def list_snapshots(self, agent_id: str) -> List[Snapshot]:
        """The snapshots of the agent's workspace, oldest first."""
        return await self.client.list_snapshots(await self.workspace_id(agent_id))

    async def delete_snapshot(self, agent_id: str, snapshot_name: str) -> None:
        await self.client.delete_snapshot(await self.workspace_id(agent_id), snapshot_name)
