"""Every request and websocket gets a request id, the caller's own when it is plain, said back in X-Request-ID."""

import re

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator

from bankagent import context
from bankagent.asgi import application
from identity.models import APIKey
from tests.asgi import http_call
from threads.models import Thread

pytestmark = pytest.mark.django_db(transaction=True)


async def health(headers: dict[str, str]) -> dict[str, str]:
    reply = await http_call("GET", "/api/v1/health", headers)
    assert reply.status == 200
    return reply.headers


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("req-42.a:b_c", True),
        ("with space", False),
        ("x" * 65, False),
        ("café", False),
    ],
)
async def test_a_request_says_its_id_the_callers_when_plain(given, kept):
    said = (await health({"x-request-id": given}))["x-request-id"]
    assert (said == given) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", said)


async def test_requests_without_an_id_get_a_new_one_each():
    first, second = (await health({}))["x-request-id"], (await health({}))["x-request-id"]
    assert first != second


async def test_the_request_id_is_known_while_the_request_is_served_and_forgotten_after(monkeypatch):
    seen = []
    inner = application.app

    async def spy(scope, receive, send):
        seen.append(context.current())
        await inner(scope, receive, send)

    monkeypatch.setattr(application, "app", spy)
    said = (await health({"x-request-id": "abc"}))["x-request-id"]
    assert seen == [{"request_id": "abc"}] and said == "abc"
    assert context.current() == {}


async def test_a_websocket_handshake_says_its_request_id(user_id):
    key = (await sync_to_async(APIKey.objects.create_key)(name="context tests"))[1]
    thread = await Thread.objects.acreate(user_id=user_id, agent_type="general_chat")
    path = f"/ws/v1/threads/{thread.pk}/"
    scope = {
        "type": "websocket",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"localhost"),
            (b"x-api-key", key.encode()),
            (b"x-user-id", str(user_id).encode()),
            (b"x-request-id", b"socket-1"),
        ],
        "subprotocols": [],
        "client": ("127.0.0.1", 5000),
        "server": ("localhost", 80),
    }
    ws = ApplicationCommunicator(application, scope)
    await ws.send_input({"type": "websocket.connect"})
    accepted = await ws.receive_output(timeout=10)
    assert accepted["type"] == "websocket.accept"
    assert dict(accepted["headers"])[b"x-request-id"] == b"socket-1"
    await ws.send_input({"type": "websocket.disconnect", "code": 1000})
    await ws.wait(timeout=10)


def test_bound_values_hold_in_their_block_only():
    with context.bound(thread_id="t", run_id=None):
        assert context.current() == {"thread_id": "t"}
    assert context.current() == {}
