"""Serve the application as production does: uvicorn (uvloop, httptools), WEB_CONCURRENCY worker processes.

    python -m bankagent.serve [--host 0.0.0.0] [--port 8000] [--workers N]

The workers share PostgreSQL and Redis: a run's events and cancels reach every worker through the channel layer.
The server's own websocket frame limit is the project's hard limit (settings.WS_MAX_FRAME_BYTES): a larger frame
is refused with close code 1009 before it is read whole.
"""

import argparse
import os

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1),
        help="worker processes (default: WEB_CONCURRENCY, else the number of cores)",
    )
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bankagent.settings")
    from django.conf import settings

    uvicorn.run(
        "bankagent.asgi:application",
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        ws="websockets",
        ws_max_size=settings.WS_MAX_FRAME_BYTES,
        lifespan="off",
        access_log=False,
        backlog=4096,
        # Behind a proxy (docker-compose, a load balancer), trust its X-Forwarded-* headers.
        proxy_headers=True,
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
