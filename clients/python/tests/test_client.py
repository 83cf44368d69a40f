"""The clients against the real service: workspaces, exec, snapshots, tasks, log
streaming, and errors as typed exceptions carrying the server's code, message and field."""

from __future__ import annotations

import socket
from typing import Any, List

import pytest

from conductor import (
    AsyncConductorClient,
    ConductorClient,
    ConflictError,
    ConnectionFailedError,
    LogChunk,
    LogEnd,
    NotFoundError,
    ValidationError,
)
from conductor.orchestrator import Orchestrator, create_task
from conductor.workspace_isolation import WorkspaceIsolationManager


def test_sync_client_health_and_environments(service: Any) -> None:
    with ConductorClient(service.url) as c:
        assert c.health().status == "ok"
        names = [e.name for e in c.environments()]
    assert {"minimal", "python-dev", "nodejs-dev"} <= set(names), names


async def test_workspace_lifecycle(service: Any, agent_id: str) -> None:
    async with AsyncConductorClient(config=service.config) as c:
        ws = await c.create_workspace(agent_id, "minimal", limits={"memory": "512Mi"}, network="none")
        assert (ws.agent_id, ws.environment, ws.state) == (agent_id, "minimal", "running")
        assert ws.limits.memory == "512Mi" and ws.workspace_id == ws.id

        r = await c.exec(ws.id, "echo out; echo err >&2; pwd; echo $GREETING; exit 7", env={"GREETING": "hi"})
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (7, "out\n/workspace\nhi\n", "err\n", False)
        assert r["exit_code"] == 7 and not r.ok
        assert (await c.exec(ws.id, "pwd", cwd="/tmp")).stdout == "/tmp\n"
        slow = await c.exec(ws.id, "sleep 30", timeout=1)
        assert (slow.exit_code, slow.timed_out) == (124, True)

        [listed] = await c.list_workspaces(agent_id=agent_id)
        assert listed.id == ws.id
        detail = await c.get_workspace(ws.id)
        assert detail.usage is not None and detail.usage.memory_limit_bytes == 512 * 1024 * 1024

        removed = await c.delete_workspace(ws.id, keep_volumes=False)
        assert removed.state == "removed"
        assert await c.list_workspaces(agent_id=agent_id) == []
        with pytest.raises(ConflictError) as e:
            await c.exec(ws.id, "true")
        assert (e.value.status, e.value.code) == (409, "conflict")


async def test_pause_suspend_and_resume(service: Any, agent_id: str) -> None:
    async with AsyncConductorClient(config=service.config) as c:
        ws = await c.create_workspace(agent_id, "minimal", network="none")
        await c.exec(ws.id, "echo kept > /workspace/f; echo root > /home/agent/g")
        assert (await c.pause(ws.id)).state == "paused"
        with pytest.raises(ConflictError) as e:
            await c.pause(ws.id)
        assert "paused" in e.value.message
        # Exec resumes a paused workspace on its own.
        assert (await c.exec(ws.id, "cat /workspace/f")).stdout == "kept\n"
        assert (await c.get_workspace(ws.id)).state == "running"
        assert (await c.suspend(ws.id)).state == "suspended"
        assert (await c.resume(ws.id)).state == "running"
        assert (await c.exec(ws.id, "cat /workspace/f /home/agent/g")).stdout == "kept\nroot\n"
        # A stopped workspace stays stopped until started.
        assert (await c.stop(ws.id)).state == "stopped"
        with pytest.raises(ConflictError):
            await c.exec(ws.id, "true")
        assert (await c.start(ws.id)).state == "running"
        await c.delete_workspace(ws.id, keep_volumes=False)


