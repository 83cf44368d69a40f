"""HTTP clients for the conductor API: :class:`AsyncConductorClient` (asyncio, on httpx)
and :class:`ConductorClient`, a thin synchronous wrapper around it.

Each method is one API call and returns typed objects from :mod:`conductor.models`; an
error response raises the matching :mod:`conductor.errors` exception. The service bounds
its own long operations (workspace creation may build an image, commands have their
timeout), so by default only connecting has a timeout.

Example::

    async with AsyncConductorClient() as c:          # CONDUCTOR_URL or 127.0.0.1:8081
        ws = await c.create_workspace("agent-1", "python-dev")
        r = await c.exec(ws.id, "python3 --version")
        print(r.exit_code, r.stdout)
        await c.delete_workspace(ws.id, keep_volumes=False)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from . import __version__
from .errors import ConductorError, ConnectionFailedError, error_from_response
from .models import (
    Environment,
    ExecResult,
    Fork,
    Health,
    LogChunk,
    LogEnd,
    LogEvent,
    Secret,
    Snapshot,
    Task,
    TaskPage,
    TaskSpec,
    Workspace,
)
from .settings import ConfigLike, resolve

__all__ = [
    "AsyncConductorClient",
    "ConductorClient",
    "CommandLike",
    "DEFAULT_TIMEOUT",
    "NetworkLike",
    "TaskLike",
    "basic_rule",
    "header_rule",
]

#: Connect within 10 s; reads wait as long as the service works on the request.
DEFAULT_TIMEOUT = httpx.Timeout(None, connect=10.0)

#: A task to submit: a :class:`TaskSpec` or the JSON body as a dict.
TaskLike = Union[TaskSpec, Mapping[str, Any]]

#: What ``exec`` runs: a shell command line (``"cd src && make"``), or an argv
#: (``["python3", "-c", "print(1)"]``) executed directly, without a shell.
CommandLike = Union[str, Sequence[str]]

#: A network policy: a mode (``"isolated"``, ``"none"``, ``"proxy"``, ``"egress"``) or
#: ``{"mode": ..., "allow": [...], "deny": [...]}`` (every key optional).
NetworkLike = Union[str, Mapping[str, Any]]

T = TypeVar("T")


def network_body(
    network: Optional[NetworkLike] = None,
    allow: Optional[Iterable[str]] = None,
    deny: Optional[Iterable[str]] = None,
) -> Optional[Union[str, Dict[str, Any]]]:
    """The ``network`` of a workspace or task request: ``None`` when nothing is given, the
    plain mode string when only a mode is, else ``{"mode", "allow", "deny"}`` (an
    ``allow`` list without a mode means proxy mode; the service decides)."""
    for name, entries in (("allow", allow), ("deny", deny)):
        if isinstance(entries, (str, bytes)):
            raise TypeError(f"{name} must be a list of entries such as ['pypi'], not one string")
    if network is not None and not isinstance(network, (str, Mapping)):
        raise TypeError("network must be a mode (str) or a mapping {'mode', 'allow', 'deny'}")
    if allow is None and deny is None:
        return dict(network) if isinstance(network, Mapping) else network
    body: Dict[str, Any] = dict(network) if isinstance(network, Mapping) else {}
    if isinstance(network, str):
        body["mode"] = network
    if allow is not None:
        body["allow"] = list(allow)
    if deny is not None:
        body["deny"] = list(deny)
    return body


def secrets_body(secrets: Optional[Iterable[str]]) -> Optional[List[str]]:
    """The ``secrets`` of a workspace or task request: a list of names, or ``None``."""
    if secrets is None:
        return None
    if isinstance(secrets, (str, bytes)):
        raise TypeError("secrets must be a list of secret names such as ['github'], not one string")
    return list(secrets)


def header_rule(host: str, name: str, template: str) -> Dict[str, Any]:
    """An injection rule for :meth:`AsyncConductorClient.put_secret`: requests to ``host``
    get header ``name`` set to ``template`` with ``{value}`` replaced by the secret, e.g.
    ``header_rule("api.github.com", "Authorization", "Bearer {value}")``."""
    return {"host": host, "inject": {"type": "header", "name": name, "value": template}}


def basic_rule(host: str, username: str) -> Dict[str, Any]:
    """An injection rule for :meth:`AsyncConductorClient.put_secret`: requests to ``host``
    get ``Authorization: Basic base64(username:secret)``, the credential git over HTTPS
    sends, e.g. ``basic_rule("github.com", "x-access-token")``."""
    return {"host": host, "inject": {"type": "basic", "username": username}}


def _command_body(command: CommandLike) -> Union[str, List[str]]:
    """The ``command`` of an exec request: a string as is, any other sequence as a JSON
    array (path-like elements as their paths; the service checks the rest)."""
    if isinstance(command, str):
        return command
    if isinstance(command, (bytes, bytearray)):
        raise TypeError("command must be a str (a shell command line) or a sequence of str (an argv), not bytes")
    return [os.fspath(arg) if isinstance(arg, os.PathLike) else arg for arg in command]


def _decode(r: httpx.Response) -> Any:
    """A response's body: JSON, text, or ``None``; an error status raises its exception."""
    if r.status_code >= 400:
        raise error_from_response(r)
    if r.status_code == 204 or not r.content:
        return None
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return r.text


