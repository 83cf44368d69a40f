"""Typed views of the API's JSON objects.

Each class is a frozen dataclass built with ``from_dict`` from the server's JSON; fields
the server adds later are ignored, so an older client keeps working against a newer
service. Objects also support ``obj["field"]`` and ``to_dict()`` for code that treats
results as dictionaries. :class:`ExecResult` is the exception to the dataclass rule: it is
also the tuple ``(exit_code, stdout, stderr)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, SupportsIndex, Tuple, Type, TypeVar, Union, cast, overload

__all__ = [
    "Health",
    "Environment",
    "Limits",
    "WorkspaceUsage",
    "Workspace",
    "ExecResult",
    "Snapshot",
    "Fork",
    "Secret",
    "TaskCommand",
    "Task",
    "TaskPage",
    "TaskSpec",
    "LogChunk",
    "LogEnd",
    "LogEvent",
    "TERMINAL_TASK_STATES",
]

M = TypeVar("M", bound="_Model")

#: Task statuses after which a task no longer changes.
TERMINAL_TASK_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


class _Model:
    """Shared helpers: construction from JSON, item access, conversion back to a dict."""

    @classmethod
    def from_dict(cls: Type[M], data: Mapping[str, Any]) -> M:
        return cls._from_fields(data)

    @classmethod
    def _from_fields(cls: Type[M], data: Mapping[str, Any]) -> M:
        """An instance from the keys that are fields; other keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})

    def __getitem__(self, key: str) -> Any:
        if key in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class Health(_Model):
    #: ``"ok"``, or ``"degraded"`` while the container engine does not answer.
    status: str
    version: str
    #: ``"ok"`` or ``"unavailable"`` (the service reconnects by itself).
    engine: str = "ok"
    engine_error: Optional[str] = None


@dataclass(frozen=True)
class Environment(_Model):
    """An environment workspaces and tasks can use (``GET /environments``)."""

    name: str
    description: str = ""
    image: str = ""
    built: bool = False
    size_bytes: Optional[int] = None
    builtin: bool = False
    kind: str = ""


@dataclass(frozen=True)
class Limits(_Model):
    memory: str = ""
    cpu: str = ""
    pids: int = 0
    nofile: int = 0
    nproc: int = 0
    volume_size: str = ""


@dataclass(frozen=True)
class WorkspaceUsage(_Model):
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    memory_limit_bytes: int = 0
    pids: int = 0
    pids_limit: int = 0
    oom_kills: Optional[int] = None
    disk_used_bytes: Optional[int] = None
    disk_limit_bytes: Optional[int] = None
    #: How commands reach the workspace: ``"agent"`` or ``"podman"``.
    exec_path: Optional[str] = None
    #: Published ports: ``{"container_port": 8000, "host_port": 20001}`` (host side on 127.0.0.1).
    published_ports: List[Dict[str, int]] = field(default_factory=list, hash=False)


@dataclass(frozen=True)
class Workspace(_Model):
    """A workspace: one agent's isolated container."""

    id: str
    agent_id: str
    environment: str
    state: str
    image: str = ""
    container_name: str = ""
    network: Optional[str] = None
    #: The network it runs with: ``{"mode": "proxy", "allow": [...], "deny": [...]}``.
    network_policy: Optional[Dict[str, Any]] = field(default=None, hash=False)
    limits: Limits = field(default_factory=Limits)
    created_at: int = 0
    last_used_at: int = 0
    error: Optional[str] = None
    usage: Optional[WorkspaceUsage] = None
    #: The names of the secrets it may use (never their values).
    secrets: List[str] = field(default_factory=list, hash=False)

    @property
    def workspace_id(self) -> str:
        return self.id

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Workspace":
        d = dict(data)
        d["limits"] = Limits.from_dict(d.get("limits") or {})
        if d.get("usage") is not None:
            d["usage"] = WorkspaceUsage.from_dict(d["usage"])
        return cls._from_fields(d)


class ExecResult(Tuple[int, str, str]):
    """The outcome of a command run in a workspace.

    It is the tuple ``(exit_code, stdout, stderr)``, the return value of the original
    ``WorkspaceIsolationManager.execute_in_workspace``, so it unpacks and indexes like one::

        code, out, err = result          # result[0] == result.exit_code

    and it has named fields too: ``exit_code`` (also ``returncode``), ``stdout``,
    ``stderr``, ``duration_ms`` and ``timed_out`` (``result["exit_code"]`` and
    ``to_dict()`` work as on the other models). Only the first three take part in tuple
    operations (``len(result) == 3``); two results are equal when every field is.
    """

    #: The fields, in order; the first three are the tuple's items.
    FIELDS = ("exit_code", "stdout", "stderr", "duration_ms", "timed_out")

    def __new__(
        cls,
        exit_code: int,
        stdout: str = "",
        stderr: str = "",
        duration_ms: int = 0,
        timed_out: bool = False,
    ) -> "ExecResult":
        self = super().__new__(cls, (exit_code, stdout, stderr))
        object.__setattr__(self, "_extra", (duration_ms, timed_out))
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExecResult":
        return cls(**{k: v for k, v in data.items() if k in cls.FIELDS})

    @property
    def exit_code(self) -> int:
        return cast(int, tuple.__getitem__(self, 0))

    @property
    def returncode(self) -> int:
        """The exit code, under the name ``subprocess`` uses."""
        return self.exit_code

    @property
    def stdout(self) -> str:
        return cast(str, tuple.__getitem__(self, 1))

    @property
    def stderr(self) -> str:
        return cast(str, tuple.__getitem__(self, 2))

    @property
    def duration_ms(self) -> int:
        return self._extra[0]  # type: ignore[attr-defined,no-any-return]

    @property
    def timed_out(self) -> bool:
        return self._extra[1]  # type: ignore[attr-defined,no-any-return]

    @property
    def ok(self) -> bool:
        """Whether the command exited with 0."""
        return self.exit_code == 0

    @overload
    def __getitem__(self, key: SupportsIndex) -> Any: ...

    @overload
    def __getitem__(self, key: slice) -> Tuple[Any, ...]: ...

    @overload
    def __getitem__(self, key: str) -> Any: ...

    def __getitem__(self, key: Any) -> Any:
        """``result[0]`` / ``result[:2]`` as the tuple; ``result["stdout"]`` by field name."""
        if isinstance(key, str):
            if key in self.FIELDS:
                return getattr(self, key)
            raise KeyError(key)
        return tuple.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except (KeyError, IndexError, TypeError):
            return default

    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def _all(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExecResult):
            return self._all() == other._all()
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = tuple.__hash__

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> Any:
        return (type(self), self._all())

    def __copy__(self) -> "ExecResult":
        return self

    def __deepcopy__(self, memo: Any) -> "ExecResult":
        return self

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"ExecResult({fields})"