async def test_secrets_are_write_only_and_workspaces_get_placeholders(service: Any, agent_id: str) -> None:
    from conductor import basic_rule, header_rule

    value = "tok_" + agent_id.replace("-", "_") + "_never_shown"
    name = "py" + agent_id.replace("-", "")[-20:]
    async with AsyncConductorClient(config=service.config) as c:
        rules = [header_rule("api.example.com", "Authorization", "Bearer {value}"), basic_rule("git.example.com", "git")]
        s = await c.put_secret(name, value, rules)
        assert (s.name, s.version, s.rules) == (name, 1, rules)
        assert (await c.put_secret(name, value + "2", rules)).version == 2
        assert name in [x.name for x in await c.list_secrets()]
        with pytest.raises(ValidationError) as e:
            await c.put_secret(name, value + "\nline", rules)
        assert e.value.field == "value" and value not in str(e.value)
        with pytest.raises(ValidationError) as e:
            await c.put_secret(name, value, [basic_rule("a..b.example", "git")])
        assert e.value.field == "rules[0].host"

        ws = await c.create_workspace(agent_id, "minimal", secrets=[name])
        try:
            assert ws.secrets == [name] and ws.network_policy is not None
            assert ws.network_policy["mode"] == "proxy"
            r = await c.exec(ws.id, f"printenv {s.env_var}")
            assert r.stdout.startswith(f"conductor-secret-{name}-") and value not in r.stdout
            assert (await c.get_workspace(ws.id)).secrets == [name]
        finally:
            await c.delete_workspace(ws.id, keep_volumes=False)
        with pytest.raises(ValidationError) as e:
            await c.create_workspace(agent_id, "minimal", secrets=["no-such-secret"])
        assert e.value.field == "secrets[0]"
        await c.delete_secret(name)
        with pytest.raises(NotFoundError):
            await c.get_secret(name)


async def test_proxy_mode_audits_a_denied_request(service: Any, agent_id: str) -> None:
    # Nothing outside is contacted: the proxy refuses a name that is not allowed before
    # resolving it.
    async with AsyncConductorClient(service.url) as c:
        ws = await c.create_workspace(agent_id, "python-dev", allow=["pypi"])
        assert ws.network_policy is not None and ws.network_policy["mode"] == "proxy", ws.network_policy
        assert ws.network_policy["allow"] == ["pypi"]
        script = (
            "import urllib.request, urllib.error\n"
            "try:\n"
            "    urllib.request.urlopen('http://denied.test/', timeout=30)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
        )
        r = await c.exec(ws.id, ["python3", "-c", script], timeout=60)
        assert (r.exit_code, r.stdout) == (0, "403\n"), r

        rows = await c.egress(ws.id, decision="denied")
        denied = [row for row in rows if row["host"] == "denied.test"]
        assert denied, rows
        row = denied[-1]
        assert (row["decision"], row["reason"], row["port"], row["method"]) == ("denied", "not_allowed", 80, "GET"), row
        assert row["workspace_id"] == ws.id and row["resolved"] is None
        assert await c.egress(ws.id, decision="allowed") == []
        assert await c.egress(ws.id, after=row["id"]) == []
        await c.delete_workspace(ws.id, keep_volumes=False)
        # The audit outlives the workspace.
        assert [x["id"] for x in await c.egress(ws.id, limit=1)] == [rows[-1]["id"]]


async def test_exec_takes_a_line_or_an_argv(service: Any, agent_id: str) -> None:
    async with AsyncConductorClient(service.url) as c:
        ws = await c.create_workspace(agent_id, "minimal")
        line = await c.exec(ws.id, "printf '%s|' $((1+2)) 'a b' | tr a-z A-Z")  # a str: the shell runs it
        assert (line.exit_code, line.stdout) == (0, "3|A B|"), line
        argv = await c.exec(ws.id, ["printf", "%s|", "$((1+2))", "a b", "*"])  # a list: no shell
        assert tuple(argv) == (0, "$((1+2))|a b|*|", "")
        code, out, _ = await c.exec(ws.id, ("pwd",), cwd="/tmp")
        assert (code, out) == (0, "/tmp\n")
        assert (await c.exec(ws.id, ["sh", "-c", "exit 5"]))[0] == 5

        with pytest.raises(ValidationError) as empty:
            await c.exec(ws.id, [])
        assert empty.value.field == "command", empty.value
        with pytest.raises(ValidationError) as not_a_string:
            await c.exec(ws.id, ["echo", 1])  # type: ignore[list-item]
        assert not_a_string.value.field == "command[1]", not_a_string.value
        await c.delete_workspace(ws.id, keep_volumes=False)


