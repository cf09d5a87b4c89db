"""Load benchmark against live server processes, as production runs them (PostgreSQL + Redis by default).

    .venv/bin/python bench/load.py                      # every scenario, one server process
    .venv/bin/python bench/load.py --only query --clients 10 --server daphne
    .venv/bin/python bench/load.py --database sqlite --only query --clients 50 --requests 1000

Scenarios (each against a freshly started server, on a fresh database):
- query, stream, create: blocking queries, NDJSON streams and thread creation at 1, 10 and 50 clients, each
  client on its own keep-alive connection, a new thread every 5 turns;
- mixed: 100 clients each asking a blocking query and then reading its thread, demo model at its chunk pause;
- sockets: 1,000 websockets, each sending one query at the same moment; every stream is checked for order;
- burst: 8 queries at once on a fresh thread (blocking and streamed), 30 rounds: one run per thread, the rest 409
  (not run unless asked for: `--only burst`).

It prints req/s, p50/p99 latency, first-event p50/p99 (streams), errors and the servers' peak RSS, and appends
each result with the commit to bench/results.jsonl.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.jsonl"
USER_ID = "123e4567-e89b-12d3-a456-426614174000"
QUESTION = "What is my balance?"
SOCKET_QUESTION = QUESTION
"""A tool call and a whole answer (a lost card now stops to wait for the customer's approval)."""
TURNS_PER_THREAD = 5
WARMUP_OPS = 30
POSTGRES_ADMIN = "postgres://postgres@127.0.0.1:5432/postgres"


# --- servers ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(server: str, port: int, workers: int) -> list[str]:
    app = "bankagent.asgi:application"
    if server == "daphne":
        if workers != 1:
            raise SystemExit("daphne runs one process; use --server uvicorn or granian for several workers")
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if server == "serve":
        return [sys.executable, "-m", "bankagent.serve", "--port", str(port), "--workers", str(workers)]
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log"),
            *("--lifespan", "off", "--backlog", "4096"),
        ]
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asginl", "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", str(workers), "--loop", "uvloop", "--backlog", "4096", "--log-level", "warning", app),
        ]
    if server == "gunicorn":
        return [
            *(sys.executable, "-m", "gunicorn", app, "-k", "uvicorn_worker.UvicornWorker"),
            *("-b", f"127.0.0.1:{port}", "-w", str(workers), "--backlog", "4096", "--log-level", "warning"),
        ]
    raise SystemExit(f"unknown server {server!r}")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    def pids(self) -> list[int]:
        """The server and every process below it (workers)."""
        pids, frontier = [self.process.pid], [self.process.pid]
        while frontier:
            parent = frontier.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            pids += map(int, children)
            frontier += map(int, children)
        return pids

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return total / 1024

    def cpu_seconds(self) -> float:
        """CPU time the server's processes have used so far (user and system)."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        seconds = {}
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return seconds

    def stop(self) -> None:
        # SIGINT: every server stops cleanly on it, and py-spy writes its profile.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(args: argparse.Namespace, env: dict[str, str], delay_ms: int) -> Server:
    port = free_port()
    env = {
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "DEMO_MODEL_DELAY_MS": str(delay_ms),
        "LOG_LEVEL": "WARNING",
        "THROTTLE_RATES": "off",
    }
    log = Path(tempfile.gettempdir()) / f"bench-{args.server}-{port}.log"
    with log.open("wb") as out:
        command = server_command(args.server, port, args.workers)
        if args.cprofile:
            # The event loop's thread, where the request path runs, profiled function by function.
            command = [sys.executable, "-m", "cProfile", "-o", args.cprofile, *command[1:]]
        elif args.profile:
            # Busy samples of every server process, as collapsed stacks (flame graph input).
            output = f"{args.profile}-{len(list(Path(args.profile).parent.glob('*')))}.txt"
            command = [
                "py-spy",
                "record",
                "--subprocesses",
                "--format",
                "raw",
                "-r",
                "250",
                "-o",
                output,
                "--",
                *command,
            ]
        process = subprocess.Popen(command, cwd=args.source, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as answer:
                if answer.status == 200:
                    server = Server(process, port, log)
                    warm_up(server, args.workers)
                    return server
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not answer its health check: see {log}")


def warm_up(server: Server, workers: int) -> None:
    """Every worker imports its code and opens its connections before the clock starts."""
    for _ in range(20 * workers):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/v1/health", timeout=5).read()


# --- the database the servers and this script share -------------------------------------------------------------------


def prepare_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bankagent.settings",
        "DJANGO_SECRET_KEY": "benchmark-only-secret-key",
        "AGENT_MODEL": "demo",
        "PYTHONPATH": str(args.source),
    }
    if args.database == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
        env.pop("REDIS_URL", None)
    else:
        import psycopg

        name = urlsplit(args.database_url).path.lstrip("/")
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        env["DATABASE_URL"] = args.database_url
        env["REDIS_URL"] = args.redis_url
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=args.source, env=env, check=True)
    # This script fills the database from inside its event loop, where Django refuses synchronous queries.
    os.environ.update(env, DJANGO_ALLOW_ASYNC_UNSAFE="true")
    sys.path.insert(0, str(args.source))
    import django

    django.setup()
    return env


RUN_EVENT_LOGS = "bankagent:run-events:*"


def run_event_logs(redis_url: str, *, forget: bool = False) -> dict[str, object]:
    """What the runs' event logs hold in Redis: how many, and their memory (Redis's own estimate) per run."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(RUN_EVENT_LOGS, count=1000))
    if forget:
        if keys:
            client.delete(*keys)
        return {}
    sizes = [client.memory_usage(key, samples=0) or 0 for key in keys]
    return {"run_event_logs": len(keys), "run_event_log_kib": round(sum(sizes) / max(len(keys), 1) / 1024, 1)}


