"""Streaming benchmark against a real daphne process.

1. time to first event and to first text_delta of POST /api/v1/agent/stream (demo model, fixed chunk delay);
2. per-event overhead of the HTTP stream over iterating the same agent stream in-process (delay 0);
3. concurrent websocket streams held by one daphne process: lost or misordered events, and its memory.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bankagent_bench REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/streaming.py --sockets 1000

Without DATABASE_URL a temporary SQLite file is used. The database is migrated and filled with threads.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "benchmark-only-secret-key")
os.environ["AGENT_MODEL"] = "demo"

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.core.management import call_command  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from agents.bank_support import support_agent, support_deps  # noqa: E402
from agents.demo import build_demo_model  # noqa: E402
from identity.models import APIKey  # noqa: E402
from threads.models import Thread  # noqa: E402

USER_ID = "123e4567-e89b-12d3-a456-426614174000"
STORY = "Tell me a story"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_daphne(delay_ms: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "DEMO_MODEL_DELAY_MS": str(delay_ms), "LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "bankagent.asgi:application"]
    log = open(Path(tempfile.gettempdir()) / f"bench-daphne-{port}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1)
            return process, port
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("daphne did not start")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def new_thread(agent_type: str = "bank_support") -> str:
    return str(Thread.objects.create(user_id=USER_ID, agent_type=agent_type).id)


async def http_stream(port: int, key: str, thread_id: str, query: str) -> list[tuple[float, dict]]:
    """(seconds since the request was sent, event) for every NDJSON line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"thread_id": thread_id, "query": query}).encode()
    started = time.perf_counter()
    writer.write(
        b"POST /api/v1/agent/stream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"X-API-Key: {key}\r\nX-User-ID: {USER_ID}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    events, buffer = [], b""
    while not events or events[-1][1]["event"] != "done":
        chunk = await reader.read(65536)
        if not chunk:
            break
        buffer += chunk
        for line in buffer.split(b"\n")[:-1]:
            line = line.strip()
            if line.startswith(b"{"):
                events.append((time.perf_counter() - started, json.loads(line)))
        buffer = buffer.split(b"\n")[-1]
    writer.close()
    return events


async def in_process_events(query: str) -> tuple[float, int]:
    """Seconds to iterate the same agent stream in-process (delay 0), and how many partial outputs it gave."""
    deps = await support_deps(USER_ID)
    started = time.perf_counter()
    count = 0
    async with support_agent.run_stream(query, deps=deps, model=build_demo_model(delay_ms=0)) as result:
        async for _ in result.stream_output(debounce_by=None):
            count += 1
    return time.perf_counter() - started, count


async def first_event_latency(key: str, delay_ms: int, runs: int) -> None:
    process, port = start_daphne(delay_ms)
    try:
        first, first_delta = [], []
        for _ in range(runs):
            thread_id = await sync_to_async(new_thread)()
            events = await http_stream(port, key, thread_id, "I lost my card")
            first.append(events[0][0] * 1000)
            first_delta.append(next(t for t, e in events if e["event"] == "text_delta") * 1000)
        print(
            f"time to first event (message_created), {delay_ms} ms chunk delay, {runs} runs: "
            f"median {statistics.median(first):.1f} ms; "
            f"to first text_delta: median {statistics.median(first_delta):.1f} ms"
        )
    finally:
        process.terminate()
        process.wait()


async def per_event_overhead(key: str, runs: int) -> None:
    process, port = start_daphne(0)
    try:
        http_times, in_process_times, deltas = [], [], 0
        for _ in range(runs):
            thread_id = await sync_to_async(new_thread)()
            events = await http_stream(port, key, thread_id, STORY)
            deltas = sum(1 for _, e in events if e["event"] == "text_delta")
            http_times.append(events[-1][0])
            in_process_times.append((await in_process_events(STORY))[0])
        http, local = statistics.median(http_times), statistics.median(in_process_times)
        print(
            f"long answer, delay 0, {runs} runs: HTTP stream {http * 1000:.1f} ms for {deltas} text_deltas, "
            f"in-process iteration {local * 1000:.1f} ms: overhead {(http - local) / deltas * 1000:.2f} ms per event "
            "(including the run's fixed database work)"
        )
    finally:
        process.terminate()
        process.wait()


async def one_socket(url: str, headers: dict, connected: list, ready: asyncio.Event, gate: asyncio.Semaphore) -> list:
    # Clients connect over time, not in one instant: a burst of a thousand overflows the listen backlog.
    async with gate:
        ws = await connect(url, additional_headers=headers, open_timeout=60)
    connected.append(url)
    async with ws:
        await ready.wait()
        await ws.send(json.dumps({"type": "query", "query": "I lost my card"}))
        events = []
        while not events or events[-1]["event"] != "done":
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 300)))
        return events


