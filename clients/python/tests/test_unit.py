"""Pieces that need no service: address and token resolution, the mapping of error
responses to exceptions, SSE parsing and reconnection (over httpx's mock transport), the
models and create_task."""

from __future__ import annotations

import json
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
    LogChunk,
    LogEnd,
    NotFoundError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    Task,
    ValidationError,
    Workspace,
)
from conductor.orchestrator import create_task
from conductor.settings import DEFAULT_URL, resolve


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
