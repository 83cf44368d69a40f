"""Pieces that need no service: address and token resolution, the mapping of error
responses to exceptions, SSE parsing and reconnection (over httpx's mock transport), the
models and create_task, and the shapes of the original WorkspaceIsolationManager's API
(over a fake service)."""

from __future__ import annotations

import copy
import json
import pickle
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List

import httpx
import pytest

from conductor import (
    AsyncConductorClient,
    AuthError,
    ConductorClient,
    ConductorError,
    ConflictError,
    EnvironmentUnavailableError,
    ExecResult,
    LogChunk,
    LogEnd,
    NoWorkspaceError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    Task,
    ValidationError,
    Workspace,
)
from conductor.orchestrator import create_task
from conductor.settings import DEFAULT_URL, resolve
from conductor.workspace_isolation import ContainerConfig, WorkspaceContainer, WorkspaceIsolationManager


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDUCTOR_URL", raising=False)
    monkeypatch.delenv("CONDUCTOR_TOKEN", raising=False)


def test_address_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve().url == DEFAULT_URL
    monkeypatch.setenv("CONDUCTOR_URL", "http://10.0.0.1:9000/")
    assert resolve().url == "http://10.0.0.1:9000"
    config = {"network": {"api_port": 9100, "bind_address": "0.0.0.0"}}
    assert resolve(config=config).url == "http://127.0.0.1:9100"
    assert resolve(config={"network": {"api_port": 9100, "bind_address": "::"}}).url == "http://[::1]:9100"
    assert resolve(config={"isolated_workspace": {"enabled": True}}).url == "http://10.0.0.1:9000"
    assert resolve("http://explicit:1", config=config).url == "http://explicit:1"
    path = tmp_path / "standalone-isolated.yaml"
    path.write_text("network:\n  api_port: 9200\n  bind_address: 127.0.0.1\n")
    assert resolve(config=str(path)).url == "http://127.0.0.1:9200"
    assert resolve(config=path).url == "http://127.0.0.1:9200"


def test_token_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = tmp_path / "config" / "api-key"
    key.parent.mkdir()
    key.write_text("k" * 32 + "\n")
    config: Dict[str, Any] = {"storage": {"base_path": str(tmp_path)}, "security": {"api_key_required": True}}
    assert resolve(config=config).token == "k" * 32
    assert resolve(config={**config, "security": {"api_key_required": False}}).token is None
    other = tmp_path / "other-key"
    other.write_text("o" * 32)
    assert resolve(config={"security": {"api_key_required": True, "api_key_file": str(other)}}).token == "o" * 32
    monkeypatch.setenv("CONDUCTOR_TOKEN", "from-env")
    assert resolve(config=config).token == "from-env"
    assert resolve(token="explicit", config=config).token == "explicit"


def _mock(handler: Any) -> AsyncConductorClient:
    return AsyncConductorClient("http://conductor.test", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "status,code,cls",
    [
        (400, "invalid_request", ValidationError),
        (401, "unauthorized", AuthError),
        (403, "forbidden_host", AuthError),
        (404, "not_found", NotFoundError),
        (409, "conflict", ConflictError),
        (422, "environment_unavailable", EnvironmentUnavailableError),
        (429, "resource_exhausted", ResourceExhaustedError),
        (503, "engine_unavailable", ServiceUnavailableError),
        (500, "internal_error", ConductorError),
    ],
)
async def test_error_responses_become_typed_exceptions(status: int, code: str, cls: type) -> None:
    body = {"error": {"code": code, "message": "what went wrong", "field": "commands[1]"}}
    c = _mock(lambda request: httpx.Response(status, json=body))
    with pytest.raises(cls) as e:
        await c.get_task("task-1")
    assert type(e.value) is cls
    assert (e.value.status, e.value.code, e.value.message, e.value.field) == (
        status,
        code,
        "what went wrong",
        "commands[1]",
    )
    assert str(e.value) == f"{status} {code}: what went wrong (field commands[1])"
    await c.aclose()


async def test_a_non_json_error_keeps_its_text() -> None:
    c = _mock(lambda request: httpx.Response(502, text="bad gateway"))
    with pytest.raises(ConductorError) as e:
        await c.health()
    assert (e.value.status, e.value.code, e.value.message) == (502, "http_error", "bad gateway")


def _sse(*events: str) -> bytes:
    return "".join(events).encode()


