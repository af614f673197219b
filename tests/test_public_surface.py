"""What the public port shows: ``VOXSWAP_PUBLIC_DOCS`` and ``VOXSWAP_PUBLIC_STATUS`` (issue 18).

Both default to today's behaviour (public). Off, the documentation is not mounted at all, and the
status answers exactly as an unknown path does unless the admin token comes with the request, so
a scanner cannot tell that either exists. Probes (``/health*``) are never affected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import AUTH

STATUS = "/api/system/status"


def unknown_path_answer(client: TestClient, path: str, **kwargs: Any) -> dict[str, Any]:
    r = client.get(path, **kwargs)
    assert r.status_code == 404, r.text
    error: dict[str, Any] = r.json()["error"]
    error.pop("request_id")
    return error


def test_by_default_docs_and_status_are_public(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert STATUS in client.get("/openapi.json").json()["paths"]
    assert client.get(STATUS).json()["model_version"] == "a"


def test_docs_can_be_kept_off_the_public_port(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(public_docs=False))) as client:
        nothing = unknown_path_answer(client, "/no-such-page")
        for path in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
            assert unknown_path_answer(client, path) == nothing
            assert unknown_path_answer(client, path, headers=AUTH) == nothing  # not mounted at all
        assert client.get(STATUS).status_code == 200  # the status is a setting of its own


def test_the_status_can_be_kept_for_the_admin_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(public_status=False))) as client:
        nothing = unknown_path_answer(client, "/api/system/nothing")
        assert unknown_path_answer(client, STATUS) == nothing
        assert unknown_path_answer(client, STATUS, headers={"Authorization": "Bearer wrong"}) == nothing
        r = client.get(STATUS, headers=AUTH)
        assert r.status_code == 200 and r.json()["model_version"] == "a"
        assert client.get("/health/ready").status_code == 200  # probes need no token
        assert client.get("/").status_code == 200  # the page itself stays; it asks with the token


def test_a_private_status_without_an_admin_token_configured_is_there_for_nobody(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(public_status=False, admin_token=None))) as client:
        assert client.get(STATUS, headers=AUTH).status_code == 404