@dataclass(frozen=True)
class Snapshot(_Model):
    name: str
    workspace_id: str
    created_at: str = ""
    size_bytes: int = 0
    state: str = ""


@dataclass(frozen=True)
class Fork(_Model):
    """The result of :meth:`~conductor.AsyncConductorClient.fork`: the new workspaces,
    running, each with the source's state at the fork (or at ``snapshot``)."""

    source_id: str
    workspaces: List[Workspace] = field(default_factory=list, hash=False)
    #: The snapshot forked from, if one was named.
    snapshot: Optional[str] = None
    #: How long the source was paused for the capture (``None`` from a snapshot or a
    #: stopped workspace).
    paused_ms: Optional[int] = None
    took_ms: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fork":
        d = dict(data)
        d["workspaces"] = [Workspace.from_dict(w) for w in d.get("workspaces") or []]
        return cls._from_fields(d)


@dataclass(frozen=True)
class Secret(_Model):
    """A registered secret's metadata (``GET /secrets``); the value is write-only and
    never comes back."""

    name: str
    #: Where it is injected: ``{"host": ..., "inject": {"type": "header", "name", "value"}}``
    #: or ``{"host": ..., "inject": {"type": "basic", "username"}}``.
    rules: List[Dict[str, Any]] = field(default_factory=list, hash=False)
    #: The variable holding its placeholder inside a workspace (``GITHUB_TOKEN``).
    env_var: str = ""
    #: 1 when registered, one more per rotation.
    version: int = 0
    #: RFC 3339 UTC.
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class TaskCommand(_Model):
    """One command of a task: its phase (``pre``, ``main``, ``post``), result and output."""

    phase: str
    index: int
    command: str
    exit_code: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    duration_ms: int = 0


@dataclass(frozen=True)
class Task(_Model):
    """A task and its results so far."""

    id: str
    status: str
    task_type: str = "isolated_execution"
    environment: str = ""
    description: Optional[str] = None
    batch_id: Optional[str] = None
    agent_id: Optional[str] = None
    priority: int = 0
    attempt: int = 0
    workspace_id: Optional[str] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    commands: List[TaskCommand] = field(default_factory=list)
    services: List[str] = field(default_factory=list)
    created_at: str = ""
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    duration_ms: Optional[int] = None
    snapshot: Optional[str] = None
    #: What the task's workspace tried to reach through the proxy (proxy mode; only from
    #: ``get_task``): ``allowed``, ``denied``, ``bytes_up``, ``bytes_down``, ``hosts``.
    egress: Optional[Dict[str, Any]] = field(default=None, hash=False)

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def finished(self) -> bool:
        """Whether the task has reached a final status."""
        return self.status in TERMINAL_TASK_STATES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Task":
        d = dict(data)
        d["commands"] = [TaskCommand.from_dict(c) for c in d.get("commands") or []]
        return cls._from_fields(d)


@dataclass(frozen=True)
class TaskPage(_Model):
    tasks: List[Task]
    total: int
    limit: int
    offset: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskPage":
        return cls(
            tasks=[Task.from_dict(t) for t in data.get("tasks") or []],
            total=int(data.get("total", 0)),
            limit=int(data.get("limit", 0)),
            offset=int(data.get("offset", 0)),
        )


@dataclass
class TaskSpec(_Model):
    """A task to submit (the body of ``POST /tasks``); see :func:`conductor.orchestrator.create_task`."""

    environment: str
    commands: List[str]
    task_type: str = "isolated_execution"
    description: Optional[str] = None
    services: List[str] = field(default_factory=list)
    priority: Optional[int] = None
    timeout: Optional[int] = None
    agent_id: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    #: The task's network over its environment's: a mode or ``{"mode", "allow", "deny"}``.
    network: Optional[Union[str, Dict[str, Any]]] = None
    #: Names of registered secrets the proxy injects into the task's requests to their hosts.
    secrets: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        """The request body: unset optional fields are left out."""
        body: Dict[str, Any] = {
            "task_type": self.task_type,
            "environment": self.environment,
            "commands": list(self.commands),
        }
        for key in ("description", "priority", "timeout", "agent_id", "source", "network"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.services:
            body["services"] = list(self.services)
        if self.env:
            body["env"] = dict(self.env)
        if self.secrets:
            body["secrets"] = list(self.secrets)
        return body


@dataclass(frozen=True)
class LogChunk(_Model):
    """Output of a task as it is written: ``stream`` is ``stdout``, ``stderr`` or ``system``."""

    seq: int
    stream: str
    data: str


@dataclass(frozen=True)
class LogEnd(_Model):
    """The last event of a followed log: the task finished with ``status``."""

    status: str


LogEvent = Union[LogChunk, LogEnd]
