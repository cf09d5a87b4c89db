"""Serve the application as production does: granian on uvloop, WEB_CONCURRENCY worker processes.

    python -m bankagent.serve [--host 0.0.0.0] [--port 8000] [--workers N]

The workers share PostgreSQL and Redis: a run's events and cancels reach every worker through the channel layer.
granian, rather than uvicorn or daphne, because it spreads connections evenly over its workers: with a shared
listening socket a few keep-alive clients can all land on one worker (bench/README.md has the figures).
"""

import argparse
import os

from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from granian.log import LogLevels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def env_int(name: str, default: int) -> int:
        value = os.environ.get(name) or str(default)
        if not value.isdigit() or int(value) < 1:
            parser.error(f"{name} must be a positive whole number, not {value!r}.")
        return int(value)

    shared = bool(os.environ.get("REDIS_URL"))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env_int("PORT", 8000))
    parser.add_argument(
        "--workers",
        type=int,
        default=env_int("WEB_CONCURRENCY", (os.cpu_count() or 1) if shared else 1),
        help="worker processes (default: WEB_CONCURRENCY, else the number of cores with REDIS_URL, else 1)",
    )
    args = parser.parse_args()
    if args.workers > 1 and not shared:
        # Without Redis each worker would keep its own events, cancels, tickets and rate limits.
        parser.error("Several workers share runs, tickets and rate limits through Redis: set REDIS_URL, or serve one.")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")

    Granian(
        "bankagent.asgi:application",
        address=args.host,
        port=args.port,
        # The application handles HTTP and websockets; it has nothing to do at start-up or shut-down.
        interface=Interfaces.ASGINL,
        workers=args.workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=True,
        backlog=4096,
        # Connections a worker serves at once: every websocket holds one, so this is well above RUN_CONCURRENCY.
        backpressure=8192,
        log_level=LogLevels.warning,
        respawn_failed_workers=True,
        workers_kill_timeout=30,
    ).serve()


if __name__ == "__main__":
    main()
