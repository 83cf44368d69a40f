"""Fixtures of the E2B SDK tests: real ``conductor serve`` processes.

``service`` is the session's server (no API key required); the three variables the SDK
reads, ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``E2B_API_KEY``, point at it for the whole
session, so the SDK is used exactly as documented, with no option naming conductor.
``auth_service`` is a second server with ``security.api_key_required: true``; its key is
the file ``<base>/config/api-key`` the server creates at start.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import pytest

from conductor_service import Service, ServiceError, start_service, stop_service

# Quiet the transports' own debug lines; keep the SDK's request log and pyqwest's access
# log (method, URL, HTTP version and status of every SDK request).
logging.getLogger("httpcore").setLevel(logging.WARNING)
logging.getLogger("pyqwest").setLevel(logging.INFO)
logging.getLogger("pyqwest.access").setLevel(logging.DEBUG)

# Any value: the server without `security.api_key_required` does not check it, but the SDK
# refuses to send a request without one.
SESSION_API_KEY = "e2b_conductor_tests_0000000000000000"

# Variables of the SDK that would change where or how it connects.
_OTHER_E2B_VARS = ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN", "E2B_HTTP_VERSION", "E2B_CONNECTION_RETRIES")


def _start(extra_yaml: str = "", label: str = "service") -> Service:
    try:
        return start_service(extra_yaml, label=label)
    except ServiceError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    """The session's conductor; the SDK's environment variables point at it."""
    s = _start(label="e2b-py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2B_API_URL", s.url)
        mp.setenv("E2B_SANDBOX_URL", s.url)
        mp.setenv("E2B_API_KEY", SESSION_API_KEY)
        for name in _OTHER_E2B_VARS:
            mp.delenv(name, raising=False)
        try:
            yield s
        finally:
            stop_service(s)


@pytest.fixture(scope="session")
def auth_service(service: Service) -> Iterator[Service]:
    """A second conductor that requires an API key (``security.api_key_required``)."""
    s = _start("security:\n  api_key_required: true\n", label="e2b-py-auth")
    key_file = s.base / "config" / "api-key"
    deadline = time.monotonic() + 10
    while not (key_file.is_file() and key_file.read_text().strip()):
        if time.monotonic() > deadline:
            stop_service(s)
            pytest.fail(f"{key_file} was not created by the server:\n{s.log_tail()}", pytrace=False)
        time.sleep(0.1)
    s.token = key_file.read_text().strip()
    try:
        yield s
    finally:
        stop_service(s)


@pytest.fixture(autouse=True)
def _service_log_on_failure(request: pytest.FixtureRequest, service: Service) -> Iterator[None]:
    """Every test runs against the session's server; a failing one shows its log's tail."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n--- tail of {service.base / 'service.log'} ---\n{service.log_tail(80)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def sdk_logger() -> logging.Logger:
    """The logger handed to the SDK (``Sandbox.create(logger=...)``): its request/response
    lines are captured by pytest and shown with a failure."""
    logger = logging.getLogger("e2b.sdk-requests")
    logger.setLevel(logging.DEBUG)
    return logger
