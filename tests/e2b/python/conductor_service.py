"""A real ``conductor serve`` on a free loopback port, for the E2B SDK tests and bench.py.

The approach is the one of ``clients/python/tests/conftest.py``: the repository's built
binary (``$CONDUCTOR_BIN`` or ``target/debug/conductor``), its own data directory under
``target/tmp/e2b-py/``, a configuration naming its port, ``GET /health`` polled until it
answers 200. Stopping removes every workspace left (native API), sends SIGTERM, runs
``conductor reconcile`` for anything still in the engine and deletes the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

REPO = Path(__file__).resolve().parents[3]
_bin = Path(os.environ.get("CONDUCTOR_BIN", "target/debug/conductor"))
BINARY = _bin if _bin.is_absolute() else REPO / _bin
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


class ServiceError(RuntimeError):
    """The service could not be started."""


@dataclass
class Service:
    """A running conductor service."""

    url: str
    port: int
    base: Path
    config_path: Path
    process: "subprocess.Popen[bytes]"
    token: Optional[str] = None
    label: str = "service"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = (self.base / "service.log").read_text(errors="replace")
        except OSError:
            return "(no service log)"
        return "\n".join(text.splitlines()[-lines:])

    def http(self) -> httpx.Client:
        """A client of conductor's native API (bearer token when the service wants one)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(120.0, connect=10.0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(extra_yaml: str = "", label: str = "service") -> Service:
    """Starts ``conductor serve`` with its own data directory and waits for ``/health``.

    Raises ``ServiceError`` (with the service log's tail) when the binary is missing or the
    service does not come up."""
    if not BINARY.is_file():
        raise ServiceError(f"{BINARY} does not exist; build it first with `cargo build --bin conductor`")
    root = REPO / "target" / "tmp" / "e2b-py"
    root.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"conductor-{label}-", dir=root))
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
    service = Service(f"http://127.0.0.1:{port}", port, base, config_path, process, label=label)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            tail = service.log_tail()
            stop_service(service)
            raise ServiceError(f"conductor serve exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{service.url}/health", timeout=2.0).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            tail = service.log_tail()
            stop_service(service)
            raise ServiceError(f"conductor serve did not answer /health within {START_TIMEOUT:.0f} s:\n{tail}")
        time.sleep(0.2)


def list_workspaces(service: Service, agent_id: Optional[str] = None) -> list:
    """The live workspaces (of one agent), from the native ``GET /workspaces``."""
    params = {"agent_id": agent_id} if agent_id else {}
    with service.http() as http:
        r = http.get("/workspaces", params=params)
        r.raise_for_status()
        return r.json().get("workspaces", [])


def remove_workspaces(service: Service, agent_id: Optional[str] = None) -> None:
    """Removes the live workspaces (of one agent), data included."""
    try:
        with service.http() as http:
            params = {"agent_id": agent_id} if agent_id else {}
            for w in http.get("/workspaces", params=params).json().get("workspaces", []):
                http.delete(f"/workspaces/{w['id']}", params={"keep_volumes": "false"})
    except (httpx.HTTPError, ValueError):
        pass


def stop_service(service: Service) -> None:
    """Removes what was left, stops the service with SIGTERM, deletes its data."""
    if service.process.poll() is None:
        remove_workspaces(service)
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
    # Whatever a failed test left in the engine: reconcile.
    subprocess.run(
        [str(BINARY), "reconcile", "--config", str(service.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    # Keep the log of the last run beside the data directories, for post-mortems.
    try:
        shutil.copyfile(service.base / "service.log", service.base.parent / f"last-{service.label}.log")
    except OSError:
        pass
    shutil.rmtree(service.base, ignore_errors=True)