def create_key() -> str:
    try:
        from identity.models import APIKey
    except ImportError:  # a checkout from before keys had an app of their own (--source)
        from rest_framework_api_key.models import APIKey

    return APIKey.objects.create_key(name="load bench")[1]


async def create_threads(count: int, agent_type: str = "bank_support") -> list[str]:
    if EXTERNAL is not None:
        # Another service (the reference): its threads are made through its API.
        connection = Connection(EXTERNAL.port, EXTERNAL.key)
        replies = [
            await connection.request("POST", "/api/v1/threads", {"agent_type": agent_type}) for _ in range(count)
        ]
        connection.close()
        return [json.loads(checked(reply, 201).body)["id"] for reply in replies]
    from threads.models import Thread

    threads = Thread.objects.bulk_create(Thread(user_id=USER_ID, agent_type=agent_type) for _ in range(count))
    return [str(thread.id) for thread in threads]


@dataclass
class External:
    port: int
    key: str


EXTERNAL: External | None = None


# --- an HTTP/1.1 keep-alive client light enough to leave the cores to the server --------------------------------------


class HTTPError(Exception):
    pass


@dataclass
class Reply:
    status: int
    body: bytes
    first_line_at: float | None = None


class Connection:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.fixed = f"Host: 127.0.0.1\r\nX-API-Key: {key}\r\nX-User-ID: {USER_ID}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: object = None, *, streamed: bool = False) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**20)
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.writer.write(head.encode() + self.fixed + b"\r\n" + payload)
        try:
            return await self._read(streamed)
        except (OSError, asyncio.IncompleteReadError, HTTPError):
            self.close()
            raise

    async def _read(self, streamed: bool) -> Reply:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        reply = Reply(status, b"")
        if "content-length" in headers:
            reply.body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                if streamed and reply.first_line_at is None and b"\n" in chunk[:-2]:
                    reply.first_line_at = time.perf_counter()
                parts.append(chunk[:-2])
            reply.body = b"".join(parts)
        else:
            reply.body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return reply

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- measuring --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    peak_rss_mib: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 1)

        return {
            "scenario": self.scenario,
            "clients": self.clients,
            "requests": self.requests,
            "req_s": round(len(self.latencies) / self.seconds, 1) if self.seconds else None,
            "p50_ms": pct(self.latencies, 0.5),
            "p99_ms": pct(self.latencies, 0.99),
            "first_event_p50_ms": pct(self.first_events, 0.5),
            "first_event_p99_ms": pct(self.first_events, 0.99),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "peak_rss_mib": round(self.peak_rss_mib),
            **self.notes,
        }


