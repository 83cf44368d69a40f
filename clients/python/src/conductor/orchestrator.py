"""Tasks as in the spec's parallel example: ``create_task`` and ``orchestrator``.

::

    from conductor.orchestrator import create_task, orchestrator

    tasks = [
        create_task(task_type="isolated_execution", environment="python-dev",
                    commands=["pytest tests/unit/", "pytest tests/integration/"]),
        create_task(task_type="isolated_execution", environment="nodejs-dev",
                    commands=["npm test", "npm run e2e"]),
    ]
    results = await orchestrator.execute_parallel_tasks(tasks)
    for task in results:
        print(task.environment, task.status, task.exit_code)

:func:`create_task` only builds a :class:`~conductor.models.TaskSpec`; nothing is sent
until an :class:`Orchestrator` runs it. ``orchestrator`` is a ready-made instance that
finds the service through ``CONDUCTOR_URL`` / ``CONDUCTOR_TOKEN`` (default
``http://127.0.0.1:8081``); make your own with ``Orchestrator(config)`` to use a
configuration's address instead. The service's orchestrator does the scheduling: tasks run
in parallel up to ``task_execution.max_workers``, by priority.
"""

from __future__ import annotations

from typing import AsyncGenerator, Iterable, List, Mapping, Optional, Sequence

from .client import AsyncConductorClient, NetworkLike, TaskLike, network_body, secrets_body
from .models import LogEvent, Task, TaskSpec
from .settings import ConfigLike

__all__ = ["create_task", "Orchestrator", "orchestrator"]


def create_task(
    task_type: str = "isolated_execution",
    environment: str = "",
    commands: Iterable[str] = (),
    *,
    description: Optional[str] = None,
    services: Optional[Iterable[str]] = None,
    priority: Optional[int] = None,
    timeout: Optional[int] = None,
    agent_id: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    source: Optional[str] = None,
    network: Optional[NetworkLike] = None,
    allow: Optional[Iterable[str]] = None,
    deny: Optional[Iterable[str]] = None,
    secrets: Optional[Iterable[str]] = None,
) -> TaskSpec:
    """A task to run: ``commands`` run in order in one shell session inside a fresh
    workspace of ``environment`` (``cd`` and exports carry over; the first failing command
    stops the task). ``services`` are sidecar images such as ``"postgres:14"``; ``timeout``
    is in seconds for all commands together; ``source`` is a host directory copied to
    ``/workspace/src`` first. ``network``, ``allow`` and ``deny`` give the task's network
    over its environment's, as for :meth:`AsyncConductorClient.create_workspace` (an
    ``allow`` list replaces the environment's, ``deny`` entries add to it). ``secrets``
    names registered secrets the proxy injects into the task's requests to their hosts
    (the workspace holds only placeholders)."""
    if not environment:
        raise ValueError("create_task needs an environment, e.g. environment='python-dev'")
    if isinstance(commands, str):
        raise TypeError("commands must be a list of command lines, not one string")
    return TaskSpec(
        task_type=task_type,
        environment=environment,
        commands=list(commands),
        description=description,
        services=list(services or []),
        priority=priority,
        timeout=timeout,
        agent_id=agent_id,
        env=dict(env or {}),
        source=source,
        network=network_body(network, allow, deny),
        secrets=secrets_body(secrets) or [],
    )


class Orchestrator:
    """Submits tasks to the service and collects their results.

    Args:
        config: a conductor configuration (dict or YAML path) giving the service address.
        url, token: override the configuration and the environment.
        client: an existing client to use.

    Without a client, the address is resolved at the first call (so ``CONDUCTOR_URL`` may
    be set after import).
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        url: Optional[str] = None,
        token: Optional[str] = None,
        client: Optional[AsyncConductorClient] = None,
    ) -> None:
        self._config = config
        self._url = url
        self._token = token
        self._client = client

    @property
    def client(self) -> AsyncConductorClient:
        if self._client is None:
            self._client = AsyncConductorClient(self._url, self._token, config=self._config)
        return self._client

    def __repr__(self) -> str:
        where = self._client.url if self._client is not None else "not connected yet"
        return f"Orchestrator({where})"

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def execute_parallel_tasks(self, tasks: Sequence[TaskLike]) -> List[Task]:
        """Submits the tasks as one batch (all are queued, or none when one is invalid),
        waits until every one has finished, and returns them in the same order with their
        status (``succeeded``, ``failed``, ``timed_out`` or ``cancelled``), exit code and
        per-command output. A failing task is a result, not an exception."""
        return await self.client.submit_tasks(tasks, wait=True)

    async def execute_task(self, task: TaskLike) -> Task:
        """Runs one task and returns it once it has finished."""
        return await self.client.submit_task(task, wait=True)

    async def submit(self, tasks: Sequence[TaskLike]) -> List[Task]:
        """Queues the tasks and returns at once (follow them with :meth:`logs` or
        :meth:`wait`)."""
        return await self.client.submit_tasks(tasks)

    async def wait(self, task_id: str, *, timeout: Optional[float] = None) -> Task:
        return await self.client.wait_task(task_id, timeout=timeout)

    def logs(self, task_id: str) -> AsyncGenerator[LogEvent, None]:
        """The task's output as it is written (see :meth:`AsyncConductorClient.follow_logs`)."""
        return self.client.follow_logs(task_id)

    async def cancel(self, task_id: str) -> Task:
        return await self.client.cancel_task(task_id)


#: The default orchestrator (``CONDUCTOR_URL`` / ``CONDUCTOR_TOKEN``, else 127.0.0.1:8081).
orchestrator = Orchestrator()
