"""End-to-end tests of conductor's E2B-compatible API with the official Python SDK.

The SDK (``e2b==2.63.0``, unmodified) is used only through its public API and configured
only through ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY`` (see conftest.py), as
a user of E2B would. Most command and file tests share one ``python-dev`` sandbox; the
tests that kill a sandbox or let it expire make their own.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from typing import Callable, List, Optional, Tuple

import pytest

from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

from conductor_service import Service, list_workspaces

WORKSPACE = "/workspace"


# ---------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------


def tag() -> str:
    return uuid.uuid4().hex[:10]


def list_all(query: Optional[SandboxQuery] = None, **opts) -> list:
    """Every sandbox ``Sandbox.list`` yields, all pages."""
    paginator = Sandbox.list(query=query, **opts)
    items: list = []
    for _ in range(50):
        if not paginator.has_next:
            return items
        items.extend(paginator.next_items())
    pytest.fail("Sandbox.list kept announcing another page after 50 pages")


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def native_ids(service: Service, agent_id: Optional[str] = None) -> List[str]:
    return [w["id"] for w in list_workspaces(service, agent_id)]


@pytest.fixture(scope="module")
def sandbox(service: Service, sdk_logger) -> Sandbox:
    """The sandbox most command and file tests share."""
    sbx = Sandbox.create(
        "python-dev",
        timeout=900,
        metadata={"suite": "e2b-py", "fixture": "shared"},
        logger=sdk_logger,
    )
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


@pytest.fixture
def workdir(sandbox: Sandbox) -> str:
    """A fresh directory of this test in the shared sandbox."""
    path = f"{WORKSPACE}/t-{tag()}"
    assert sandbox.files.make_dir(path) is True
    return path


# ---------------------------------------------------------------------------------------
# Sandbox creation, info, list, connect, timeout, kill
# ---------------------------------------------------------------------------------------


def test_create_with_envs_and_metadata(service: Service, sdk_logger) -> None:
    case = tag()
    metadata = {"suite": "e2b-py", "case": case}
    sbx = Sandbox.create(
        "python-dev",
        envs={"E2B_PY_X": "from-create", "E2B_PY_SPACED": "two words"},
        metadata=metadata,
        timeout=300,
        logger=sdk_logger,
    )
    try:
        assert sbx.sandbox_id
        r = sbx.commands.run('echo $E2B_PY_X; echo "$E2B_PY_SPACED"')
        assert r.exit_code == 0
        assert r.stdout == "from-create\ntwo words\n"

        # Per-command envs add to (and may override) the sandbox's.
        r = sbx.commands.run('echo "$E2B_PY_X/$E2B_PY_Y"', envs={"E2B_PY_Y": "cmd"})
        assert r.stdout == "from-create/cmd\n"
        r = sbx.commands.run("echo $E2B_PY_X", envs={"E2B_PY_X": "overridden"})
        assert r.stdout == "overridden\n"

        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.metadata == metadata
        assert info.state == SandboxState.RUNNING
        assert "python-dev" in (info.template_id, info.name)
        assert info.end_at > info.started_at

        # The class method says the same.
        assert Sandbox.get_info(sbx.sandbox_id).metadata == metadata

        listed = {s.sandbox_id: s for s in list_all()}
        assert sbx.sandbox_id in listed
        assert listed[sbx.sandbox_id].metadata == metadata
    finally:
        sbx.kill()


def test_default_template_is_python_dev(service: Service, sdk_logger) -> None:
    with Sandbox.create(timeout=120, logger=sdk_logger) as sbx:
        r = sbx.commands.run("python3 -c 'print(6 * 7)'")
        assert r.stdout == "42\n"
        (w,) = [w for w in list_workspaces(service) if w["id"] == sbx.sandbox_id]
        assert w["environment"] == "python-dev"
    # __exit__ killed it.
    assert sbx.sandbox_id not in native_ids(service)


def test_sandbox_is_a_native_workspace(service: Service, sandbox: Sandbox) -> None:
    workspaces = {w["id"]: w for w in list_workspaces(service, agent_id="e2b")}
    assert sandbox.sandbox_id in workspaces, f"{sandbox.sandbox_id} not in {sorted(workspaces)}"
    w = workspaces[sandbox.sandbox_id]
    assert w["agent_id"] == "e2b"
    assert w["environment"] == "python-dev"
    assert w["state"] == "running"


@pytest.fixture(scope="module")
def second_sandbox(service: Service, sdk_logger) -> Sandbox:
    """A second sandbox (another template, other metadata), for the listing tests."""
    sbx = Sandbox.create(
        "minimal",
        timeout=900,
        metadata={"suite": "e2b-py", "fixture": "second", "case": tag()},
        logger=sdk_logger,
    )
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


def test_list_with_metadata_filter(sandbox: Sandbox, second_sandbox: Sandbox) -> None:
    ids = [s.sandbox_id for s in list_all()]
    assert sandbox.sandbox_id in ids
    assert second_sandbox.sandbox_id in ids

    case = second_sandbox.get_info().metadata["case"]
    only_second = list_all(SandboxQuery(metadata={"case": case}))
    assert [s.sandbox_id for s in only_second] == [second_sandbox.sandbox_id]
    assert only_second[0].metadata == {"suite": "e2b-py", "fixture": "second", "case": case}

    only_shared = list_all(SandboxQuery(metadata={"fixture": "shared"}))
    assert [s.sandbox_id for s in only_shared] == [sandbox.sandbox_id]

    # Every pair must match.
    both = list_all(SandboxQuery(metadata={"suite": "e2b-py", "case": case}))
    assert [s.sandbox_id for s in both] == [second_sandbox.sandbox_id]
    assert list_all(SandboxQuery(metadata={"suite": "e2b-py", "case": "no-such-" + case})) == []


def test_list_by_state(sandbox: Sandbox, second_sandbox: Sandbox) -> None:
    running = [s.sandbox_id for s in list_all(SandboxQuery(state=[SandboxState.RUNNING]))]
    assert {sandbox.sandbox_id, second_sandbox.sandbox_id} <= set(running)
    assert list_all(SandboxQuery(state=[SandboxState.PAUSED])) == []


def test_list_by_template(sandbox: Sandbox, second_sandbox: Sandbox) -> None:
    minimal = [s.sandbox_id for s in list_all(SandboxQuery(template="minimal", metadata={"suite": "e2b-py"}))]
    assert minimal == [second_sandbox.sandbox_id]
    python = [s.sandbox_id for s in list_all(SandboxQuery(template="python-dev", metadata={"suite": "e2b-py"}))]
    assert sandbox.sandbox_id in python
    assert second_sandbox.sandbox_id not in python


def test_list_pagination(sandbox: Sandbox, second_sandbox: Sandbox) -> None:
    # Pages of one: the paginator walks both with the x-next-token header.
    paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b-py"}), limit=1)
    pages = []
    while paginator.has_next and len(pages) < 20:
        pages.append([s.sandbox_id for s in paginator.next_items()])
    assert all(len(p) <= 1 for p in pages), pages
    paged = [i for p in pages for i in p]
    assert len(paged) == len(set(paged)), pages
    assert {sandbox.sandbox_id, second_sandbox.sandbox_id} <= set(paged), pages


def test_connect_by_id(sandbox: Sandbox) -> None:
    marker = f"connected-{tag()}"
    sandbox.files.write(f"{WORKSPACE}/connect-marker.txt", marker)
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.sandbox_id == sandbox.sandbox_id
    assert again.is_running() is True
    r = again.commands.run("cat /workspace/connect-marker.txt")
    assert r.stdout == marker
    assert again.files.read("connect-marker.txt") == marker


def test_connect_to_unknown_sandbox() -> None:
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(f"ws-{tag()}00")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(f"ws-{tag()}00")
    assert Sandbox.kill(f"ws-{tag()}00") is False


def test_set_timeout_removes_the_sandbox(service: Service, sdk_logger) -> None:
    sbx = Sandbox.create("minimal", timeout=300, logger=sdk_logger)
    sandbox_id = sbx.sandbox_id
    try:
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        sbx.set_timeout(3)
        start = time.monotonic()

        def gone() -> bool:
            try:
                Sandbox.get_info(sandbox_id)
                return False
            except SandboxNotFoundException:
                return True

        assert wait_for(gone, 20.0), "the sandbox still exists 20 s after set_timeout(3)"
        elapsed = time.monotonic() - start
        assert elapsed >= 2.0, f"removed {elapsed:.1f} s after set_timeout(3)"
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(sandbox_id)
        # The workspace itself goes too (it may be `removing` for a moment).
        assert wait_for(lambda: sandbox_id not in native_ids(service), max(1.0, 20.0 - elapsed)), (
            f"{sandbox_id} is still a conductor workspace 20 s after set_timeout(3)"
        )
        assert sandbox_id not in [s.sandbox_id for s in list_all()]
    finally:
        Sandbox.kill(sandbox_id)


def test_create_timeout_expires(service: Service, sdk_logger) -> None:
    sbx = Sandbox.create("minimal", timeout=3, logger=sdk_logger)
    sandbox_id = sbx.sandbox_id
    try:
        start = time.monotonic()
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert wait_for(lambda: sandbox_id not in native_ids(service), 20.0), (
            "the sandbox created with timeout=3 still exists 20 s later"
        )
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sandbox_id)
        assert time.monotonic() - start >= 1.5
    finally:
        Sandbox.kill(sandbox_id)


def test_set_timeout_extends(service: Service, sdk_logger) -> None:
    from datetime import datetime, timezone

    sbx = Sandbox.create("minimal", timeout=3, logger=sdk_logger)
    try:
        sbx.set_timeout(120)
        end_at = sbx.get_info().end_at
        left = (end_at - datetime.now(timezone.utc)).total_seconds()
        assert 100 <= left <= 130, f"end_at {end_at} is {left:.0f} s away after set_timeout(120)"
        time.sleep(5)
        assert sbx.get_info().state == SandboxState.RUNNING
        assert sbx.commands.run("echo extended").stdout == "extended\n"
    finally:
        sbx.kill()


def test_kill(service: Service, sdk_logger) -> None:
    sbx = Sandbox.create("minimal", timeout=300, logger=sdk_logger)
    sandbox_id = sbx.sandbox_id
    assert sandbox_id in [s.sandbox_id for s in list_all()]
    assert sbx.kill() is True
    assert sandbox_id not in [s.sandbox_id for s in list_all()]
    assert sandbox_id not in native_ids(service)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox_id)
    # Killing it again: the SDK reports "not found" as False.
    assert Sandbox.kill(sandbox_id) is False


def test_commands_of_a_killed_sandbox_raise(service: Service, sdk_logger) -> None:
    sbx = Sandbox.create("minimal", timeout=300, logger=sdk_logger)
    sbx.kill()
    # E2B answers envd requests of a sandbox that is gone with a 502 "... was not found",
    # which the SDK maps to SandboxNotRunningException.
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true", timeout=10)
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/workspace/anything")
    assert sbx.is_running() is False


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def test_run_stdout_stderr_exit_code(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out\nno newline"
    assert r.stderr == "err\n"
    assert r.error in (None, "")


def test_nonzero_exit_raises_command_exit_exception(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo partial; echo boom >&2; exit 3")
    e = ei.value
    assert isinstance(e, SandboxException)
    assert e.exit_code == 3
    assert e.stdout == "partial\n"
    assert e.stderr == "boom\n"


def test_default_cwd_and_user(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("pwd; id -u")
    assert r.stdout == f"{WORKSPACE}\n1000\n"


def test_cwd(sandbox: Sandbox, workdir: str) -> None:
    assert sandbox.commands.run("pwd", cwd=workdir).stdout == f"{workdir}\n"
    sandbox.commands.run("echo here > cwd-file.txt", cwd=workdir)
    assert sandbox.files.read(f"{workdir}/cwd-file.txt") == "here\n"


def test_envs(sandbox: Sandbox) -> None:
    r = sandbox.commands.run('echo "$E2B_A|$E2B_B"', envs={"E2B_A": "1", "E2B_B": "x y;$z"})
    assert r.stdout == "1|x y;$z\n"


def test_user_root_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("id -u", user="root")


def test_timeout_raises_timeout_exception(sandbox: Sandbox) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"the 2 s timeout took {elapsed:.1f} s"
    # The sandbox is still fine afterwards.
    assert sandbox.commands.run("echo still here").stdout == "still here\n"


def test_on_stdout_streams_while_running(sandbox: Sandbox) -> None:
    events: List[Tuple[float, str]] = []
    errors: List[str] = []
    start = time.monotonic()
    r = sandbox.commands.run(
        "for i in 1 2 3 4; do echo line$i; echo err$i >&2; sleep 0.7; done",
        on_stdout=lambda s: events.append((time.monotonic(), s)),
        on_stderr=errors.append,
    )
    end = time.monotonic()
    assert "".join(s for _, s in events) == "line1\nline2\nline3\nline4\n"
    assert "".join(errors) == "err1\nerr2\nerr3\nerr4\n"
    assert r.stdout == "line1\nline2\nline3\nline4\n"
    assert end - start >= 2.5
    first = events[0][0]
    assert first < end - 1.5, (
        f"first stdout callback {first - start:.2f} s after start, command ended after {end - start:.2f} s: "
        "the output was not streamed"
    )


def test_large_output(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' a; echo; head -c 100000 /dev/zero | tr '\\0' e >&2")
    assert r.stdout == "a" * 3_000_000 + "\n"
    assert r.stderr == "e" * 100_000
    # Multi-byte characters survive however the stream is cut.
    r = sandbox.commands.run("python3 -c \"import sys; sys.stdout.write('é€😀' * 100000)\"")
    assert r.stdout == "é€😀" * 100000


def test_concurrent_commands(sandbox: Sandbox) -> None:
    start = time.monotonic()
    handles = [sandbox.commands.run(f"sleep 1.5; echo {i}", background=True) for i in range(4)]
    assert len({h.pid for h in handles}) == 4
    results = [h.wait() for h in handles]
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"4 background sleeps of 1.5 s took {elapsed:.1f} s: they did not run concurrently"


def test_background_then_wait(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("echo started; sleep 1; echo done", background=True)
    assert isinstance(handle.pid, int) and handle.pid > 0
    r = handle.wait()
    assert r.exit_code == 0
    assert r.stdout == "started\ndone\n"


def test_background_kill(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 300", background=True)
    pid = handle.pid
    procs = sandbox.commands.list()
    assert pid in [p.pid for p in procs]
    (p,) = [p for p in procs if p.pid == pid]
    assert "sleep 300" in " ".join([p.cmd, *p.args])

    assert handle.kill() is True
    with pytest.raises(CommandExitException) as ei:
        handle.wait()
    assert ei.value.exit_code != 0
    assert wait_for(lambda: pid not in [p.pid for p in sandbox.commands.list()], 10.0)
    # Gone: killing it again is "not found".
    assert sandbox.commands.kill(pid) is False


def test_commands_list_shows_config(sandbox: Sandbox, workdir: str) -> None:
    handle = sandbox.commands.run("sleep 300", background=True, cwd=workdir, envs={"E2B_LISTED": "yes"})
    try:
        (p,) = [p for p in sandbox.commands.list() if p.pid == handle.pid]
        assert p.cwd == workdir
        assert p.envs.get("E2B_LISTED") == "yes"
    finally:
        handle.kill()


def test_connect_to_running_command(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 2; echo finished", background=True)
    handle.disconnect()
    again = sandbox.commands.connect(handle.pid)
    r = again.wait()
    assert r.stdout == "finished\n"


def test_stdin(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=30)
    sandbox.commands.send_stdin(handle.pid, "hello\n")
    handle.send_stdin(b"world\n")
    sandbox.commands.close_stdin(handle.pid)
    r = handle.wait()
    assert r.exit_code == 0
    assert r.stdout == "hello\nworld\n"


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def test_write_and_read_text(sandbox: Sandbox, workdir: str) -> None:
    path = f"{workdir}/hello.txt"
    info = sandbox.files.write(path, "héllo wörld\n")
    assert info.path == path
    assert info.name == "hello.txt"
    assert sandbox.files.read(path) == "héllo wörld\n"
    # Commands see the same file.
    assert sandbox.commands.run(f"cat {path}").stdout == "héllo wörld\n"
    # Overwrite.
    sandbox.files.write(path, "second")
    assert sandbox.files.read(path) == "second"


def test_relative_paths_resolve_against_workspace(sandbox: Sandbox) -> None:
    name = f"rel-{tag()}.txt"
    info = sandbox.files.write(name, "relative")
    assert info.path == f"{WORKSPACE}/{name}"
    assert sandbox.files.read(f"{WORKSPACE}/{name}") == "relative"
    assert sandbox.commands.run(f"cat {name}").stdout == "relative"


def test_write_creates_parent_directories(sandbox: Sandbox, workdir: str) -> None:
    path = f"{workdir}/x/y/z.txt"
    sandbox.files.write(path, "deep")
    assert sandbox.files.read(path) == "deep"
    assert sandbox.files.get_info(f"{workdir}/x/y").type == FileType.DIR


def test_bytes(sandbox: Sandbox, workdir: str) -> None:
    data = bytes(range(256)) * 64
    path = f"{workdir}/blob.bin"
    sandbox.files.write(path, data)
    got = sandbox.files.read(path, format="bytes")
    assert isinstance(got, bytearray)
    assert bytes(got) == data
    with sandbox.files.read(path, format="stream") as stream:
        assert b"".join(stream) == data


def test_write_from_file_object(sandbox: Sandbox, workdir: str) -> None:
    # A file-like object is streamed (application/octet-stream upload).
    data = os.urandom(1024 * 1024 + 17)
    path = f"{workdir}/streamed.bin"
    sandbox.files.write(path, io.BytesIO(data))
    assert bytes(sandbox.files.read(path, format="bytes")) == data


def test_write_files(sandbox: Sandbox, workdir: str) -> None:
    infos = sandbox.files.write_files(
        [
            {"path": f"{workdir}/one.txt", "data": "1"},
            {"path": f"{workdir}/sub/two.txt", "data": b"2"},
        ]
    )
    assert sorted(i.path for i in infos) == [f"{workdir}/one.txt", f"{workdir}/sub/two.txt"]
    assert sandbox.files.read(f"{workdir}/one.txt") == "1"
    assert sandbox.files.read(f"{workdir}/sub/two.txt") == "2"


def test_list_exists_make_dir_get_info(sandbox: Sandbox, workdir: str) -> None:
    assert sandbox.files.make_dir(f"{workdir}/a/b") is True
    assert sandbox.files.make_dir(f"{workdir}/a/b") is False  # already there
    sandbox.files.write(f"{workdir}/a/f.txt", "12345")

    entries = {e.name: e for e in sandbox.files.list(f"{workdir}/a")}
    assert set(entries) == {"b", "f.txt"}
    assert entries["b"].type == FileType.DIR
    assert entries["b"].path == f"{workdir}/a/b"
    assert entries["f.txt"].type == FileType.FILE
    assert entries["f.txt"].size == 5
    assert entries["f.txt"].path == f"{workdir}/a/f.txt"

    deep = {e.path for e in sandbox.files.list(workdir, depth=2)}
    assert {f"{workdir}/a", f"{workdir}/a/b", f"{workdir}/a/f.txt"} <= deep

    assert sandbox.files.exists(f"{workdir}/a/f.txt") is True
    assert sandbox.files.exists(f"{workdir}/a/b") is True
    assert sandbox.files.exists(f"{workdir}/a/missing") is False

    info = sandbox.files.get_info(f"{workdir}/a/f.txt")
    assert info.type == FileType.FILE and info.size == 5 and info.name == "f.txt"


def test_rename(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/old.txt", "moved")
    info = sandbox.files.rename(f"{workdir}/old.txt", f"{workdir}/new.txt")
    assert info.path == f"{workdir}/new.txt"
    assert info.name == "new.txt"
    assert sandbox.files.exists(f"{workdir}/old.txt") is False
    assert sandbox.files.read(f"{workdir}/new.txt") == "moved"


def test_remove(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/gone.txt", "x")
    sandbox.files.remove(f"{workdir}/gone.txt")
    assert sandbox.files.exists(f"{workdir}/gone.txt") is False

    sandbox.files.write(f"{workdir}/dir/inner/file.txt", "x")
    sandbox.files.remove(f"{workdir}/dir")
    assert sandbox.files.exists(f"{workdir}/dir") is False


def test_50_mb_round_trip(sandbox: Sandbox, workdir: str) -> None:
    data = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"{workdir}/big.bin"
    sandbox.files.write(path, data, request_timeout=120)
    r = sandbox.commands.run(f"sha256sum {path}; stat -c %s {path}")
    assert r.stdout.split() == [digest, path, str(len(data))]
    got = sandbox.files.read(path, format="bytes", request_timeout=120)
    assert len(got) == len(data)
    assert hashlib.sha256(got).hexdigest() == digest


def test_watch_dir(sandbox: Sandbox, workdir: str) -> None:
    watched = f"{workdir}/watched"
    sandbox.files.make_dir(watched)
    handle = sandbox.files.watch_dir(watched)
    try:
        sandbox.files.write(f"{watched}/new.txt", "event")
        seen: list = []

        def arrived() -> bool:
            seen.extend(handle.get_new_events())
            return any(
                e.name == "new.txt" and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in seen
            )

        assert wait_for(arrived, 10.0), f"no create/write event for new.txt, got {seen}"
    finally:
        handle.stop()


def test_watch_dir_recursive(sandbox: Sandbox, workdir: str) -> None:
    watched = f"{workdir}/tree"
    sandbox.files.make_dir(f"{watched}/sub")
    handle = sandbox.files.watch_dir(watched, recursive=True)
    try:
        sandbox.commands.run(f"echo x > {watched}/sub/deep.txt")
        seen: list = []

        def arrived() -> bool:
            seen.extend(handle.get_new_events())
            return any(e.name in ("sub/deep.txt", "deep.txt") for e in seen)

        assert wait_for(arrived, 10.0), f"no event for sub/deep.txt, got {seen}"
    finally:
        handle.stop()


def test_watch_missing_dir(sandbox: Sandbox, workdir: str) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir(f"{workdir}/not-there")


# ---------------------------------------------------------------------------------------
# Errors: the SDK's own exception classes
# ---------------------------------------------------------------------------------------


def test_unknown_template(service: Service, sdk_logger) -> None:
    before = set(native_ids(service))
    # The server answers 404; for a create the SDK raises its generic SandboxException
    # carrying the status (e2b.api.handle_api_exception with the default class).
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(f"no-such-template-{tag()}", logger=sdk_logger)
    assert type(ei.value) is SandboxException
    assert ei.value.status_code == 404
    assert set(native_ids(service)) == before


def test_missing_file(sandbox: Sandbox, workdir: str) -> None:
    with pytest.raises(FileNotFoundException) as ei:
        sandbox.files.read(f"{workdir}/does-not-exist.txt")
    assert isinstance(ei.value, NotFoundException)
    with pytest.raises(NotFoundException):
        sandbox.files.list(f"{workdir}/no-such-dir")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(f"{workdir}/no-such-file")


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/../../x", "/workspace/../etc/shadow", "/tmp/x.txt"])
def test_write_outside_workspace_is_invalid(sandbox: Sandbox, path: str) -> None:
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(path, "nope")


def test_other_operations_outside_workspace_are_invalid(sandbox: Sandbox, workdir: str) -> None:
    sandbox.files.write(f"{workdir}/mine.txt", "mine")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/etc/passwd")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list("/etc")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir("/tmp/e2b-outside")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.remove("/workspace/../etc/hostname")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.rename(f"{workdir}/mine.txt", "/tmp/stolen.txt")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir("/etc")
    assert sandbox.files.read(f"{workdir}/mine.txt") == "mine"


def test_wrong_api_key(auth_service: Service) -> None:
    opts = {"api_url": auth_service.url, "sandbox_url": auth_service.url}
    with pytest.raises(AuthenticationException):
        Sandbox.create("minimal", api_key="e2b_wrong_key_0000000000000000", **opts)
    with pytest.raises(AuthenticationException):
        list_all(api_key="e2b_wrong_key_0000000000000000", **opts)
    assert native_ids(auth_service) == []


def test_wrong_api_key_cannot_connect(auth_service: Service) -> None:
    opts = {"api_url": auth_service.url, "sandbox_url": auth_service.url}
    sbx = Sandbox.create("minimal", timeout=120, api_key=auth_service.token, **opts)
    try:
        with pytest.raises(AuthenticationException):
            Sandbox.connect(sbx.sandbox_id, api_key="e2b_wrong_key_0000000000000000", **opts)
        with pytest.raises(AuthenticationException):
            Sandbox.kill(sbx.sandbox_id, api_key="e2b_wrong_key_0000000000000000", **opts)
        # Wire-level: the sandbox's own (envd) endpoints want its access token, which only
        # the API hands out: without it, or with the API key instead, they answer 401.
        import httpx

        sandbox_headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        for extra in ({}, {"X-Access-Token": "wrong"}, {"X-API-KEY": auth_service.token}):
            r = httpx.post(
                f"{auth_service.url}/process.Process/List",
                headers={**sandbox_headers, **extra, "Content-Type": "application/json"},
                content=b"{}",
            )
            assert r.status_code == 401, (extra, r.status_code, r.text)
            r = httpx.get(f"{auth_service.url}/files", params={"path": "/etc/hostname"}, headers={**sandbox_headers, **extra})
            assert r.status_code == 401, (extra, r.status_code, r.text)
        # The sandbox is untouched.
        assert sbx.commands.run("echo alive").stdout == "alive\n"
    finally:
        sbx.kill()


def test_right_api_key(auth_service: Service, sdk_logger) -> None:
    opts = {"api_url": auth_service.url, "sandbox_url": auth_service.url, "api_key": auth_service.token}
    sbx = Sandbox.create("minimal", timeout=120, logger=sdk_logger, **opts)
    try:
        assert sbx.commands.run("echo authorised").stdout == "authorised\n"
        sbx.files.write("auth.txt", "ok")
        assert sbx.files.read("auth.txt") == "ok"
        assert sbx.sandbox_id in [s.sandbox_id for s in list_all(**opts)]
    finally:
        assert sbx.kill() is True