async def sample_rss(server: Server, result: Result, stop: asyncio.Event) -> None:
    while not stop.is_set():
        result.peak_rss_mib = max(result.peak_rss_mib, server.rss_mib())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


Operation = Callable[[Connection, int, int], object]


async def drive(server: Server, key: str, result: Result, operation: Operation) -> None:
    """`result.requests` operations shared by `result.clients` clients, each on its own connection."""
    remaining = iter(range(result.requests))
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, result, stop))

    async def client(number: int) -> None:
        connection = Connection(server.port, key)
        for turn, _ in enumerate(remaining):
            started = time.perf_counter()
            try:
                first = await operation(connection, number, turn)
                result.latencies.append(time.perf_counter() - started)
                if first is not None:
                    result.first_events.append(first - started)
            except Exception as exc:  # counted, shown, and the client goes on
                result.errors[type(exc).__name__ if not isinstance(exc, HTTPError) else str(exc)] += 1
        connection.close()

    # Untimed: the first runs of a fresh process load code and fill caches.
    warm = Connection(server.port, key)
    for turn in range(WARMUP_OPS):
        await operation(warm, result.clients, turn)
    warm.close()
    started, cpu = time.perf_counter(), server.cpu_by_process()
    await asyncio.gather(*(client(number) for number in range(result.clients)))
    result.seconds = time.perf_counter() - started
    used = {pid: seconds - cpu.get(pid, 0.0) for pid, seconds in server.cpu_by_process().items()}
    # How evenly the work spread over the worker processes (the busiest one's share).
    result.notes["busiest_process_share"] = round(max(used.values()) / max(sum(used.values()), 1e-9), 2)
    result.notes["server_cpu_ms_per_op"] = round(sum(used.values()) * 1000 / max(len(result.latencies), 1), 2)
    stop.set()
    await sampler


