"""Deployment: `manage.py check --deploy` sees the project's middleware for what it is, the https settings come from
the environment and apply to requests, and a server worker does not outlive its master."""

import contextlib
import os
import re
import secrets
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.checks import Tags, run_checks
from django.db import connection
from django.test import Client

from tests.live import ROOT, LiveServer, poll, server_command, server_env

WORKER_EXIT_TIMEOUT = 60  # seconds for an orphaned worker to notice and stop: generous, it takes well under one
NEEDS_POSTGRESQL = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs PostgreSQL, which the server process shares"
)

# What a deployment behind a TLS-terminating proxy sets.
PRODUCTION = {
    "DJANGO_DEBUG": "off",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_ALLOWED_HOSTS": "bankagent.example.com",
    "DJANGO_SECURE_COOKIES": "on",
    "DJANGO_HSTS_SECONDS": "31536000",
    "DJANGO_HSTS_INCLUDE_SUBDOMAINS": "on",
    "DJANGO_HSTS_PRELOAD": "on",
    "DJANGO_SSL_REDIRECT": "on",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "on",
}


def manage(*args: str, **changes: str | None) -> subprocess.CompletedProcess:
    """`manage.py *args` with the production environment, `changes` set (or, given None, unset)."""
    env = {**os.environ, "DATABASE_URL": "sqlite:///:memory:", **PRODUCTION}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def reported(output: str) -> set[str]:
    """The ids of the checks' messages in a `check` command's output."""
    return set(re.findall(r"\((\w+\.[A-Z]\d+)\)", output))


# Django's deployment checks


def test_a_production_environment_passes_check_deploy():
    checked = manage("check", "--deploy", "--fail-level", "WARNING")

    assert checked.returncode == 0, checked.stderr
    assert "System check identified no issues" in checked.stdout
    assert reported(checked.stdout + checked.stderr) == set()


@pytest.mark.parametrize(
    ("name", "value", "warning"),
    [
        ("DJANGO_HSTS_SECONDS", None, "security.W004"),
        ("DJANGO_SSL_REDIRECT", "off", "security.W008"),
        ("DJANGO_HSTS_PRELOAD", None, "security.W021"),
    ],
)
def test_check_deploy_runs_djangos_checks_of_the_security_middleware_on_the_settings(name, value, warning):
    checked = manage("check", "--deploy", "--fail-level", "WARNING", **{name: value})

    assert checked.returncode == 1
    assert reported(checked.stderr) == {warning}


def deploy_warnings() -> list[str]:
    """The ids `check --deploy` reports of the security checks (it leaves out the silenced ones)."""
    messages = run_checks(tags=[Tags.security], include_deployment_checks=True)
    return [message.id for message in messages if not message.is_silenced()]


def test_a_csrf_cookie_sent_over_http_is_reported(settings):
    settings.CSRF_COOKIE_SECURE = False

    assert "security.W016" in deploy_warnings()


def test_x_frame_options_other_than_deny_is_reported(settings):
    settings.X_FRAME_OPTIONS = "SAMEORIGIN"

    assert "security.W019" in deploy_warnings()


def test_a_security_middleware_missing_altogether_is_still_reported(settings):
    settings.MIDDLEWARE = [path for path in settings.MIDDLEWARE if not path.endswith(".SecurityMiddleware")]

    warnings = deploy_warnings()

    assert "bankagent.W001" in warnings
    assert "security.W001" not in warnings  # silenced: it misreads the project's own middleware


def test_djangos_own_middleware_listed_by_name_is_reported_once(settings):
    settings.MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware" if path.endswith(".SecurityMiddleware") else path
        for path in settings.MIDDLEWARE
    ]
    settings.SECURE_HSTS_SECONDS = 0

    assert deploy_warnings().count("security.W004") == 1