async def test_follow_logs_parses_events_and_resumes_after_a_drop() -> None:
    calls: List[Dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(dict(request.url.params))
        if len(calls) == 1:  # first connection: two chunks and a keep-alive, then it drops
            body = _sse(
                ": keep-alive\n\n",
                'event: output\nid: 1\ndata: {"stream":"stdout","data":"a\\n"}\n\n',
                'event: output\r\nid: 2\r\ndata: {"stream":"stderr","data":"b"}\r\n\r\n',
            )
        else:
            body = _sse(
                'event: output\nid: 3\ndata: {"stream":"system","data":"c"}\n\n',
                'event: end\ndata: {"status":"failed"}\n\n',
            )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    c = _mock(handler)
    events = [e async for e in c.follow_logs("task-1")]
    assert events == [
        LogChunk(seq=1, stream="stdout", data="a\n"),
        LogChunk(seq=2, stream="stderr", data="b"),
        LogChunk(seq=3, stream="system", data="c"),
        LogEnd(status="failed"),
    ]
    assert calls == [{"follow": "true"}, {"follow": "true", "after_seq": "2"}]


async def test_follow_logs_gives_up_after_repeated_drops() -> None:
    c = _mock(lambda request: httpx.Response(200, content=b"", headers={"content-type": "text/event-stream"}))
    with pytest.raises(ConductorError) as e:
        [ev async for ev in c.follow_logs("task-1", reconnects=1)]
    assert e.value.code == "stream_ended"


def test_sync_client_wraps_the_async_one() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.raw_path == b"/workspaces/ws%2F1/exec"
        assert json.loads(request.content) == {"command": "ls", "timeout": 5}
        return httpx.Response(200, json={"exit_code": 0, "stdout": "x\n", "stderr": "", "duration_ms": 3})

    with ConductorClient("http://conductor.test", transport=httpx.MockTransport(handler)) as c:
        r = c.exec("ws/1", "ls", timeout=5)
    assert (r.exit_code, r.stdout, r["duration_ms"], r.timed_out) == (0, "x\n", 3, False)


def test_models_ignore_unknown_fields() -> None:
    w = Workspace.from_dict(
        {
            "id": "ws-1",
            "workspace_id": "ws-1",
            "agent_id": "a",
            "environment": "minimal",
            "state": "running",
            "limits": {"memory": "2Gi", "cpu": "1", "future_field": 1},
            "usage": {"cpu_percent": 1.5, "memory_bytes": 10},
            "added_later": True,
        }
    )
    assert w.limits.memory == "2Gi" and w.usage is not None and w.usage.memory_bytes == 10
    command = {"phase": "main", "index": 0, "command": "ls"}
    t = Task.from_dict({"id": "task-1", "status": "running", "commands": [command]})
    assert t.commands[0].command == "ls" and not t.finished and t.task_id == "task-1"


def test_create_task_builds_the_request_body() -> None:
    spec = create_task(
        task_type="isolated_execution",
        environment="fullstack",
        commands=["cd /workspace", "./scripts/setup-dev.sh"],
        services=["postgres:14", "redis:7"],
        timeout=600,
    )
    assert spec.to_json() == {
        "task_type": "isolated_execution",
        "environment": "fullstack",
        "commands": ["cd /workspace", "./scripts/setup-dev.sh"],
        "services": ["postgres:14", "redis:7"],
        "timeout": 600,
    }
    with pytest.raises(ValueError):
        create_task(commands=["ls"])
    with pytest.raises(TypeError):
        create_task(environment="minimal", commands="ls")


def _workspace_recorder(bodies: List[Any]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        policy = {"mode": "proxy", "allow": ["pypi"], "deny": []}
        return httpx.Response(201, json={**_workspace_json(body["agent_id"], 1, 0), "network_policy": policy})

    return handler


async def test_create_workspace_sends_the_network_as_a_mode_or_a_policy() -> None:
    bodies: List[Any] = []
    c = _mock(_workspace_recorder(bodies))
    await c.create_workspace("a", "python-dev")
    await c.create_workspace("a", "python-dev", network="egress")
    ws = await c.create_workspace("a", "python-dev", allow=["pypi"])
    await c.create_workspace("a", "python-dev", network="proxy", allow=("pypi", "github.com:22"), deny=["gist.github.com"])
    await c.create_workspace("a", "python-dev", network={"mode": "proxy", "allow": ["npm"]}, deny=["10.0.0.0/8"])
    await c.create_workspace("a", "python-dev", network={"allow": ["debian"]})
    with pytest.raises(TypeError):
        await c.create_workspace("a", "python-dev", allow="pypi")  # type: ignore[arg-type]
    assert [b.get("network") for b in bodies] == [
        None,
        "egress",
        {"allow": ["pypi"]},
        {"mode": "proxy", "allow": ["pypi", "github.com:22"], "deny": ["gist.github.com"]},
        {"mode": "proxy", "allow": ["npm"], "deny": ["10.0.0.0/8"]},
        {"allow": ["debian"]},
    ]
    assert ws.network_policy == {"mode": "proxy", "allow": ["pypi"], "deny": []}
    await c.aclose()

    manager = WorkspaceIsolationManager(client=_mock(_workspace_recorder(bodies)))
    container = await manager.create_workspace("a", "python-dev", network="proxy", allow=["pypi"])
    assert bodies[-1]["network"] == {"mode": "proxy", "allow": ["pypi"]}
    assert container.network_policy == {"mode": "proxy", "allow": ["pypi"], "deny": []}
    await manager.close()


def test_the_sync_client_sends_the_network_too() -> None:
    bodies: List[Any] = []
    with ConductorClient("http://conductor.test", transport=httpx.MockTransport(_workspace_recorder(bodies))) as sync:
        sync.create_workspace("a", "python-dev", allow=["pypi"], deny=["files.pythonhosted.org"])
    assert bodies[-1]["network"] == {"allow": ["pypi"], "deny": ["files.pythonhosted.org"]}


EGRESS_ROW: Dict[str, Any] = {
    "id": 7,
    "at": "2024-05-01T12:34:56.789Z",
    "at_ms": 1714566896789,
    "workspace_id": "ws-1",
    "task_id": None,
    "method": "GET",
    "host": "denied.test",
    "port": 80,
    "resolved": None,
    "decision": "denied",
    "rule": None,
    "reason": "not_allowed",
    "bytes_up": 0,
    "bytes_down": 0,
    "duration_ms": 1,
    "error": None,
}


def _egress_recorder(calls: List[Any]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.raw_path.split(b"?")[0], dict(request.url.params)))
        return httpx.Response(200, json={"events": [EGRESS_ROW]})

    return handler


async def test_egress_asks_for_the_audit_and_returns_its_rows() -> None:
    calls: List[Any] = []
    handler = _egress_recorder(calls)
    c = _mock(handler)
    assert await c.egress("ws-1") == [EGRESS_ROW]
    rows = await c.egress("ws/1", limit=10, decision="denied", after=6, task_id="task-1")
    assert rows[0]["host"] == "denied.test" and rows[0]["reason"] == "not_allowed"
    await c.aclose()
    fake = FakeService()
    fake.add("agent-1")
    manager = WorkspaceIsolationManager(
        client=AsyncConductorClient(
            "http://conductor.test",
            transport=httpx.MockTransport(lambda r: fake.handler(r) if r.url.path == "/workspaces" else handler(r)),
        )
    )
    assert await manager.egress("agent-1", limit=1) == [EGRESS_ROW]
    await manager.close()
    assert calls == [
        ("GET", b"/workspaces/ws-1/egress", {}),
        ("GET", b"/workspaces/ws%2F1/egress", {"limit": "10", "decision": "denied", "after": "6", "task_id": "task-1"}),
        ("GET", b"/workspaces/ws-000000000001/egress", {"limit": "1"}),
    ]


def test_the_sync_client_reads_the_audit_too() -> None:
    calls: List[Any] = []
    with ConductorClient("http://conductor.test", transport=httpx.MockTransport(_egress_recorder(calls))) as sync:
        assert sync.egress("ws-1", decision="allowed") == [EGRESS_ROW]
    assert calls == [("GET", b"/workspaces/ws-1/egress", {"decision": "allowed"})]


def test_create_task_takes_a_network() -> None:
    spec = create_task(environment="python-dev", commands=["pip download requests"], allow=["pypi"])
    assert spec.to_json()["network"] == {"allow": ["pypi"]}
    assert create_task(environment="minimal", commands=["true"], network="isolated").to_json()["network"] == "isolated"
    assert "network" not in create_task(environment="minimal", commands=["true"]).to_json()
    spec = create_task(environment="minimal", commands=["true"], network="proxy", deny=["evil.example.com"])
    assert spec.to_json()["network"] == {"mode": "proxy", "deny": ["evil.example.com"]}
    t = Task.from_dict({"id": "task-1", "status": "succeeded", "egress": {"allowed": 1, "denied": 2, "hosts": []}})
    assert t.egress is not None and t.egress["denied"] == 2


# -- secrets ------------------------------------------------------------------------------

SECRET_VALUE = "ghp_never_comes_back_0123456789"


class FakeSecrets:
    """``/secrets`` in memory, as the service answers it: metadata only, 201 then 200."""

    def __init__(self) -> None:
        self.stored: Dict[str, Dict[str, Any]] = {}
        self.values: Dict[str, str] = {}
        self.calls: List[Any] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, path, body))
        if request.method == "POST" and path == "/secrets":
            if not body["rules"]:
                return httpx.Response(
                    400, json={"error": {"code": "invalid_request", "message": "is empty", "field": "rules"}}
                )
            old = self.stored.get(body["name"])
            version = old["version"] + 1 if old else 1
            self.values[body["name"]] = body["value"]
            self.stored[body["name"]] = {
                "name": body["name"],
                "rules": body["rules"],
                "env_var": body["name"].upper().replace("-", "_") + "_TOKEN",
                "version": version,
                "created_at": old["created_at"] if old else "2024-05-01T12:34:56.789Z",
                "updated_at": "2024-05-01T12:35:00.000Z",
            }
            return httpx.Response(200 if old else 201, json=self.stored[body["name"]])
        if request.method == "POST" and path == "/workspaces":
            return httpx.Response(201, json={**_workspace_json(body["agent_id"], 1, 0), "secrets": body["secrets"]})
        if request.method == "GET" and path == "/secrets":
            return httpx.Response(200, json={"secrets": [self.stored[n] for n in sorted(self.stored)]})
        name = path.removeprefix("/secrets/")
        if name not in self.stored:
            return httpx.Response(
                404, json={"error": {"code": "not_found", "message": f"secret '{name}' not found", "field": None}}
            )
        if request.method == "DELETE":
            del self.stored[name]
            return httpx.Response(204)
        return httpx.Response(200, json=self.stored[name])