async def thread_rotation(clients: int, requests: int) -> Callable[[int, int], str]:
    """Each client takes a new thread every TURNS_PER_THREAD turns."""
    pool = iter(await create_threads((requests + WARMUP_OPS) // TURNS_PER_THREAD + clients + 2))
    current: dict[int, str] = {}

    def pick(number: int, turn: int) -> str:
        if turn % TURNS_PER_THREAD == 0:
            current[number] = next(pool)
        return current[number]

    return pick


def checked(reply: Reply, expected: int) -> Reply:
    if reply.status != expected:
        raise HTTPError(f"HTTP {reply.status}")
    return reply


async def scenario_query(server: Server, key: str, clients: int, requests: int) -> Result:
    thread_for = await thread_rotation(clients, requests)

    async def query(connection: Connection, number: int, turn: int) -> None:
        body = {"thread_id": thread_for(number, turn), "query": QUESTION}
        reply = checked(await connection.request("POST", "/api/v1/agent/query", body), 200)
        if b"1,123.45" not in reply.body and EXTERNAL is None:
            raise HTTPError("wrong answer")

    result = Result("query", clients, requests)
    await drive(server, key, result, query)
    return result


async def scenario_stream(server: Server, key: str, clients: int, requests: int) -> Result:
    thread_for = await thread_rotation(clients, requests)

    async def stream(connection: Connection, number: int, turn: int) -> float | None:
        body = {"thread_id": thread_for(number, turn), "query": QUESTION}
        reply = checked(await connection.request("POST", "/api/v1/agent/stream", body, streamed=True), 200)
        events = [json.loads(line) for line in reply.body.splitlines()]
        if events[-1]["event"] != "done" or any(event["event"] == "error" for event in events):
            raise HTTPError("stream failed")
        return reply.first_line_at

    result = Result("stream", clients, requests)
    await drive(server, key, result, stream)
    return result


async def scenario_create(server: Server, key: str, clients: int, requests: int) -> Result:
    async def create(connection: Connection, number: int, turn: int) -> None:
        body = {"agent_type": "bank_support", "title": f"Bench {number}.{turn}"}
        checked(await connection.request("POST", "/api/v1/threads", body), 201)

    result = Result("create", clients, requests)
    await drive(server, key, result, create)
    return result


async def scenario_mixed(server: Server, key: str, clients: int, requests: int) -> Result:
    thread_for = await thread_rotation(clients, requests)

    async def query_and_read(connection: Connection, number: int, turn: int) -> None:
        thread_id = thread_for(number, turn)
        body = {"thread_id": thread_id, "query": QUESTION}
        checked(await connection.request("POST", "/api/v1/agent/query", body), 200)
        checked(await connection.request("GET", f"/api/v1/threads/{thread_id}"), 200)

    result = Result("mixed", clients, requests)
    await drive(server, key, result, query_and_read)
    result.notes["queries_s"] = round(len(result.latencies) / result.seconds, 1)
    return result


def well_ordered(events: list[dict], final_token: str) -> bool:
    """Every event of the run, in order: cumulative partial outputs that never shrink, the last one whole."""
    names = [event["event"] for event in events]
    deltas = [event["token"] for event in events if event["event"] == "text_delta"]
    lengths = [len(json.loads(token).get("support_advice", "")) for token in deltas]
    return (
        names[:2] == ["message_created", "message_started"]
        and names[-2:] == ["message_complete", "done"]
        and set(names[2:-2]) <= {"text_delta", "tool_call", "tool_result"}
        and bool(deltas)
        and lengths == sorted(lengths)
        and deltas[-1] == final_token
    )


async def scenario_sockets(server: Server, key: str, clients: int, requests: int) -> Result:
    from websockets.asyncio.client import connect

    threads = await create_threads(clients + 1)
    reference = await Connection(server.port, key).request(
        "POST", "/api/v1/agent/stream", {"thread_id": threads.pop(), "query": SOCKET_QUESTION}, streamed=True
    )
    final_token = [e["token"] for e in map(json.loads, reference.body.splitlines()) if e["event"] == "text_delta"][-1]
    headers = {"X-API-Key": key, "X-User-ID": USER_ID}
    result = Result("sockets", clients, clients)
    ready, connected, gate = asyncio.Event(), [], asyncio.Semaphore(50)
    bad = Counter()

    async def one(thread_id: str) -> None:
        # Clients connect over time, not in one instant: a burst of a thousand overflows any listen backlog.
        async with gate:
            ws = await connect(
                f"ws://127.0.0.1:{server.port}/ws/v1/threads/{thread_id}/",
                additional_headers=headers,
                open_timeout=60,
                max_size=None,
            )
        connected.append(thread_id)
        async with ws:
            await ready.wait()
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "query", "query": SOCKET_QUESTION}))
            events, first = [], None
            while not events or events[-1]["event"] not in ("done",):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 300)))
                first = first or time.perf_counter()
            result.first_events.append(first - sent)
            result.latencies.append(time.perf_counter() - sent)
            if not well_ordered(events, final_token):
                kinds = [event.get("error_type", event["event"]) for event in events if event["event"] == "error"]
                bad[",".join(kinds) or "misordered"] += 1

    tasks = [asyncio.create_task(one(thread_id)) for thread_id in threads]
    while len(connected) < clients and not any(task.done() for task in tasks):
        await asyncio.sleep(0.1)
    result.notes["rss_connected_mib"] = round(server.rss_mib())
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, result, stop))
    started = time.perf_counter()
    ready.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    result.seconds = time.perf_counter() - started
    stop.set()
    await sampler
    result.errors.update(type(outcome).__name__ for outcome in outcomes if isinstance(outcome, BaseException))
    result.errors.update(bad)
    result.notes["complete_in_order"] = len(result.latencies) - sum(bad.values())
    result.notes["all_done_s"] = round(result.seconds, 1)
    return result