# The https settings, from the environment


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DJANGO_HSTS_SECONDS", "1y", "DJANGO_HSTS_SECONDS must be a whole number of at least 0, not '1y'"),
        ("DJANGO_HSTS_SECONDS", "-1", "DJANGO_HSTS_SECONDS must be a whole number of at least 0, not '-1'"),
        ("DJANGO_SSL_REDIRECT", "sometimes", "DJANGO_SSL_REDIRECT must be on or off, not 'sometimes'"),
        ("DJANGO_SECURE_PROXY_SSL_HEADER", "https", "DJANGO_SECURE_PROXY_SSL_HEADER must be on or off, not 'https'"),
    ],
)
def test_a_malformed_https_setting_stops_start_up_naming_the_variable(name, value, expected):
    checked = manage("check", **{name: value})

    assert checked.returncode == 1
    assert f"ImproperlyConfigured: {expected}" in checked.stderr


# Run in a process of its own, whose settings come from the production environment: a request over plain http, one
# from the proxy (X-Forwarded-Proto: https), and a health probe sent straight to the process over http.
REQUESTS = """
from django.test import Client
client = Client(HTTP_HOST="bankagent.example.com")
for path, headers in [
    ("/api/v1/threads", {}),
    ("/api/v1/threads", {"X-Forwarded-Proto": "https"}),
    ("/api/v1/health", {}),
]:
    response = client.get(path, headers=headers)
    print(response.status_code, response.get("Location"), response.get("Strict-Transport-Security"))
"""


def test_behind_the_proxy_plain_http_is_redirected_and_https_gets_hsts_but_the_health_probe_is_answered():
    shell = manage("shell", "--no-imports", "-c", REQUESTS)

    assert shell.returncode == 0, shell.stderr
    plain, proxied, probe = shell.stdout.splitlines()
    assert plain == "301 https://bankagent.example.com/api/v1/threads None"
    assert proxied == "401 None max-age=31536000; includeSubDomains; preload"
    assert probe.split()[1:] == ["None", "None"]  # answered (200, or 503 on this empty database), not redirected


@pytest.mark.django_db
def test_by_default_plain_http_is_served_without_redirect_or_hsts():
    response = Client().get("/api/v1/health")

    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response


# A worker whose master dies


def children(pid: int) -> list[int]:
    """The processes `pid` started, from any of its threads."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()]


@contextlib.contextmanager
def exit_of(pid: int) -> Iterator[Callable[[float], bool]]:
    """Whether process `pid` (no child of ours) exits within a timeout, waited for without polling."""
    pidfd = os.pidfd_open(pid)
    try:
        yield lambda timeout: bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@NEEDS_POSTGRESQL
@pytest.mark.django_db(transaction=True)
def test_a_serving_worker_stops_when_its_master_is_killed(tmp_path):
    server = LiveServer("granian", server_env(), tmp_path / "granian.log")
    server.start()
    try:
        assert server.process is not None
        [worker] = children(server.process.pid)
        with exit_of(worker) as exits_within:
            server.process.kill()  # the master alone, as an out-of-memory kill would
            server.process.wait()
            assert exits_within(WORKER_EXIT_TIMEOUT), f"the worker outlived its master: {server.log_tail()}"
        assert not accepts_connections(server.port)
    finally:
        server.stop()  # its process group: a worker that outlived its master too


@NEEDS_POSTGRESQL
@pytest.mark.django_db(transaction=True)
def test_a_worker_still_loading_the_application_stops_at_once_when_its_master_is_killed(tmp_path):
    server = LiveServer("granian", server_env(), tmp_path / "granian.log")
    with open(server.log, "ab") as log:
        server.process = subprocess.Popen(
            server_command("granian", server.port),
            cwd=ROOT,
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        [worker] = poll(lambda: children(server.process.pid), timeout=30)  # forked, and importing Django
        with exit_of(worker) as exits_within:
            server.process.kill()
            server.process.wait()
            assert exits_within(WORKER_EXIT_TIMEOUT), f"the worker outlived its master: {server.log_tail()}"
        # Stopped by its SIGTERM, not killed at the deadline it gives a stop that hangs.
        assert "killing it" not in server.log_tail()
    finally:
        server.stop()