async def test_secrets_are_put_listed_and_deleted_without_their_values_coming_back() -> None:
    from conductor import NotFoundError, Secret, basic_rule, header_rule

    fake = FakeSecrets()
    c = _mock(fake.handler)
    rules = [basic_rule("github.com", "x-access-token"), header_rule("api.github.com", "Authorization", "Bearer {value}")]
    s = await c.put_secret("github", SECRET_VALUE, rules)
    assert isinstance(s, Secret)
    assert (s.name, s.version, s.env_var) == ("github", 1, "GITHUB_TOKEN")
    assert s.rules == [
        {"host": "github.com", "inject": {"type": "basic", "username": "x-access-token"}},
        {"host": "api.github.com", "inject": {"type": "header", "name": "Authorization", "value": "Bearer {value}"}},
    ]
    assert fake.calls[-1] == ("POST", "/secrets", {"name": "github", "value": SECRET_VALUE, "rules": rules})
    assert SECRET_VALUE not in repr(s) and SECRET_VALUE not in json.dumps(s.to_dict())

    # Again: a rotation, the next version; bytes are sent as text.
    s = await c.put_secret("github", b"ghp_rotated", rules[:1])
    assert (s.version, s.created_at, len(s.rules)) == (2, "2024-05-01T12:34:56.789Z", 1)
    assert fake.values["github"] == "ghp_rotated"
    await c.put_secret("npm-corp", "npm_tok", (header_rule("npm.corp.example", "Authorization", "Bearer {value}"),))

    listed = await c.list_secrets()
    assert [x.name for x in listed] == ["github", "npm-corp"]
    assert (await c.get_secret("npm-corp")).env_var == "NPM_CORP_TOKEN"
    assert await c.delete_secret("npm-corp") is None
    assert fake.calls[-1] == ("DELETE", "/secrets/npm-corp", None)
    with pytest.raises(NotFoundError):
        await c.delete_secret("npm-corp")
    with pytest.raises(NotFoundError):
        await c.get_secret("a/b")
    assert fake.calls[-1][1] == "/secrets/a%2Fb"
    with pytest.raises(ValidationError) as e:
        await c.put_secret("x", SECRET_VALUE, [])
    assert e.value.field == "rules" and SECRET_VALUE not in str(e.value)
    with pytest.raises(TypeError):
        await c.put_secret("x", 123, rules)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await c.put_secret("x", "v", rules[0])
    await c.aclose()


