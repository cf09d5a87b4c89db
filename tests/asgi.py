"""HTTP requests through the ASGI application itself, in the test's event loop, as a server would hand them to it:
a run's background work lives on after its response, as it does in production."""

import json
from collections.abc import Mapping
from dataclasses import dataclass

from channels.testing import ApplicationCommunicator

from bankagent.middleware import ASGIApp

TIMEOUT = 20.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    """Names in lower case."""
    body: bytes

    def json(self) -> object:
        return json.loads(self.body) if self.body else None


def http_scope(
    method: str, path: str, headers: Mapping[str, str], *, query_string: bytes = b"", client: str = "127.0.0.1"
) -> dict:
    sent = {"host": "localhost"} | dict(headers)
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "headers": [(name.lower().encode(), value.encode()) for name, value in sent.items()],
        "client": (client, 40000),
        "server": ("localhost", 80),
    }


async def http_call(
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: object = None,
    *,
    app: ASGIApp | None = None,
    client: str = "127.0.0.1",
) -> Reply:
    """One request, `body` sent as JSON unless None, its response read to its end (a stream to its last byte)."""
    if app is None:
        from bankagent.asgi import application as app
    payload = b"" if body is None else json.dumps(body).encode()
    sent = {"content-type": "application/json", "content-length": str(len(payload))} | dict(headers or {})
    communicator = ApplicationCommunicator(app, http_scope(method, path, sent, client=client))
    await communicator.send_input({"type": "http.request", "body": payload, "more_body": False})
    start = await communicator.receive_output(timeout=TIMEOUT)
    chunks = []
    while True:
        message = await communicator.receive_output(timeout=TIMEOUT)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await communicator.wait(timeout=TIMEOUT)
    said = {name.decode().lower(): value.decode() for name, value in start.get("headers", [])}
    return Reply(start["status"], said, b"".join(chunks))