async def test_api_errors_are_typed(service: Any, agent_id: str) -> None:
    async with AsyncConductorClient(service.url) as c:
        with pytest.raises(NotFoundError) as nf:
            await c.get_workspace("ws-000000000000")
        assert (nf.value.status, nf.value.code) == (404, "not_found")
        assert "ws-000000000000" in nf.value.message

        with pytest.raises(ValidationError) as bad_agent:
            await c.create_workspace("Not An Agent", "minimal")
        assert (bad_agent.value.code, bad_agent.value.field) == ("invalid_request", "agent_id")

        with pytest.raises(ValidationError) as bad_env:
            await c.submit_tasks(
                [
                    create_task(environment="minimal", commands=["true"]),
                    create_task(environment="minimal", commands=["true", ""]),
                ]
            )
        assert bad_env.value.field == "tasks[1].commands[1]", bad_env.value

        ws = await c.create_workspace(agent_id, "minimal")
        with pytest.raises(ValidationError) as bad_var:
            await c.exec(ws.id, "true", env={"BAD-NAME": "x"})
        assert bad_var.value.field == "env.BAD-NAME"
        await c.create_snapshot(ws.id, "one")
        with pytest.raises(ConflictError) as dup:
            await c.create_snapshot(ws.id, "one")
        assert "overwrite" in dup.value.message
        assert (await c.create_snapshot(ws.id, "one", overwrite=True)).name == "one"
        with pytest.raises(NotFoundError):
            await c.restore_snapshot(ws.id, "never-taken")
        await c.delete_snapshot(ws.id, "one")
        assert await c.list_snapshots(ws.id) == []


async def test_fork_copies_a_workspace(service: Any, agent_id: str) -> None:
    async with AsyncConductorClient(config=service.config) as c:
        ws = await c.create_workspace(agent_id, "minimal")
        await c.exec(ws.id, "echo original > /workspace/f && echo home > /home/agent/h")
        fork = await c.fork(ws.id, 2, env={"FORKED": "yes"}, limits={"memory": "256Mi"})
        assert fork.source_id == ws.id and fork.snapshot is None
        assert fork.paused_ms is not None and fork.took_ms > 0
        assert len(fork.workspaces) == 2 and len({f.id for f in fork.workspaces}) == 2
        for f in fork.workspaces:
            assert (f.state, f.agent_id, f.environment) == ("running", agent_id, "minimal")
            assert f.id != ws.id and f.limits.memory == "256Mi"
            r = await c.exec(f.id, "cat /workspace/f /home/agent/h; echo $FORKED $CONDUCTOR_WORKSPACE_ID")
            assert r.stdout == f"original\nhome\nyes {f.id}\n", r
        await c.exec(fork.workspaces[0].id, "echo changed > /workspace/f")
        assert (await c.exec(ws.id, "cat /workspace/f")).stdout == "original\n"
        assert (await c.exec(fork.workspaces[1].id, "cat /workspace/f")).stdout == "original\n"

        await c.create_snapshot(ws.id, "base")
        await c.exec(ws.id, "echo later > /workspace/f")
        [from_snap] = (await c.fork(ws.id, snapshot="base", agent_id=f"{agent_id}-b")).workspaces
        assert from_snap.agent_id == f"{agent_id}-b"
        assert (await c.exec(from_snap.id, "cat /workspace/f")).stdout == "original\n"

        with pytest.raises(ValidationError) as zero:
            await c.fork(ws.id, 0)
        assert zero.value.field == "count"
        with pytest.raises(ValidationError) as unknown:
            await c.fork(ws.id, snapshot="never-taken")
        assert unknown.value.field == "snapshot"
        for f in [*fork.workspaces, from_snap]:
            await c.delete_workspace(f.id)