def test_the_sync_client_manages_secrets_too() -> None:
    from conductor import basic_rule

    fake = FakeSecrets()
    with ConductorClient("http://conductor.test", transport=httpx.MockTransport(fake.handler)) as sync:
        assert sync.put_secret("gitlab", "glpat", [basic_rule("gitlab.com", "oauth2")]).version == 1
        assert sync.put_secret("gitlab", "glpat2", [basic_rule("gitlab.com", "oauth2")]).version == 2
        assert [x.name for x in sync.list_secrets()] == ["gitlab"]
        assert sync.get_secret("gitlab").rules[0]["inject"]["username"] == "oauth2"
        sync.delete_secret("gitlab")
        ws = sync.create_workspace("a", "python-dev", secrets=["github"])
    assert "gitlab" not in fake.stored
    assert ws.secrets == ["github"]


async def test_workspaces_and_tasks_name_their_secrets() -> None:
    bodies: List[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(201, json={**_workspace_json(body["agent_id"], 1, 0), "secrets": body.get("secrets", [])})

    c = _mock(handler)
    ws = await c.create_workspace("a", "python-dev", secrets=["github"])
    assert bodies[-1]["secrets"] == ["github"] and ws.secrets == ["github"]
    ws = await c.create_workspace("a", "python-dev", allow=["pypi"], secrets=("github", "npm-corp"))
    assert bodies[-1] == {
        "agent_id": "a",
        "environment": "python-dev",
        "network": {"allow": ["pypi"]},
        "secrets": ["github", "npm-corp"],
    }
    ws = await c.create_workspace("a", "python-dev")
    assert "secrets" not in bodies[-1] and ws.secrets == []
    with pytest.raises(TypeError):
        await c.create_workspace("a", "python-dev", secrets="github")
    await c.aclose()
    manager = WorkspaceIsolationManager(client=_mock(handler))
    container = await manager.create_workspace("a", "python-dev", secrets=["github"])
    assert bodies[-1]["secrets"] == ["github"]
    assert container.secrets == ["github"] and container.workspace().secrets == ["github"]
    await manager.close()
    assert Workspace.from_dict({**_workspace_json("a", 1, 0)}).secrets == []

    spec = create_task(environment="python-dev", commands=["git clone https://github.com/org/private.git"], secrets=["github"])
    assert spec.to_json()["secrets"] == ["github"]
    assert "secrets" not in create_task(environment="minimal", commands=["true"]).to_json()
    with pytest.raises(TypeError):
        create_task(environment="minimal", commands=["true"], secrets="github")

    tasks: List[Any] = []

    def task_handler(request: httpx.Request) -> httpx.Response:
        tasks.append(json.loads(request.content))
        return httpx.Response(202, json={"id": "task-1", "task_id": "task-1", "status": "queued"})

    c = _mock(task_handler)
    await c.submit_task(spec)
    await c.submit_task({"task_type": "isolated_execution", "environment": "minimal", "commands": ["true"], "secrets": ["x"]})
    await c.aclose()
    assert [t.get("secrets") for t in tasks] == [["github"], ["x"]]


# -- the original WorkspaceIsolationManager's shapes ---------------------------------------


def test_exec_result_is_the_originals_tuple_with_named_fields() -> None:
    body = {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "duration_ms": 12, "timed_out": False, "new": 1}
    r = ExecResult.from_dict(body)
    code, out, err = r
    assert (code, out, err) == (3, "out\n", "err\n")
    assert isinstance(r, tuple) and len(r) == 3 and tuple(r) == (3, "out\n", "err\n")
    assert (r[0], r[1], r[2], r[-1], r[:2]) == (3, "out\n", "err\n", "err\n", (3, "out\n"))
    assert r == (3, "out\n", "err\n") and (3, "out\n", "err\n") == r
    assert hash(r) == hash((3, "out\n", "err\n"))
    assert (r.exit_code, r.returncode, r.stdout, r.stderr, r.duration_ms, r.timed_out, r.ok) == (
        3,
        3,
        "out\n",
        "err\n",
        12,
        False,
        False,
    )
    assert (r["exit_code"], r["stdout"], r["duration_ms"], r.get("timed_out"), r.get("nope", 7)) == (3, "out\n", 12, False, 7)
    with pytest.raises(KeyError):
        r["nope"]
    with pytest.raises(IndexError):
        r[3]
    assert r.to_dict() == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "duration_ms": 12, "timed_out": False}
    # Equal results have equal fields, the ones outside the tuple included.
    assert r == ExecResult(3, "out\n", "err\n", 12) and r != ExecResult(3, "out\n", "err\n", 13)
    assert ExecResult(exit_code=0).ok and ExecResult(0).to_dict()["stdout"] == ""
    with pytest.raises(AttributeError):
        r.exit_code = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(r)) == r and copy.deepcopy(r) == r
    assert repr(r) == "ExecResult(exit_code=3, stdout='out\\n', stderr='err\\n', duration_ms=12, timed_out=False)"