BURST_QUESTION = "Write me a poem about my card"
"""A long answer (a few seconds with the demo model's pause): every query of a round arrives while it is written."""


async def scenario_burst(server: Server, key: str, clients: int, requests: int) -> Result:
    """A double-click, two tabs, a client's retry: `clients` queries at once on a fresh thread, blocking queries and
    NDJSON streams mixed, `requests` rounds. One run per thread means one 200 a round and the others 409; the
    database is read afterwards for runs of one thread that overlapped (one began before the other's answer was
    saved)."""
    from threads.models import Message

    connections = [Connection(server.port, key) for _ in range(clients)]
    result = Result("burst", clients, requests)
    statuses: Counter = Counter()
    threads = await create_threads(requests)

    async def ask(number: int, thread_id: str) -> int:
        path = "/api/v1/agent/stream" if number % 2 else "/api/v1/agent/query"
        sent = time.perf_counter()
        reply = await connections[number].request("POST", path, {"thread_id": thread_id, "query": BURST_QUESTION})
        result.latencies.append(time.perf_counter() - sent)
        return reply.status

    started = time.perf_counter()
    for thread_id in threads:
        statuses.update(await asyncio.gather(*(ask(number, thread_id) for number in range(clients))))
    result.seconds = time.perf_counter() - started
    for connection in connections:
        connection.close()
    overlapping = []
    for thread_id in threads:
        answers = list(Message.objects.filter(thread_id=thread_id, role="assistant").order_by("seq"))
        ends = [answer.created_at + timedelta(milliseconds=answer.metadata.get("duration_ms", 0)) for answer in answers]
        overlapping.append(1 + sum(later.created_at < end for later, end in zip(answers[1:], ends, strict=False)))
    result.errors.update(f"HTTP {status}" for status in statuses.elements() if status not in (200, 409))
    result.notes["statuses"] = {str(status): count for status, count in sorted(statuses.items())}
    result.notes["rounds_with_overlapping_runs"] = sum(count > 1 for count in overlapping)
    result.notes["most_runs_at_once"] = max(overlapping)
    return result


SCENARIOS = {
    "burst": scenario_burst,
    "query": scenario_query,
    "stream": scenario_stream,
    "create": scenario_create,
    "mixed": scenario_mixed,
    "sockets": scenario_sockets,
}


# --- the run ----------------------------------------------------------------------------------------------------