async def test_unreachable_service_is_a_connection_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncConductorClient(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(ConnectionFailedError) as e:
            await c.health()
    assert e.value.code == "connection_failed" and "conductor serve" in e.value.message


async def test_manager_drives_an_agents_workspace(service: Any, agent_id: str) -> None:
    async with WorkspaceIsolationManager(service.config) as manager:
        with pytest.raises(NotFoundError) as none_yet:
            await manager.execute_in_workspace(agent_id, "true")
        assert none_yet.value.field == "agent_id"

        ws = await manager.create_workspace(agent_id, "minimal")
        result = await manager.execute_in_workspace(agent_id, "echo hello; echo warn >&2; exit 2")
        assert (result["exit_code"], result["stdout"], result["stderr"]) == (2, "hello\n", "warn\n")
        assert ws.id in [w.id for w in await manager.list_workspaces()]
        assert [w.id for w in await manager.list_workspaces(agent_id)] == [ws.id]

        # A second manager finds the workspace by agent id alone.
        other = WorkspaceIsolationManager(service.config)
        assert await other.workspace_id(agent_id) == ws.id
        await other.close()

        removed = await manager.cleanup_workspace(agent_id, preserve_volumes=False)
        assert [w.id for w in removed] == [ws.id] and removed[0].state == "removed"
        assert await manager.list_workspaces(agent_id) == []
        assert await manager.cleanup_workspace(agent_id) == []  # nothing left: no error


async def test_task_logs_stream_until_the_end(service: Any) -> None:
    orch = Orchestrator(url=service.url)
    [task] = await orch.submit(
        [
            create_task(
                environment="minimal",
                description="log streaming",
                commands=["for i in 1 2 3; do echo line-$i; sleep 0.3; done", "echo oops >&2"],
            )
        ]
    )
    events: List[Any] = [e async for e in orch.logs(task.id)]
    assert isinstance(events[-1], LogEnd) and events[-1].status == "succeeded", events
    chunks = [e for e in events[:-1] if isinstance(e, LogChunk)]
    stdout = "".join(c.data for c in chunks if c.stream == "stdout")
    assert "line-1\nline-2\nline-3\n" in stdout, chunks
    assert "oops" in "".join(c.data for c in chunks if c.stream == "stderr")
    assert [c.seq for c in chunks] == sorted(c.seq for c in chunks)

    # Resuming after a sequence number skips what was seen.
    later = [e async for e in orch.client.follow_logs(task.id, after_seq=chunks[0].seq)]
    assert len(later) == len(events) - 1

    done = await orch.wait(task.id)
    assert done.status == "succeeded" and [c.exit_code for c in done.commands if c.phase == "main"] == [0, 0]
    assert "line-3" in await orch.client.task_logs(task.id)
    await orch.close()


def test_sync_client_tasks_and_cancel(service: Any) -> None:
    with ConductorClient(service.url) as c:
        task = c.submit_task(create_task(environment="minimal", commands=["echo started", "sleep 120"]))
        assert task.status in ("queued", "running")
        for event in c.follow_logs(task.id):
            if isinstance(event, LogChunk) and "started" in event.data:
                break
        cancelled = c.cancel_task(task.id)
        assert cancelled.status == "cancelled", cancelled
        with pytest.raises(ConflictError):
            c.cancel_task(task.id)
        page = c.list_tasks(status="cancelled")
        assert task.id in [t.id for t in page.tasks]
        finished = c.submit_task(create_task(environment="minimal", commands=["exit 3"]), wait=True)
        assert (finished.status, finished.exit_code) == ("failed", 3)


async def test_execute_parallel_tasks_returns_every_result_in_order(service: Any) -> None:
    orch = Orchestrator(service.config)
    specs = [
        create_task(environment="minimal", commands=[f"sleep 1; echo task-{i}"], priority=5) for i in range(3)
    ] + [{"task_type": "isolated_execution", "environment": "minimal", "commands": ["false"]}]
    results = await orch.execute_parallel_tasks(specs)
    assert [t.status for t in results] == ["succeeded"] * 3 + ["failed"]
    assert [t.commands[0].stdout for t in results[:3]] == [f"task-{i}\n" for i in range(3)]
    assert results[3].exit_code == 1
    assert await orch.execute_parallel_tasks([]) == []
    await orch.close()