def _exec_recorder(bodies: List[Any]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content)["command"])
        return httpx.Response(200, json={"exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 1})

    return handler


async def test_exec_sends_a_string_as_a_line_and_a_sequence_as_an_argv() -> None:
    bodies: List[Any] = []
    c = _mock(_exec_recorder(bodies))
    await c.exec("ws-1", "echo a && echo b")
    await c.exec("ws-1", ["sh", "-c", "echo one > /workspace/f"])
    await c.exec("ws-1", ("ls", Path("/workspace")))
    with pytest.raises(TypeError):
        await c.exec("ws-1", b"ls")  # type: ignore[arg-type]
    assert bodies == ["echo a && echo b", ["sh", "-c", "echo one > /workspace/f"], ["ls", "/workspace"]]
    await c.aclose()


def test_the_sync_client_sends_an_argv_too() -> None:
    bodies: List[Any] = []
    with ConductorClient("http://conductor.test", transport=httpx.MockTransport(_exec_recorder(bodies))) as sync:
        code, out, err = sync.exec("ws-1", ["true"])
    assert bodies == [["true"]] and (code, out, err) == (0, "", "")


def _workspace_json(agent: str, n: int, created_at: int, state: str = "running") -> Dict[str, Any]:
    return {
        "workspace_id": f"ws-00000000000{n}",
        "id": f"ws-00000000000{n}",
        "agent_id": agent,
        "environment": "minimal",
        "image": "localhost/conductor/minimal:abc",
        "container_name": f"claude-agent-{agent}-0000000{n}",
        "state": state,
        "network": None,
        "limits": {"memory": "2Gi", "cpu": "1.0", "pids": 512, "volume_size": "10Gi"},
        "created_at": created_at,
        "last_used_at": created_at,
        "error": None,
    }


class FakeService:
    """Just enough of the API for the manager: workspaces and snapshots in memory."""

    def __init__(self) -> None:
        self.workspaces: Dict[str, Dict[str, Any]] = {}
        self.snapshots: Dict[str, List[str]] = {}
        self.deleted: List[str] = []
        self.commands: List[Any] = []
        self.now_ms = int(time.time() * 1000)

    def add(self, agent: str, age_hours: float = 0.0) -> Dict[str, Any]:
        w = _workspace_json(agent, len(self.workspaces) + 1, int(self.now_ms - age_hours * 3_600_000))
        self.workspaces[w["id"]] = w
        return w

    def handler(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        method = request.method
        if parts == ["workspaces"] and method == "POST":
            body = json.loads(request.content)
            return httpx.Response(201, json=self.add(body["agent_id"]))
        if parts == ["workspaces"]:
            agent = request.url.params.get("agent_id")
            live = [w for w in self.workspaces.values() if w["state"] == "running" and agent in (None, w["agent_id"])]
            return httpx.Response(200, json={"workspaces": live})
        w = self.workspaces.get(parts[1]) if len(parts) > 1 else None
        if w is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such workspace"}})
        if len(parts) == 2 and method == "GET":
            return httpx.Response(200, json={**w, "usage": {"cpu_percent": 0.5, "memory_bytes": 1024, "pids": 2}})
        if len(parts) == 2 and method == "DELETE":
            self.deleted.append(w["id"])
            w["state"] = "removed"
            return httpx.Response(200, json=w)
        if parts[2] == "exec":
            self.commands.append(json.loads(request.content)["command"])
            return httpx.Response(200, json={"exit_code": 0, "stdout": "hi\n", "stderr": "", "duration_ms": 4})
        names = self.snapshots.setdefault(w["id"], [])
        if parts[2:] == ["snapshots"] and method == "POST":
            body = json.loads(request.content)
            if body["name"] in names and not body["overwrite"]:
                message = f"snapshot '{body['name']}' exists; pass overwrite"
                return httpx.Response(409, json={"error": {"code": "conflict", "message": message}})
            if body["name"] not in names:
                names.append(body["name"])
            return httpx.Response(201, json={"name": body["name"], "workspace_id": w["id"], "size_bytes": 10})
        if parts[2:] == ["snapshots"]:
            return httpx.Response(200, json={"snapshots": [{"name": n, "workspace_id": w["id"]} for n in names]})
        if len(parts) == 5 and parts[4] == "restore":
            if parts[3] not in names:
                return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such snapshot"}})
            return httpx.Response(200, json=w)
        return httpx.Response(500, json={"error": {"code": "internal_error", "message": f"unexpected {request.url}"}})


def _manager(fake: FakeService, config: Any = None) -> WorkspaceIsolationManager:
    client = AsyncConductorClient("http://conductor.test", transport=httpx.MockTransport(fake.handler))
    return WorkspaceIsolationManager(config, client=client)


ORIGINAL_CONFIG: Dict[str, Any] = {
    # The sections and keys the original's configuration has (its own code reads
    # isolated_workspace, podman_config, dev_environments and storage).
    "num_agents": 2,
    "agent_config": {"workspace_isolation": "podman", "startup_delay": 10},
    "container_config": {"runtime": "podman", "image": "ubuntu:22.04", "security_opts": ["no-new-privileges"]},
    "isolated_workspace": {
        "enabled": True,
        "mode": "sandbox",
        "agent_containers": {
            "base_image": "ubuntu:22.04",
            "environments": [{"name": "python-dev", "image": "python:3.11-slim", "volumes": ["source:/workspace/src"]}],
            "capabilities": {"add": [], "drop": ["ALL"]},
            "resources": {"limits": {"memory": "2Gi", "cpu": "1.0"}},
        },
    },
    "podman_config": {
        "socket_path": "/run/user/1000/podman/podman.sock",
        "network": {"mode": "bridge", "name": "claude-dev-net", "subnet": "10.89.0.0/24"},
        "security": {"userns": "keep-id"},
    },
    "storage": {"workspace_path": "~/.claude-conductor/workspace", "isolated_workspaces_path": "~/.claude-conductor/isolated"},
    "network": {"dashboard_port": 8080, "api_port": 8081, "bind_address": "127.0.0.1", "enable_cors": True},
    "features": {"workspace_snapshots": True},
    "dev_environments": {"presets": [{"name": "minimal", "base_image": "alpine:latest"}]},
    "task_execution": {"isolation": {"snapshot_before_task": True, "restore_on_error": True}},
    "container_lifecycle": {"cleanup_policy": {"max_age_hours": 24}},
    "security": {"api_key_required": False},
}


def test_manager_takes_the_originals_configuration() -> None:
    manager = WorkspaceIsolationManager(ORIGINAL_CONFIG)
    assert manager.client.url == "http://127.0.0.1:8081"
    assert manager.config is ORIGINAL_CONFIG
    assert manager.isolated_config["mode"] == "sandbox"
    assert manager.podman_config["network"]["name"] == "claude-dev-net"
    assert manager.workspace_base == Path("~/.claude-conductor/isolated").expanduser()
    assert manager.containers == {}
    assert not manager.workspace_base.exists() or manager.workspace_base.is_dir()  # nothing is made there
    bare = WorkspaceIsolationManager({"storage": {}, "isolated_workspace": None})
    assert bare.workspace_base is None and bare.isolated_config == {}


async def test_manager_returns_the_originals_shapes() -> None:
    fake = FakeService()
    manager = _manager(fake, ORIGINAL_CONFIG)
    ws = await manager.create_workspace("agent_001")
    assert isinstance(ws, WorkspaceContainer) and isinstance(ws, Workspace)
    assert manager.containers["agent_001"] is ws
    assert (ws.container_id, ws.config.name, ws.config.agent_id) == (
        "claude-agent-agent_001-00000001",
        "claude-agent-agent_001-00000001",
        "agent_001",
    )
    assert (ws.status, ws.workspace_path, ws.environment, ws.id, ws.state) == (
        "running",
        "/workspace",
        "minimal",
        "ws-000000000001",
        "running",
    )
    assert isinstance(ws.created_at, datetime) and ws.created_at.tzinfo is None
    assert abs((datetime.now() - ws.created_at).total_seconds()) < 60
    assert ws.created_at_ms == fake.now_ms and ws.workspace().created_at == fake.now_ms
    assert (ws.config.memory_limit, ws.config.cpu_limit, ws.config.capabilities_drop) == ("2Gi", "1.0", ["ALL"])

    code, out, err = await manager.execute_in_workspace("agent_001", ["python", "-c", "print('hi')"])
    assert (code, out, err) == (0, "hi\n", "")
    result = await manager.execute_in_workspace("agent_001", "echo hi")
    assert result[0] == 0 and result.exit_code == 0 and result.duration_ms == 4
    assert fake.commands == [["python", "-c", "print('hi')"], "echo hi"]

    info = manager.get_workspace_info("agent_001")  # synchronous, as the original's
    assert isinstance(info, dict) and info is not None
    assert {"container_id", "agent_id", "status", "created_at", "workspace_path", "image"} <= set(info)
    assert {"memory_limit", "cpu_limit", "stats"} <= set(info)
    assert (info["container_id"], info["agent_id"], info["status"]) == (ws.container_id, "agent_001", "running")
    assert datetime.fromisoformat(info["created_at"]) == ws.created_at
    assert (info["memory_limit"], info["cpu_limit"], info["stats"]["memory_bytes"]) == ("2Gi", "1.0", 1024)
    assert info.id == ws.id and info.created_at == fake.now_ms  # attributes: the client's Workspace
    json.dumps(info)
    assert manager.get_workspace_info("nobody") is None

    listed = await manager.list_workspaces()
    assert [w["container_id"] for w in listed] == [ws.container_id] and listed[0]["stats"]["pids"] == 2
    assert [w.id for w in listed] == [ws.id]
    await manager.close()


async def test_snapshot_names_are_generated_as_the_original_did() -> None:
    fake = FakeService()
    manager = _manager(fake)
    await manager.create_workspace("a1", "minimal")
    first = await manager.create_snapshot("a1")
    assert isinstance(first, str) and re.fullmatch(r"snapshot-\d{8}_\d{6}", first), first
    second = await manager.create_snapshot("a1")  # the same second: a suffix, not a conflict
    third = await manager.create_snapshot("a1", None)
    assert len({first, second, third}) == 3 and second.startswith(first), (first, second, third)
    assert (first.name, first.workspace_id, first.size_bytes, first["size_bytes"]) == (first, "ws-000000000001", 10, 10)
    assert pickle.loads(pickle.dumps(first)) == first and first.to_dict()["name"] == first

    # A given name is returned as given and replaces a snapshot of that name, as before.
    assert await manager.create_snapshot("a1", "after_setup") == "after_setup"
    assert await manager.create_snapshot("a1", "after_setup") == "after_setup"
    with pytest.raises(ConflictError):
        await manager.create_snapshot("a1", "after_setup", overwrite=False)

    restored = await manager.restore_snapshot("a1", "after_setup")
    assert isinstance(restored, WorkspaceContainer) and manager.containers["a1"] == restored
    with pytest.raises(RuntimeError):  # the original raised RuntimeError; ours is NotFoundError too
        await manager.restore_snapshot("a1", "never-taken")
    await manager.close()


async def test_an_agent_without_a_workspace() -> None:
    fake = FakeService()
    manager = _manager(fake)
    with pytest.raises(ValueError) as e:  # as the original
        await manager.execute_in_workspace("nobody", ["true"])
    assert isinstance(e.value, NotFoundError) and isinstance(e.value, NoWorkspaceError)
    assert e.value.field == "agent_id" and "nobody" in e.value.message
    with pytest.raises(ValueError):
        await manager.create_snapshot("nobody")
    with pytest.raises(ValueError):
        await manager.restore_snapshot("nobody", "x")
    assert await manager.cleanup_workspace("nobody") == []  # no error, as the original
    assert manager.get_workspace_info("nobody") is None
    await manager.close()


async def test_cleanup_workspace_forgets_the_agent() -> None:
    fake = FakeService()
    manager = _manager(fake)
    ws = await manager.create_workspace("a1", "minimal")
    removed = await manager.cleanup_workspace("a1", preserve_volumes=True)
    assert [w.id for w in removed] == [ws.id] and "a1" not in manager.containers
    assert manager.get_workspace_info("a1") is None
    await manager.close()


async def test_cleanup_old_containers_removes_only_this_managers_old_workspaces() -> None:
    fake = FakeService()
    manager = _manager(fake)
    old_mine = await manager.create_workspace("mine-old", "minimal")
    fake.workspaces[old_mine.id]["created_at"] = fake.now_ms - 30 * 3_600_000
    manager.containers["mine-old"] = WorkspaceContainer.from_dict(fake.workspaces[old_mine.id])
    new_mine = await manager.create_workspace("mine-new", "minimal")
    old_other = fake.add("other", age_hours=48)  # another client's, as old
    pool = fake.add("warm-pool", age_hours=48)

    removed = await manager.cleanup_old_containers(max_age_hours=24)
    assert [w.id for w in removed] == [old_mine.id] and fake.deleted == [old_mine.id]
    assert set(manager.containers) == {"mine-new"}

    assert await manager.cleanup_old_containers() == []  # the default is 24 hours

    removed = await manager.cleanup_old_containers(max_age_hours=24, all_agents=True)
    assert [w.id for w in removed] == [old_other["id"]]
    assert fake.workspaces[pool["id"]]["state"] == "running"

    removed = await manager.cleanup_old_containers(max_age_hours=0)  # everything of mine is older than now
    assert [w.id for w in removed] == [new_mine.id] and manager.containers == {}
    await manager.close()


def test_workspace_container_takes_the_originals_constructor() -> None:
    config = ContainerConfig(name="claude-agent-a-1", image="alpine:latest", agent_id="a")
    created = datetime(2025, 1, 2, 3, 4, 5)
    w = WorkspaceContainer("c0ffee", config, created, "running", "/tmp/agent_a")
    assert (w.container_id, w.config, w.created_at, w.status, w.workspace_path, w.ports) == (
        "c0ffee",
        config,
        created,
        "running",
        "/tmp/agent_a",
        {},
    )
    assert (w.agent_id, w.container_name, w.image, w.state) == ("a", "claude-agent-a-1", "alpine:latest", "running")
    keywords = WorkspaceContainer(container_id="c0ffee", config=config, created_at=created)
    assert keywords.status == "created" and hash(keywords) == hash(WorkspaceContainer(container_id="c0ffee"))
    assert ContainerConfig(name="n", image="i", agent_id="a").memory_limit == "2g"
