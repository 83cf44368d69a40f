"""Python client for conductor: isolated Podman workspaces for AI agents.

* :class:`AsyncConductorClient` / :class:`ConductorClient`: the HTTP API, typed.
* :class:`conductor.workspace_isolation.WorkspaceIsolationManager`: workspaces per agent.
* :func:`conductor.orchestrator.create_task` and :data:`conductor.orchestrator.orchestrator`:
  tasks, run in parallel by the service.
* :mod:`conductor.errors`: API errors as exceptions carrying the server's code, message
  and field.

The service address comes from arguments, a conductor configuration, or
``CONDUCTOR_URL`` / ``CONDUCTOR_TOKEN`` (default ``http://127.0.0.1:8081``).
"""

__version__ = "0.1.0"

from .client import AsyncConductorClient, ConductorClient, basic_rule, header_rule  # noqa: E402
from .errors import (  # noqa: E402
    AuthError,
    ConductorError,
    ConflictError,
    ConnectionFailedError,
    EnvironmentUnavailableError,
    NotFoundError,
    NoWorkspaceError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    ValidationError,
)
from .models import (  # noqa: E402
    Environment,
    ExecResult,
    Fork,
    Health,
    Limits,
    LogChunk,
    LogEnd,
    LogEvent,
    Secret,
    Snapshot,
    Task,
    TaskCommand,
    TaskPage,
    TaskSpec,
    Workspace,
    WorkspaceUsage,
)

__all__ = [
    "__version__",
    "AsyncConductorClient",
    "ConductorClient",
    "basic_rule",
    "header_rule",
    "AuthError",
    "ConductorError",
    "ConflictError",
    "ConnectionFailedError",
    "EnvironmentUnavailableError",
    "NotFoundError",
    "NoWorkspaceError",
    "ResourceExhaustedError",
    "ServiceUnavailableError",
    "ValidationError",
    "Environment",
    "ExecResult",
    "Fork",
    "Health",
    "Limits",
    "LogChunk",
    "LogEnd",
    "LogEvent",
    "Secret",
    "Snapshot",
    "Task",
    "TaskCommand",
    "TaskPage",
    "TaskSpec",
    "Workspace",
    "WorkspaceUsage",
]
