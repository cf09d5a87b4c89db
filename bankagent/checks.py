"""Django's deployment checks of the security, CSRF and clickjacking middleware, run on the project's own.

settings.MIDDLEWARE lists bankagent.middleware's subclasses of Django's middleware. Django's checks look for the stock
dotted names: they warn that the three are missing (security.W001-W003, silenced in settings for that reason) and
skip every check of what those middleware apply (HSTS, the SSL redirect, X-Frame-Options, the CSRF cookie, ...).
"""

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, register
from django.core.checks import Warning as CheckWarning
from django.core.checks.security import base, csrf
from django.utils.module_loading import import_string

STOCK_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
)
# Django's deployment checks whose outcome depends on whether one of those is installed. The session cookie's are not
# among them: Django checks it because django.contrib.sessions is installed, whatever the middleware.
MIDDLEWARE_CHECKS = (
    base.check_security_middleware,
    base.check_xframe_options_middleware,
    csrf.check_csrf_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_xframe_deny,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_cookie_secure,
)
SILENCED = {"security.W001", "security.W002", "security.W003"}


def as_installed(middleware: list[str]) -> list[str]:
    """`middleware`, and the dotted name of each of Django's three that one of them is, or subclasses."""
    classes = [import_string(path) for path in middleware]
    return [
        *middleware,
        *(
            stock
            for stock in STOCK_MIDDLEWARE
            if stock not in middleware and any(issubclass(cls, import_string(stock)) for cls in classes)
        ),
    ]


def _run(app_configs: Any) -> list[CheckMessage]:
    return [message for check in MIDDLEWARE_CHECKS for message in check(app_configs)]


@register(Tags.security, deploy=True)
def check_middleware_as_installed(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Django's checks of the three middleware, as they would run had the stock ones been listed."""
    # Imported here: only `check --deploy` needs it, not every process that loads the checks. It swaps the settings of
    # the whole process, which is fine in a management command, the one place deployment checks run.
    from django.test.utils import override_settings

    seen_by_django = _run(app_configs)
    with override_settings(MIDDLEWARE=as_installed(settings.MIDDLEWARE)):
        found = _run(app_configs)
    return [
        # Really missing (neither the stock middleware nor a subclass): reported under an id that is not silenced.
        CheckWarning(message.msg, hint="Nor is a subclass of it.", id=message.id.replace("security.", "bankagent."))
        if message.id in SILENCED
        else message
        for message in found
        if message.id in SILENCED or message not in seen_by_django
    ]
