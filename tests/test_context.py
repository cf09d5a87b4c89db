"""Every request and websocket gets a request id, the caller's own when it is plain, said back in X-Request-ID."""

import re

import pytest
from asgiref.sync import sync_to_async
from channels.testing import ApplicationCommunicator

from bankagent import context
from bankagent.asgi import application
from identity.models import APIKey
from threads.models import Thread

pytestmark = pytest.mark.django_db(transaction=True)


async def health(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/v1/health",
        "raw_path": b"/api/v1/health",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("localhost", 80),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": b""})
    start = await app.receive_output(timeout=10)
    await app.receive_output(timeout=10)
    assert start["status"] == 200
    return dict(start["headers"])


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"req-42.a:b_c", True),
        (b"with space", False),
        (b"x" * 65, False),
        (b"caf\xc3\xa9", False),
    ],
)
async def test_a_request_says_its_id_the_callers_when_plain(given, kept):
    said = (await health([(b"x-request-id", given)]))[b"x-request-id"]
    assert (said == given) is kept
    if not kept:
        assert re.fullmatch(rb"[0-9a-f]{32}", said)


async def test_requests_without_an_id_get_a_new_one_each():
    first, second = (await health([]))[b"x-request-id"], (await health([]))[b"x-request-id"]
    assert first != second


async def test_the_request_id_is_known_while_the_request_is_served_and_forgotten_after(monkeypatch):
    seen = []
    inner = application.app

    async def spy(scope, receive, send):
        seen.append(context.current())
        await inner(scope, receive, send)

    monkeypatch.setattr(application, "app", spy)
    said = (await health([(b"x-request-id", b"abc")]))[b"x-request-id"]
    assert seen == [{"request_id": "abc"}] and said == b"abc"
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