def well_ordered(events: list[dict], final_token: str) -> bool:
    """In order and whole. Under load a socket may get fewer, larger deltas (tokens are cumulative partial
    outputs, validated as fast as the process gets to them), but never a shrinking one, and the last is whole."""
    names = [e["event"] for e in events]
    deltas = [e["token"] for e in events if e["event"] == "text_delta"]
    lengths = [len(json.loads(token).get("support_advice", "")) for token in deltas]
    return (
        names[:2] == ["message_created", "message_started"]
        and names[-2:] == ["message_complete", "done"]
        and set(names[2:-2]) == {"text_delta"}
        and lengths == sorted(lengths)
        and deltas[-1] == final_token
    )


async def concurrent_sockets(key: str, sockets: int, delay_ms: int) -> None:
    threads = await sync_to_async(lambda: [new_thread() for _ in range(sockets)])()
    process, port = start_daphne(delay_ms)
    try:
        reference = await http_stream(port, key, await sync_to_async(new_thread)(), "I lost my card")
        final_token = [e["token"] for _, e in reference if e["event"] == "text_delta"][-1]
        idle = rss_mib(process.pid)
        headers = {"X-API-Key": key, "X-User-ID": USER_ID}
        ready, connected, gate = asyncio.Event(), [], asyncio.Semaphore(50)
        tasks = [
            asyncio.create_task(
                one_socket(f"ws://127.0.0.1:{port}/ws/v1/threads/{t}/", headers, connected, ready, gate)
            )
            for t in threads
        ]
        while len(connected) < sockets and not any(task.done() for task in tasks):
            await asyncio.sleep(0.2)
        connected_rss = rss_mib(process.pid)
        started = time.perf_counter()
        ready.set()
        peak = connected_rss
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0.2)
            peak = max(peak, rss_mib(process.pid))
        elapsed = time.perf_counter() - started
        deltas = sum(sum(1 for e in t.result() if e["event"] == "text_delta") for t in tasks if not t.exception())
        failures = [task.exception() for task in tasks if task.exception()]
        good = sum(1 for task in tasks if not task.exception() and well_ordered(task.result(), final_token))
        print(
            f"{sockets} concurrent websocket streams on one daphne "
            f"({delay_ms} ms chunk delay, {deltas / max(len(tasks), 1):.1f} text_deltas per stream on average): "
            f"{good} complete and in order, {sockets - good} lost or misordered, {len(failures)} errors; "
            f"all done in {elapsed:.1f} s after the queries were sent; "
            f"RSS idle {idle:.0f} MiB, {connected_rss:.0f} MiB with {len(connected)} sockets open, peak {peak:.0f} MiB"
        )
        if failures:
            print("first error:", repr(failures[0]))
        bad = next((t.result() for t in tasks if not t.exception() and not well_ordered(t.result(), final_token)), None)
        if bad:
            names = [e["event"] for e in bad]
            print("first bad stream:", names[:3], "...", names[-3:], f"{names.count('text_delta')} text_deltas")
    finally:
        process.terminate()
        process.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=int, default=20, help="demo model chunk delay for 1 and 3 (default 20)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sockets", type=int, default=1000)
    args = parser.parse_args()

    await sync_to_async(call_command)("migrate", verbosity=0)
    _, key = await sync_to_async(APIKey.objects.create_key)(name="streaming bench")
    layer = "redis" if os.environ.get("REDIS_URL") else "in-memory"
    print(f"database: {django.db.connection.vendor}; channel layer: {layer}")
    if args.runs:
        await first_event_latency(key, args.delay_ms, args.runs)
        await per_event_overhead(key, args.runs)
    await concurrent_sockets(key, args.sockets, args.delay_ms)


if __name__ == "__main__":
    asyncio.run(main())
