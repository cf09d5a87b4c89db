"""Serve the application as production does: granian on uvloop, WEB_CONCURRENCY worker processes.

    python -m bankagent.serve [--host 0.0.0.0] [--port 8000] [--workers N]

The workers share PostgreSQL and Redis: a run's events and cancels reach every worker through the channel layer,
and a directory of metrics files (PROMETHEUS_MULTIPROC_DIR), which any worker's `/metrics` adds up.
granian, rather than uvicorn or daphne, because it spreads connections evenly over its workers: with a shared
listening socket a few keep-alive clients can all land on one worker (bench/README.md has the figures). A worker
stops by itself when its master dies.
"""

import argparse
import contextlib
import functools
import glob
import logging
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from granian import Granian
from granian.constants import HTTPModes, Interfaces, Loops
from granian.log import LogLevels

logger = logging.getLogger("bankagent.serve")  # not __main__, as `python -m` names it

# How long a worker has to stop by itself before it is killed.
WORKERS_KILL_TIMEOUT = 30


def load_application(master: int, metrics: str | None = None) -> Any:
    """The application, loaded in each worker as it starts; a worker process watches its master, `master` (and
    removes the master's directory of metrics, `metrics`, if the master dies without doing so)."""
    if os.getpid() != master:  # granian on a free-threaded Python runs its workers as threads of the master
        # A forked worker starts with the master's SIGTERM handler, which only flags the master's copy of its state:
        # until granian sets the worker's own, once the application is loaded, a SIGTERM would be lost. Stopped
        # while it starts, the worker has nothing to finish.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        watch_master(master, metrics)
    from bankagent.asgi import application

    return application


def watch_master(master: int, metrics: str | None = None) -> None:
    """Stop this worker once `master` has exited.

    granian's master stops its workers when it stops; killed (SIGKILL, an out-of-memory kill), it cannot, and a worker
    would go on serving on the port beside the next server. A thread waits on a pidfd, which becomes readable when the
    master exits: nothing runs until then, and nothing is added to a request. (PR_SET_PDEATHSIG would do as well, as
    granian forks its workers from its main thread, but needs ctypes and offers no deadline for a stop that hangs.)
    """
    try:
        exited = os.pidfd_open(master)
    except ProcessLookupError:
        exited = None  # gone already
    except (AttributeError, OSError):
        logger.warning("No pidfd on this system: worker %s will not stop by itself if its master dies", os.getpid())
        return
    # Dead before it was opened, its pid may name another process by now: then it is not the parent any more.
    if exited is not None and os.getppid() != master:
        os.close(exited)
        exited = None
    threading.Thread(target=_stop_when_exited, args=(exited, metrics), name="master-watch", daemon=True).start()


def _stop_when_exited(exited: int | None, metrics: str | None) -> None:
    if exited is not None:
        select.select([exited], [], [])
    logger.error("The master process is gone: worker %s stops", os.getpid())
    if metrics is not None:  # the master's to remove as it stops; every worker is stopping with it
        shutil.rmtree(metrics, ignore_errors=True)
    # What the master would send: granian's worker closes its connections and its event loop ends.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(WORKERS_KILL_TIMEOUT)
    logger.error("Worker %s did not stop in %d s: killing it", os.getpid(), WORKERS_KILL_TIMEOUT)
    os.kill(os.getpid(), signal.SIGKILL)


def metrics_dir() -> str | None:
    """Give the workers a directory for their metrics files, without a file of an earlier server in it: the
    operator's PROMETHEUS_MULTIPROC_DIR (created if need be), or a fresh private one, whose path is returned for
    `main` to remove once the server stops. Set before prometheus_client is first imported, which is when the
    library decides to write values to files."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, mode=0o700, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return None
    _remove_dead_servers_dirs()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made = tempfile.mkdtemp(prefix=f"{PRIVATE_METRICS}{os.getpid()}-")
    return made


PRIVATE_METRICS = "bankagent-metrics-"
"""The private directory's name, before its server's pid."""


def _remove_dead_servers_dirs() -> None:
    """Remove the private directories of servers killed with all their workers at once (nothing of theirs was left
    to remove them)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{PRIVATE_METRICS}*-*")):
        pid = os.path.basename(path).removeprefix(PRIVATE_METRICS).split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


class Server(Granian):  # type: ignore[misc, valid-type]
    """granian's server, which forgets an exited worker's gauges of live values (runs in flight, open sockets):
    the files of a worker killed or respawned would otherwise count its runs and sockets for ever. Its counters
    and histograms stay: they go on counting what it served."""

    def _spawn_worker(self, *args: Any, **kwargs: Any) -> Any:
        worker = super()._spawn_worker(*args, **kwargs)
        wait_for_exit = worker._watcher  # granian's thread a worker: it returns once the worker has exited

        def forget_when_exited() -> None:
            wait_for_exit()
            from prometheus_client import multiprocess  # here: imported in the master, it is not before main()

            with contextlib.suppress(OSError):  # the directory went with the server
                multiprocess.mark_process_dead(worker._id())

        worker._watcher = forget_when_exited
        return worker


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
    made = metrics_dir()
    try:
        serve(args, made)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def serve(args: argparse.Namespace, metrics: str | None) -> None:
    Server(
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
        workers_kill_timeout=WORKERS_KILL_TIMEOUT,
    ).serve(target_loader=functools.partial(load_application, os.getpid(), metrics), wrap_loader=False)


if __name__ == "__main__":
    main()