def _seg(value: str) -> str:
    """One URL path segment, escaped."""
    return quote(str(value), safe="")


def _task_body(task: TaskLike) -> Dict[str, Any]:
    return task.to_json() if isinstance(task, TaskSpec) else dict(task)


def _params(**values: Any) -> Dict[str, Any]:
    """Query parameters without the unset ones; booleans as ``true``/``false``."""
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return out


@dataclass
class _SseEvent:
    event: str
    data: str
    id: Optional[str]


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[_SseEvent]:
    """Server-Sent Events from the lines of a response (comments and keep-alives skipped)."""
    event = "message"
    data: List[str] = []
    event_id: Optional[str] = None
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield _SseEvent(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class AsyncConductorClient:
    """Asynchronous client of the conductor HTTP API.

    Args:
        url: service URL, e.g. ``http://127.0.0.1:8081`` (see :mod:`conductor.settings`
            for the defaults from the configuration and ``CONDUCTOR_URL``).
        token: bearer token when the service requires one (else ``CONDUCTOR_TOKEN``).
        config: a conductor configuration (dict or YAML path) to take the address and
            token from.
        timeout: httpx timeout for every request.
        transport: an httpx transport (for tests and custom networking).

    The underlying connection pool is created on first use in the running event loop (and
    anew if the client is later used from another loop). Close it with :meth:`aclose` or
    ``async with``.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        config: ConfigLike = None,
        timeout: Union[httpx.Timeout, float, None] = DEFAULT_TIMEOUT,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        settings = resolve(url, token, config)
        self.url = settings.url
        self._token = settings.token
        self._timeout = timeout
        self._transport = transport
        self._client: Optional[httpx.AsyncClient] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def __repr__(self) -> str:
        return f"AsyncConductorClient(url={self.url!r})"

    def _headers(self) -> Dict[str, str]:
        headers = {"User-Agent": f"conductor-python/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(
                base_url=self.url, headers=self._headers(), timeout=self._timeout, transport=self._transport
            )
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        """Closes the connection pool."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None
        self._loop = None

    async def __aenter__(self) -> "AsyncConductorClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _unreachable(self, e: Exception) -> ConnectionFailedError:
        return ConnectionFailedError(
            f"cannot reach conductor at {self.url} ({type(e).__name__}: {e}); is `conductor serve` running?",
            code="connection_failed",
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        try:
            r = await self._http().request(method, path, json=json, params=params)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return _decode(r)

    def _request_blocking(self, method: str, path: str, *, params: Optional[Mapping[str, Any]] = None) -> Any:
        """One request made synchronously (it blocks the calling thread, even inside a
        running event loop), for the few methods that must be synchronous."""
        headers = self._headers()
        transport = self._transport if isinstance(self._transport, httpx.BaseTransport) else None
        try:
            with httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout, transport=transport) as http:
                r = http.request(method, path, params=params)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return _decode(r)

    # -- system -------------------------------------------------------------------------

    async def health(self) -> Health:
        """``GET /health``: the service answers (no token needed)."""
        return Health.from_dict(await self._request("GET", "/health"))

    async def environments(self) -> List[Environment]:
        """``GET /environments``: every environment, presets first."""
        body = await self._request("GET", "/environments")
        return [Environment.from_dict(e) for e in body["environments"]]

    # -- workspaces ---------------------------------------------------------------------

    async def create_workspace(
        self,
        agent_id: str,
        environment: str,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        network: Optional[NetworkLike] = None,
        allow: Optional[Iterable[str]] = None,
        deny: Optional[Iterable[str]] = None,
        secrets: Optional[Iterable[str]] = None,
    ) -> Workspace:
        """``POST /workspaces``: creates and starts a workspace (building its image when needed).

        ``limits`` may set ``memory`` (e.g. ``"2Gi"``), ``cpu`` (e.g. ``"1.5"``), ``pids``
        and ``volume_size``. ``network`` is a mode: ``"isolated"`` (loopback only; ``"none"``
        is the same), ``"proxy"`` (only what ``allow`` lets through, over HTTP(S) via the
        service's audited proxy; see :meth:`egress`) or ``"egress"`` (the public internet, never the host or private ranges), or the
        whole policy as a mapping ``{"mode", "allow", "deny"}``. ``allow`` (which implies
        proxy mode) and ``deny`` are lists of entries: a host name (``"pypi.org"``), a
        ``"*.suffix"`` wildcard (its subdomains only), an address range written as a CIDR,
        each with an optional ``":port"`` (default 80 and 443), or a bundle (``"pypi"``,
        ``"npm"``, ``"debian"``, ``"github"``).

        ``secrets`` names registered secrets (:meth:`put_secret`) the workspace may use; it
        implies proxy mode and allows their rules' hosts. The workspace holds only a
        placeholder per secret (``GITHUB_TOKEN`` for ``"github"``), which the proxy replaces
        by the value in requests to those hosts.
        """
        body: Dict[str, Any] = {"agent_id": agent_id, "environment": environment}
        if limits:
            body["limits"] = dict(limits)
        net = network_body(network, allow, deny)
        if net is not None:
            body["network"] = net
        names = secrets_body(secrets)
        if names is not None:
            body["secrets"] = names
        return Workspace.from_dict(await self._request("POST", "/workspaces", json=body))

    async def list_workspaces(
        self,
        *,
        agent_id: Optional[str] = None,
        environment: Optional[str] = None,
        state: Optional[str] = None,
        all: bool = False,
    ) -> List[Workspace]:
        """``GET /workspaces``: live workspaces (with ``all=True`` also removed, lost, failed), oldest first."""
        params = _params(agent_id=agent_id, environment=environment, state=state, all=all or None)
        body = await self._request("GET", "/workspaces", params=params)
        return [Workspace.from_dict(w) for w in body["workspaces"]]

    async def get_workspace(self, workspace_id: str) -> Workspace:
        """``GET /workspaces/{id}``: the workspace with its live resource usage."""
        return Workspace.from_dict(await self._request("GET", f"/workspaces/{_seg(workspace_id)}"))

    async def delete_workspace(self, workspace_id: str, *, keep_volumes: Optional[bool] = None) -> Workspace:
        """``DELETE /workspaces/{id}``: removes it; ``keep_volumes`` keeps or deletes its data
        (default: kept only for persistent volumes)."""
        params = _params(keep_volumes=keep_volumes)
        body = await self._request("DELETE", f"/workspaces/{_seg(workspace_id)}", params=params)
        return Workspace.from_dict(body)

    async def _lifecycle(self, workspace_id: str, action: str) -> Workspace:
        body = await self._request("POST", f"/workspaces/{_seg(workspace_id)}/{action}")
        return Workspace.from_dict(body)

    async def pause(self, workspace_id: str) -> Workspace:
        """``POST /workspaces/{id}/pause``: freezes every process (no CPU, memory kept). The
        next exec, file operation or task resumes it unless the service's ``auto_resume`` is
        off (then they raise :class:`ConflictError`)."""
        return await self._lifecycle(workspace_id, "pause")

    async def resume(self, workspace_id: str) -> Workspace:
        """``POST /workspaces/{id}/resume``: a paused workspace goes on where it was; a
        suspended or stopped one starts again with its files."""
        return await self._lifecycle(workspace_id, "resume")

    async def suspend(self, workspace_id: str) -> Workspace:
        """``POST /workspaces/{id}/suspend``: stops the container to free its memory. Files are
        kept (also installed packages); processes are not."""
        return await self._lifecycle(workspace_id, "suspend")

    async def stop(self, workspace_id: str) -> Workspace:
        """``POST /workspaces/{id}/stop``: stops it until :meth:`start` (exec does not resume a
        stopped workspace)."""
        return await self._lifecycle(workspace_id, "stop")

    async def start(self, workspace_id: str) -> Workspace:
        """``POST /workspaces/{id}/start``: starts a stopped workspace again."""
        return await self._lifecycle(workspace_id, "start")
    async def fork(
        self,
        workspace_id: str,
        count: int = 1,
        *,
        snapshot: Optional[str] = None,
        agent_id: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
    ) -> Fork:
        """``POST /workspaces/{id}/fork``: ``count`` new running workspaces holding the
        workspace's state now (root file system changes and ``/workspace``; the source is
        paused only for the capture) or at its snapshot ``snapshot``. Each has its own id,
        container, network namespace, agent, limits and quota, and the source's environment
        variables (``env`` sets more over them) and network policy. ``agent_id`` names the
        copies' agent (default: the source's); ``limits`` may change ``memory``, ``cpu`` and
        ``pids``. All or nothing: when one copy fails, none is kept and the error is raised."""
        body: Dict[str, Any] = {"count": count}
        if snapshot is not None:
            body["snapshot"] = snapshot
        if agent_id is not None:
            body["agent_id"] = agent_id
        if env:
            body["env"] = dict(env)
        if limits:
            body["limits"] = dict(limits)
        return Fork.from_dict(await self._request("POST", f"/workspaces/{_seg(workspace_id)}/fork", json=body))

    async def exec(
        self,
        workspace_id: str,
        command: CommandLike,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> ExecResult:
        """``POST /workspaces/{id}/exec``: runs a command and returns its result (whatever
        its exit code), which also unpacks as ``(exit_code, stdout, stderr)``.

        ``command`` is a shell command line (a ``str``, run by the workspace's shell: pipes,
        ``&&`` and ``cd`` work) or an argv (a list or tuple of ``str``, executed directly with
        no shell, as ``podman exec`` does). ``timeout`` is in seconds."""
        body: Dict[str, Any] = {"command": _command_body(command)}
        if timeout is not None:
            body["timeout"] = timeout
        if env:
            body["env"] = dict(env)
        if cwd is not None:
            body["cwd"] = cwd
        return ExecResult.from_dict(await self._request("POST", f"/workspaces/{_seg(workspace_id)}/exec", json=body))

    async def egress(
        self,
        workspace_id: str,
        *,
        limit: Optional[int] = None,
        decision: Optional[str] = None,
        after: Optional[int] = None,
        task_id: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """``GET /workspaces/{id}/egress``: the workspace's outbound connection attempts
        through the proxy (proxy mode), oldest first, as dicts with ``id``, ``at``
        (RFC 3339), ``at_ms``, ``task_id``, ``method``, ``host``, ``port``, ``resolved``,
        ``decision`` (``"allowed"`` / ``"denied"``), ``rule``, ``reason`` (e.g.
        ``"not_allowed"``), ``bytes_up``, ``bytes_down``, ``duration_ms`` and ``error``.

        Without ``after`` the last ``limit`` rows (default 100, at most 1000); with it the
        first ``limit`` rows whose ``id`` is larger (pass the last ``id`` seen to page on or
        to poll for new ones). ``decision`` and ``task_id`` filter. Rows stay after the
        workspace is removed, for ``network.egress.audit_retention_days``."""
        params = _params(limit=limit, decision=decision, after=after, task_id=task_id)
        body = await self._request("GET", f"/workspaces/{_seg(workspace_id)}/egress", params=params)
        rows = body.get("events", []) if isinstance(body, dict) else body
        return [dict(r) for r in rows or []]

    # -- secrets ------------------------------------------------------------------------

    async def put_secret(
        self, name: str, value: Union[str, bytes], rules: Iterable[Mapping[str, Any]]
    ) -> Secret:
        """``POST /secrets``: registers a secret, or rotates it when ``name`` exists (a new
        value and rules, ``version`` + 1, applied from the next request on). ``rules`` are
        dicts as :func:`header_rule` and :func:`basic_rule` make. The value is write-only:
        the result, and any error, carry only metadata."""
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("ascii")
        if not isinstance(value, str):
            raise TypeError("value must be a str (or ASCII bytes)")
        if isinstance(rules, Mapping):
            raise TypeError("rules must be a list of rules, e.g. [basic_rule('github.com', 'x-access-token')]")
        body = {"name": name, "value": value, "rules": [dict(r) for r in rules]}
        return Secret.from_dict(await self._request("POST", "/secrets", json=body))

    async def list_secrets(self) -> List[Secret]:
        """``GET /secrets``: every registered secret's metadata, by name."""
        body = await self._request("GET", "/secrets")
        return [Secret.from_dict(s) for s in body["secrets"]]

    async def get_secret(self, name: str) -> Secret:
        """``GET /secrets/{name}``: one secret's metadata."""
        return Secret.from_dict(await self._request("GET", f"/secrets/{_seg(name)}"))

    async def delete_secret(self, name: str) -> None:
        """``DELETE /secrets/{name}``: workspaces made with it keep a placeholder that is no
        longer replaced."""
        await self._request("DELETE", f"/secrets/{_seg(name)}")

    # -- snapshots ----------------------------------------------------------------------

    async def create_snapshot(self, workspace: str, name: str, *, overwrite: bool = False) -> Snapshot:
        """``POST /workspaces/{id}/snapshots``. ``workspace`` is a workspace id, a container
        name, or an agent id with one live workspace."""
        body = {"name": name, "overwrite": overwrite}
        return Snapshot.from_dict(await self._request("POST", f"/workspaces/{_seg(workspace)}/snapshots", json=body))

    async def list_snapshots(self, workspace: str) -> List[Snapshot]:
        """``GET /workspaces/{id}/snapshots``: complete snapshots, oldest first."""
        body = await self._request("GET", f"/workspaces/{_seg(workspace)}/snapshots")
        return [Snapshot.from_dict(s) for s in body["snapshots"]]

    async def restore_snapshot(self, workspace: str, name: str) -> Workspace:
        """``POST /workspaces/{id}/snapshots/{name}/restore``: the workspace runs afterwards."""
        path = f"/workspaces/{_seg(workspace)}/snapshots/{_seg(name)}/restore"
        return Workspace.from_dict(await self._request("POST", path))

    async def delete_snapshot(self, workspace: str, name: str) -> None:
        """``DELETE /workspaces/{id}/snapshots/{name}``."""
        await self._request("DELETE", f"/workspaces/{_seg(workspace)}/snapshots/{_seg(name)}")

    # -- tasks --------------------------------------------------------------------------

    async def submit_task(self, task: TaskLike, *, wait: bool = False) -> Task:
        """``POST /tasks`` with one task; with ``wait=True`` returns once it has finished."""
        body = await self._request("POST", "/tasks", json=_task_body(task), params=_params(wait=wait or None))
        return Task.from_dict(body)

    async def submit_tasks(self, tasks: Iterable[TaskLike], *, wait: bool = False) -> List[Task]:
        """``POST /tasks`` with an array: all are queued (or none, when one is invalid).
        With ``wait=True`` returns once every one has finished. Results keep the order."""
        bodies = [_task_body(t) for t in tasks]
        if not bodies:
            return []
        body = await self._request("POST", "/tasks", json=bodies, params=_params(wait=wait or None))
        return [Task.from_dict(t) for t in body["tasks"]]

    async def list_tasks(
        self,
        *,
        status: Optional[str] = None,
        agent_id: Optional[str] = None,
        environment: Optional[str] = None,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> TaskPage:
        """``GET /tasks``: a page of tasks, newest first."""
        params = _params(status=status, agent_id=agent_id, environment=environment, limit=limit, offset=offset or None)
        return TaskPage.from_dict(await self._request("GET", "/tasks", params=params))

    async def get_task(self, task_id: str) -> Task:
        """``GET /tasks/{id}``: the task with its per-command results."""
        return Task.from_dict(await self._request("GET", f"/tasks/{_seg(task_id)}"))

    async def cancel_task(self, task_id: str) -> Task:
        """``POST /tasks/{id}/cancel``: stops a queued or running task."""
        return Task.from_dict(await self._request("POST", f"/tasks/{_seg(task_id)}/cancel"))

    async def wait_task(self, task_id: str, *, poll_interval: float = 0.5, timeout: Optional[float] = None) -> Task:
        """Polls a task until it has finished; raises :class:`asyncio.TimeoutError` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = await self.get_task(task_id)
            if task.finished:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise asyncio.TimeoutError(f"task {task_id} still {task.status} after {timeout} s")
            await asyncio.sleep(poll_interval)

    async def task_logs(self, task_id: str, *, after_seq: int = 0) -> str:
        """``GET /tasks/{id}/logs``: the combined output so far."""
        text = await self._request("GET", f"/tasks/{_seg(task_id)}/logs", params=_params(after_seq=after_seq or None))
        return text or ""

    async def follow_logs(
        self, task_id: str, *, after_seq: int = 0, reconnects: int = 3
    ) -> AsyncGenerator[LogEvent, None]:
        """``GET /tasks/{id}/logs?follow=true``: the task's output as it is written.

        Yields :class:`LogChunk` objects, then one :class:`LogEnd` with the final status,
        and stops. A dropped connection is resumed after the last chunk seen (up to
        ``reconnects`` times in a row)::

            async for event in client.follow_logs(task.id):
                if isinstance(event, LogChunk):
                    print(event.data, end="")
                else:
                    print("finished:", event.status)
        """
        path = f"/tasks/{_seg(task_id)}/logs"
        last, failures = after_seq, 0
        while True:
            try:
                params = _params(follow=True, after_seq=last or None)
                async with self._http().stream(
                    "GET", path, params=params, headers={"Accept": "text/event-stream"}
                ) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise error_from_response(r)
                    async for ev in _sse_events(r.aiter_lines()):
                        failures = 0
                        if ev.event == "output":
                            chunk = _json_object(ev.data)
                            seq = int(ev.id) if ev.id else last
                            last = max(last, seq)
                            stream, data = str(chunk.get("stream", "")), str(chunk.get("data", ""))
                            yield LogChunk(seq=seq, stream=stream, data=data)
                        elif ev.event == "end":
                            yield LogEnd(status=str(_json_object(ev.data).get("status", "")))
                            return
                cause: Exception = ConductorError("the log stream ended before the task did", code="stream_ended")
            except httpx.TransportError as e:
                cause = self._unreachable(e)
            failures += 1
            if failures > reconnects:
                raise cause
            await asyncio.sleep(min(0.5 * 2**failures, 5.0))


def _json_object(text: str) -> Dict[str, Any]:
    """The JSON object in an SSE data field (empty when it is not one)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ConductorClient:
    """Synchronous client: the same methods as :class:`AsyncConductorClient`, blocking.

    It runs the asynchronous client on a private event loop, so it must not be used from
    inside a running event loop (use :class:`AsyncConductorClient` there)::

        with ConductorClient() as c:
            ws = c.create_workspace("agent-1", "minimal")
            print(c.exec(ws.id, "uname -a").stdout)
            c.delete_workspace(ws.id, keep_volumes=False)
    """

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        *,
        config: ConfigLike = None,
        timeout: Union[httpx.Timeout, float, None] = DEFAULT_TIMEOUT,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.aio = AsyncConductorClient(url, token, config=config, timeout=timeout, transport=transport)
        self._loop = asyncio.new_event_loop()

    @property
    def url(self) -> str:
        return self.aio.url

    def __repr__(self) -> str:
        return f"ConductorClient(url={self.url!r})"

    def _run(self, aw: Awaitable[T]) -> T:
        return self._loop.run_until_complete(aw)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self.aio.aclose())
            self._loop.close()

    def __enter__(self) -> "ConductorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> Health:
        return self._run(self.aio.health())

    def environments(self) -> List[Environment]:
        return self._run(self.aio.environments())

    def create_workspace(
        self,
        agent_id: str,
        environment: str,
        *,
        limits: Optional[Mapping[str, Any]] = None,
        network: Optional[NetworkLike] = None,
        allow: Optional[Iterable[str]] = None,
        deny: Optional[Iterable[str]] = None,
        secrets: Optional[Iterable[str]] = None,
    ) -> Workspace:
        return self._run(
            self.aio.create_workspace(
                agent_id, environment, limits=limits, network=network, allow=allow, deny=deny, secrets=secrets
            )
        )

    def list_workspaces(
        self,
        *,
        agent_id: Optional[str] = None,
        environment: Optional[str] = None,
        state: Optional[str] = None,
        all: bool = False,
    ) -> List[Workspace]:
        return self._run(self.aio.list_workspaces(agent_id=agent_id, environment=environment, state=state, all=all))

    def get_workspace(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.get_workspace(workspace_id))

    def delete_workspace(self, workspace_id: str, *, keep_volumes: Optional[bool] = None) -> Workspace:
        return self._run(self.aio.delete_workspace(workspace_id, keep_volumes=keep_volumes))

    def pause(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.pause(workspace_id))

    def resume(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.resume(workspace_id))

    def suspend(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.suspend(workspace_id))

    def stop(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.stop(workspace_id))

    def start(self, workspace_id: str) -> Workspace:
        return self._run(self.aio.start(workspace_id))
    def fork(
        self,
        workspace_id: str,
        count: int = 1,
        *,
        snapshot: Optional[str] = None,
        agent_id: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
    ) -> Fork:
        return self._run(
            self.aio.fork(workspace_id, count, snapshot=snapshot, agent_id=agent_id, env=env, limits=limits)
        )

    def exec(
        self,
        workspace_id: str,
        command: CommandLike,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> ExecResult:
        return self._run(self.aio.exec(workspace_id, command, timeout=timeout, env=env, cwd=cwd))

    def egress(
        self,
        workspace_id: str,
        *,
        limit: Optional[int] = None,
        decision: Optional[str] = None,
        after: Optional[int] = None,
        task_id: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        return self._run(self.aio.egress(workspace_id, limit=limit, decision=decision, after=after, task_id=task_id))

    def put_secret(self, name: str, value: Union[str, bytes], rules: Iterable[Mapping[str, Any]]) -> Secret:
        return self._run(self.aio.put_secret(name, value, rules))

    def list_secrets(self) -> List[Secret]:
        return self._run(self.aio.list_secrets())

    def get_secret(self, name: str) -> Secret:
        return self._run(self.aio.get_secret(name))

    def delete_secret(self, name: str) -> None:
        self._run(self.aio.delete_secret(name))

    def create_snapshot(self, workspace: str, name: str, *, overwrite: bool = False) -> Snapshot:
        return self._run(self.aio.create_snapshot(workspace, name, overwrite=overwrite))

    def list_snapshots(self, workspace: str) -> List[Snapshot]:
        return self._run(self.aio.list_snapshots(workspace))

    def restore_snapshot(self, workspace: str, name: str) -> Workspace:
        return self._run(self.aio.restore_snapshot(workspace, name))

    def delete_snapshot(self, workspace: str, name: str) -> None:
        self._run(self.aio.delete_snapshot(workspace, name))

    def submit_task(self, task: TaskLike, *, wait: bool = False) -> Task:
        return self._run(self.aio.submit_task(task, wait=wait))

    def submit_tasks(self, tasks: Iterable[TaskLike], *, wait: bool = False) -> List[Task]:
        return self._run(self.aio.submit_tasks(tasks, wait=wait))

    def list_tasks(
        self,
        *,
        status: Optional[str] = None,
        agent_id: Optional[str] = None,
        environment: Optional[str] = None,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> TaskPage:
        return self._run(
            self.aio.list_tasks(status=status, agent_id=agent_id, environment=environment, limit=limit, offset=offset)
        )

    def get_task(self, task_id: str) -> Task:
        return self._run(self.aio.get_task(task_id))

    def cancel_task(self, task_id: str) -> Task:
        return self._run(self.aio.cancel_task(task_id))

    def wait_task(self, task_id: str, *, poll_interval: float = 0.5, timeout: Optional[float] = None) -> Task:
        return self._run(self.aio.wait_task(task_id, poll_interval=poll_interval, timeout=timeout))

    def task_logs(self, task_id: str, *, after_seq: int = 0) -> str:
        return self._run(self.aio.task_logs(task_id, after_seq=after_seq))

    def follow_logs(self, task_id: str, *, after_seq: int = 0, reconnects: int = 3) -> Iterator[LogEvent]:
        """The task's output as it is written: :class:`LogChunk` objects, then one :class:`LogEnd`."""
        events = self.aio.follow_logs(task_id, after_seq=after_seq, reconnects=reconnects)
        try:
            while True:
                try:
                    yield self._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())
