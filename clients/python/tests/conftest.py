"""Test fixtures: a real ``conductor serve`` on a free loopback port.

The service is the repository's built binary (``target/debug/conductor``, or
``$CONDUCTOR_BIN``), started once per session with its own data directory under
``target/tmp/python-it/`` and a configuration naming its port. A missing binary or a
service that does not come up is a failure, not a skip. At the end every workspace the
tests left is removed, the service is stopped with SIGTERM and its data directory deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("CONDUCTOR_BIN", REPO / "target" / "debug" / "conductor"))
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


@dataclass
class Service:
    """A running conductor service."""

    url: str
    port: int
    base: Path
    config_path: Path
    process: "subprocess.Popen[bytes]"
    token: Optional[str] = None

    @property
    def config(self) -> Dict[str, Any]:
        """The configuration as a dict (only what a client needs)."""
        return {"network": {"bind_address": "127.0.0.1", "api_port": self.port}}

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.base / "service.log").read_text(errors="replace")
        except OSError:
            return "(no service log)"
        return "\n".join(text.splitlines()[-lines:])

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(120.0, connect=10.0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(extra_yaml: str = "") -> Service:
    """Starts ``conductor serve`` with its own data directory and waits for ``/health``."""
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} does not exist; build it first with `cargo build --bin conductor`")
    root = REPO / "target" / "tmp" / "python-it"
    root.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="conductor-py-", dir=root))
    port = free_port()
    config_path = base / "config.yaml"
    config_path.write_text(
        f"storage:\n  base_path: {base}\n"
        f"network:\n  bind_address: 127.0.0.1\n  api_port: {port}\n"
        "task_execution:\n  shutdown_grace_period: 5\n"
        f"{extra_yaml}"
    )
    with open(base / "service.log", "wb") as log:
        process = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(config_path), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(f"http://127.0.0.1:{port}", port, base, config_path, process)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            stop_service(service)
            pytest.fail(f"conductor serve exited with {process.returncode}:\n{service.log_tail()}")
        try:
            if httpx.get(f"{service.url}/health", timeout=2.0).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_service(service)
            pytest.fail(f"conductor serve did not answer /health within {START_TIMEOUT:.0f} s:\n{service.log_tail()}")
        time.sleep(0.2)


def remove_workspaces(service: Service, agent_id: Optional[str] = None) -> None:
    """Removes the live workspaces (of one agent), data included."""
    params = {"agent_id": agent_id} if agent_id else {}
    try:
        with service.http() as http:
            for w in http.get("/workspaces", params=params).json().get("workspaces", []):
                http.delete(f"/workspaces/{w['id']}", params={"keep_volumes": "false"})
    except (httpx.HTTPError, ValueError):
        pass


def stop_service(service: Service) -> None:
    """Removes what the tests left, stops the service with SIGTERM, deletes its data."""
    if service.process.poll() is None:
        remove_workspaces(service)
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
    # Whatever a failed test left in the engine (task workspaces, sidecars): reconcile.
    subprocess.run(
        [str(BINARY), "reconcile", "--config", str(service.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    shutil.rmtree(service.base, ignore_errors=True)


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    """The conductor service of this session. ``CONDUCTOR_URL`` points at it, so the
    default ``conductor.orchestrator.orchestrator`` uses it too."""
    s = start_service()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDUCTOR_URL", s.url)
        mp.delenv("CONDUCTOR_TOKEN", raising=False)
        try:
            yield s
        finally:
            stop_service(s)


@pytest.fixture
def agent_id(service: Service) -> Iterator[str]:
    """An agent id of this test; its workspaces are removed afterwards."""
    agent = f"py-{uuid.uuid4().hex[:10]}"
    yield agent
    remove_workspaces(service, agent)
