"""A service with ``security.api_key_required``: requests without the token fail with
AuthError; a manager given the service's configuration reads the key file and gets in."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from conductor import AsyncConductorClient, AuthError
from conductor.workspace_isolation import WorkspaceIsolationManager

from conftest import start_service, stop_service


@pytest.fixture(scope="module")
def secured() -> Iterator[Any]:
    s = start_service("security:\n  api_key_required: true\n")
    try:
        yield s
    finally:
        stop_service(s)


async def test_the_token_is_required_and_read_from_the_configuration(secured: Any) -> None:
    async with AsyncConductorClient(secured.url) as anonymous:
        assert (await anonymous.health()).status == "ok"  # /health stays open
        with pytest.raises(AuthError) as e:
            await anonymous.list_workspaces()
        assert (e.value.status, e.value.code) == (401, "unauthorized")

    async with AsyncConductorClient(secured.url, token="x" * 32) as wrong:
        with pytest.raises(AuthError):
            await wrong.environments()

    async with WorkspaceIsolationManager(str(secured.config_path)) as manager:
        assert await manager.list_workspaces() == []