def commit(source: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(scenario, clients, requests, demo model delay) in the order they run."""
    steps = []
    for name in args.only or ["query", "stream", "create", "mixed", "sockets"]:
        if name == "mixed":
            steps.append((name, args.clients[0] if args.clients_given else 100, args.requests or 1000, 15))
        elif name == "sockets":
            steps.append((name, args.clients[0] if args.clients_given else 1000, 0, 15))
        elif name == "burst":
            steps.append((name, args.clients[0] if args.clients_given else 8, args.requests or 30, 25))
        else:
            for clients in args.clients:
                requests = args.requests or {1: 300, 10: 600}.get(clients, 1000)
                steps.append((name, clients, requests, args.delay_ms))
    return steps


def print_row(summary: dict[str, object]) -> None:
    def cell(name: str, unit: str = "") -> str:
        value = summary.get(name)
        return "-" if value is None else f"{value}{unit}"

    print(
        f"{summary['scenario']:<8} {summary['clients']:>5} clients  {cell('req_s'):>7} req/s  "
        f"p50 {cell('p50_ms', ' ms'):>10}  p99 {cell('p99_ms', ' ms'):>10}  "
        f"first p50 {cell('first_event_p50_ms', ' ms'):>10}  first p99 {cell('first_event_p99_ms', ' ms'):>10}  "
        f"errors {summary['errors']:>4}  peak RSS {summary['peak_rss_mib']} MiB"
        + "".join(
            f"  {k} {summary[k]}"
            for k in (
                *("server_cpu_ms_per_op", "busiest_process_share", "queries_s", "complete_in_order", "all_done_s"),
                *("statuses", "rounds_with_overlapping_runs", "most_runs_at_once"),
            )
            if k in summary
        ),
        flush=True,
    )
    if summary["errors"]:
        print(f"         errors: {summary['error_kinds']}", flush=True)


async def run_plan(args: argparse.Namespace, env: dict[str, str]) -> None:
    key = "" if EXTERNAL else create_key()
    meta = {
        "commit": "external" if EXTERNAL else commit(args.source),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": args.server,
        "workers": args.workers,
        "database": args.database,
        "channel_layer": "redis" if env.get("REDIS_URL") else "in-memory",
        "label": args.label,
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items() if v), flush=True)
    for name, clients, requests, delay in plan(args):
        shared = not EXTERNAL and env.get("REDIS_URL")
        if shared:
            run_event_logs(env["REDIS_URL"], forget=True)
        server = external_server(args) if EXTERNAL else start_server(args, env, delay)
        try:
            result = await SCENARIOS[name](server, EXTERNAL.key if EXTERNAL else key, clients, requests)
        finally:
            if not EXTERNAL:
                server.stop()
        if shared:
            result.notes.update(run_event_logs(env["REDIS_URL"]))
        summary = {**result.summary(), "demo_delay_ms": delay}
        print_row(summary)
        if args.record:
            with RESULTS.open("a") as out:
                out.write(json.dumps({**meta, **summary}) + "\n")


def external_server(args: argparse.Namespace) -> Server:
    """A server this script did not start (`--external-port`): measured as it is, its RSS read by its port."""
    listening = subprocess.run(["ss", "-Hltnp", f"sport = :{args.external_port}"], capture_output=True, text=True)
    pid = int(listening.stdout.split("pid=")[1].split(",")[0])

    class Running:
        def __init__(self, pid: int) -> None:
            self.pid = pid

    return Server(Running(pid), args.external_port, Path("/dev/null"))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--server",
        default="serve",
        choices=["serve", "uvicorn", "daphne", "granian", "gunicorn"],
        help="serve: `python -m bankagent.serve`, as production runs (default); the others for comparison",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--database", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bankagent_bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/2")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run (default: all)")
    parser.add_argument("--clients", nargs="*", type=int, help="client counts (default 1 10 50)")
    parser.add_argument("--requests", type=int, help="operations per step (default 300/600/1000 by clients)")
    parser.add_argument("--delay-ms", type=int, default=0, help="demo model chunk pause for query/stream/create")
    parser.add_argument("--source", type=Path, default=ROOT, help="the project checkout to serve (default: this one)")
    parser.add_argument("--label", default="", help="a note stored with the results")
    parser.add_argument("--external-port", type=int, help="drive a server already running on this port instead")
    parser.add_argument("--external-key", default="development-api-key", help="its API key")
    parser.add_argument("--profile", help="record the servers with py-spy into PROFILE-N.txt (collapsed stacks)")
    parser.add_argument("--cprofile", help="run the server (one process) under cProfile, its stats into CPROFILE")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to results.jsonl")
    args = parser.parse_args()
    args.clients_given = bool(args.clients)
    args.clients = args.clients or [1, 10, 50]
    args.source = args.source.resolve()
    if args.external_port:
        global EXTERNAL
        EXTERNAL = External(args.external_port, args.external_key)
        args.server, args.workers, args.database = "external", 1, "external"
        asyncio.run(run_plan(args, {}))
        return
    env = prepare_environment(args)
    asyncio.run(run_plan(args, env))


if __name__ == "__main__":
    main()
