"""Live servers for the tests that need real processes: the service as production runs it, on the test database
(PostgreSQL, which the processes share with the tests), and a model provider they can call.
"""

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ["granian", "daphne"]
"""The servers the service runs on: the production launcher (`python -m bankagent.serve`: granian), and daphne."""
TIMEOUT = 10  # seconds for any one answer or event


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(server: str, port: int, workers: int = 1) -> list[str]:
    """How to start `server` on `port`: the production launcher, or daphne (one process)."""
    if server == "granian":
        return [
            sys.executable,
            "-m",
            "bankagent.serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    assert workers == 1, "daphne serves one process"
    return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "bankagent.asgi:application"]


def database_url() -> str:
    """The test database, for server processes."""
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def server_env(**overrides: str) -> dict[str, str]:
    """A production environment on the test database: DEBUG off, the demo model at full speed, no rate limits,
    and no Redis (one process: the in-memory channel layer) unless `overrides` name one."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SECRET_KEY": "live-server-test",
        "DJANGO_DEBUG": "off",
        "AGENT_MODEL": "demo",
        "DEMO_MODEL_DELAY_MS": "0",
        "THROTTLE_RATES": "off",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    return env | overrides


def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: object = None
) -> http.client.HTTPResponse:
    """One request on a connection of its own; the response is read whole into `.body`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    payload = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if payload else {}
    conn.request(method, path, body=payload, headers=all_headers | (headers or {}))
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


class LiveServer:
    """One server process, in a process group of its own: a kill reaches granian's workers too."""

    def __init__(self, kind: str, env: dict[str, str], log: Path, *, workers: int = 1) -> None:
        self.kind, self.env, self.log, self.workers = kind, env, log, workers
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, thread: object) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/v1/threads/{thread.pk}/"

    def start(self, *, healthy: bool = False) -> None:
        """Start it, and wait until it answers (and answers healthy, if asked)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                server_command(self.kind, self.port, self.workers),
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if request(self.port, "GET", "/api/v1/health").status == 200 or not healthy:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not start: {self.log_tail()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as an out-of-memory kill or a lost machine would stop it: nothing runs on."""
        assert self.process is not None
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=TIMEOUT)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=TIMEOUT)
        self.signal(signal.SIGKILL)  # whatever of the group outlived its leader
        self.process = None

    def log_tail(self) -> str:
        """The end of its output, for a failure's message."""
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class ModelCall:
    """One request the model server received."""

    body: dict
    released: threading.Event = field(default_factory=threading.Event)
    hung_up: threading.Event = field(default_factory=threading.Event)

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]

    @property
    def last_user_text(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


class ModelServer:
    """An OpenAI-compatible chat completions endpoint in threads of its own, which server processes configured with
    `env` call as their model. It answers `words` (streamed, or whole for a blocking run) and records each request;
    while held, it streams the words and then keeps the answer open until released or the caller hangs up, so
    that a run is mid-answer for as long as a test needs, in whichever process runs it."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.calls: list[ModelCall] = []
        self.changed = threading.Condition()
        self.holding = False
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                call = model._arrived(body)
                try:
                    model._answer(self, call)
                except (BrokenPipeError, ConnectionResetError):
                    call.hung_up.set()
                finally:
                    with model.changed:
                        model.changed.notify_all()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def env(self) -> dict[str, str]:
        return {"AGENT_MODEL": "openai-chat:gpt-4o", "OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": "not-a-real-key"}

    def start(self) -> "ModelServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def hold(self) -> None:
        """From now on, answers stay open after their words until `release`."""
        with self.changed:
            self.holding = True

    def release(self) -> None:
        """Let every held answer end, and stop holding new ones."""
        with self.changed:
            self.holding = False
            for call in self.calls:
                call.released.set()
            self.changed.notify_all()

    def poke(self) -> None:
        """Wake `wait_for` to look again: something it waits on changed outside the model."""
        with self.changed:
            self.changed.notify_all()

    def _arrived(self, body: dict) -> ModelCall:
        with self.changed:
            call = ModelCall(body)
            if not self.holding:
                call.released.set()
            self.calls.append(call)
            self.changed.notify_all()
            return call

    def _answer(self, handler: BaseHTTPRequestHandler, call: ModelCall) -> None:
        if not call.body.get("stream"):
            self._held(handler, call)
            if call.hung_up.is_set():
                return
            message = {"role": "assistant", "content": "".join(self.words)}
            completion = self._completion(choices=[{"index": 0, "message": message, "finish_reason": "stop"}])
            data = json.dumps(completion | {"object": "chat.completion"}).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for word in self.words:
            self._event(handler, {"role": "assistant", "content": word})
        self._held(handler, call)
        if call.hung_up.is_set():
            return
        self._event(handler, {}, finish_reason="stop")
        self._chunk(handler, b"data: [DONE]\n\n")
        self._chunk(handler, b"")

    def _held(self, handler: BaseHTTPRequestHandler, call: ModelCall) -> None:
        """Until the call is released, or its caller hangs up (its connection becomes readable at its end)."""
        while not call.released.wait(0.02):
            readable, _, _ = select.select([handler.connection], [], [], 0)
            if readable and not handler.connection.recv(1, socket.MSG_PEEK):
                call.hung_up.set()
                return

    def _completion(self, **fields: object) -> dict:
        return {"id": "chatcmpl-1", "created": 0, "model": "gpt-4o"} | fields

    def _event(self, handler: BaseHTTPRequestHandler, delta: dict, finish_reason: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        chunk = self._completion(object="chat.completion.chunk", choices=[choice])
        self._chunk(handler, f"data: {json.dumps(chunk)}\n\n".encode())

    def _chunk(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        handler.wfile.flush()

    def wait_for(self, predicate: Callable[[list[ModelCall]], bool], timeout: float = TIMEOUT) -> None:
        """Block until `predicate(calls)` holds; AssertionError after `timeout` (a hang, not a slow pass)."""
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.calls), timeout), f"calls: {len(self.calls)}"


def poll(check: Callable[[], object], timeout: float = TIMEOUT) -> object:
    """`check()`'s first truthy result, asked again until `timeout` (a hang, not a slow pass)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.05)
    return result


def shape(events: list[dict]) -> list[str]:
    """Event names, with a run of text_delta counted once (deltas merge differently for each reader)."""
    names: list[str] = []
    for event in events:
        if not (names and names[-1] == event["event"] == "text_delta"):
            names.append(event["event"])
    return names
