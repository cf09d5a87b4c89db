"""GET /api/v1/health: whether this process can serve, its database and its channel layer checked; no key needed."""

import pytest
from django.db import OperationalError
from rest_framework.test import APIClient

import bankagent.views
from runs.hub import Hub

pytestmark = pytest.mark.django_db

HEALTH = "/api/v1/health"
SECRET = "password=hunter2 host=10.9.8.7"


def assert_down(response, failed: str) -> None:
    body = response.json()
    assert response.status_code == 503, body
    assert body["status"] == "error"
    assert body[failed] == "error"
    assert body["error"]["code"] == "service_unavailable"
    assert response["Retry-After"] == "5"
    (working,) = {"database", "channel_layer"} - {failed}
    assert body[working] == "ok"
    # The exception says where the dependency lives and how to reach it: clients never see it.
    assert SECRET not in response.content.decode()
    assert "hunter2" not in response.content.decode()


def test_health_is_200_with_every_dependency_ok(anonymous):
    response = anonymous.get(HEALTH)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"status": "ok", "database": "ok", "channel_layer": "ok"}


def test_health_needs_no_key_and_ignores_a_wrong_one():
    wrong = APIClient()
    wrong.credentials(HTTP_X_API_KEY="not-a-key", HTTP_X_USER_ID="not-a-uuid")

    assert APIClient().get(HEALTH).status_code == 200
    assert wrong.get(HEALTH).status_code == 200


def test_health_answers_head_with_headers_only(anonymous):
    response = anonymous.head(HEALTH)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response.content == b""


def test_health_is_503_database_error_when_the_database_fails(anonymous, monkeypatch):
    def unreachable() -> None:
        raise OperationalError(f"could not connect to server: {SECRET}")

    monkeypatch.setattr(bankagent.views, "_select_one", unreachable)

    assert_down(anonymous.get(HEALTH), "database")


def test_health_is_503_channel_layer_error_when_the_hub_ping_fails(anonymous, monkeypatch):
    async def no_answer(self, timeout: float) -> None:
        raise ConnectionError(f"Error 111 connecting to redis: {SECRET}")

    monkeypatch.setattr(Hub, "ping", no_answer)

    assert_down(anonymous.get(HEALTH), "channel_layer")


def test_health_is_503_with_both_errors_when_both_fail(anonymous, monkeypatch):
    def unreachable() -> None:
        raise OperationalError(SECRET)

    async def no_answer(self, timeout: float) -> None:
        raise TimeoutError(SECRET)

    monkeypatch.setattr(bankagent.views, "_select_one", unreachable)
    monkeypatch.setattr(Hub, "ping", no_answer)
    response = anonymous.get(HEALTH)

    assert response.status_code == 503
    assert response.json()["database"] == response.json()["channel_layer"] == "error"
    assert SECRET not in response.content.decode()


def test_health_head_is_503_when_a_dependency_fails(anonymous, monkeypatch):
    async def no_answer(self, timeout: float) -> None:
        raise ConnectionError(SECRET)

    monkeypatch.setattr(Hub, "ping", no_answer)
    response = anonymous.head(HEALTH)

    assert response.status_code == 503
    assert response.content == b""
