"""What every web page shares: the templates, the security headers, rendering, form reading."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

from core.admin_actions import config_error_message
from core.config import ApiKey
from core.config.reload import ConfigStore
from core.errors import GatewayError
from core.money_format import count_text, usd_text
from routes.web_views import MESSAGES, when

WEB = Path(__file__).resolve().parent.parent / "web"
MAX_FORM_BYTES = 16 * 1024

# auto_reload off: the templates ship with the code, so no stat() of the file per page.
templates = Environment(loader=FileSystemLoader(WEB / "templates"), autoescape=True, auto_reload=False)
# Every page formats money and counts the same way (core/money_format.py): `{{ nanos|money }}`.
templates.filters["money"] = usd_text
templates.filters["number"] = count_text


def compile_templates() -> None:
    """Compile every template at start-up rather than on the first page that needs it."""
    for name in templates.list_templates():
        templates.get_template(name)


# Pages load only our own stylesheet: no scripts, no inline styles, no framing, forms post
# only back to us; a stolen page cannot be embedded, sniffed into another type or cached.
CSP = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    # `nonce` makes each rendered top-up form a one-time idempotency key: a double submit applies once.
    me = context.get("me")
    banner = _config_error(request, me)
    warnings = _config_warnings(request, me)
    html = templates.get_template(name).render(request=request, nonce=secrets.token_urlsafe(12), config_error=banner, config_warnings=warnings, **context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def with_scripts(response: HTMLResponse) -> HTMLResponse:
    """A page that runs our own script files (none inline): the one showing a new secret, for
    its Copy button. Every other page keeps the policy without scripts."""
    response.headers["Content-Security-Policy"] = CSP.replace("default-src 'none';", "default-src 'none'; script-src 'self';")
    return response


def _config_error(request: Request, me: ApiKey | None) -> dict[str, str] | None:
    """The last failed reload, for the banner every admin page shows (key holders don't see it)."""
    store: ConfigStore = request.app.state.store
    error = store.last_error if me is not None and me.is_admin else None
    return None if error is None else {"message": error.message, "at": when(error.at)}


def _config_warnings(request: Request, me: ApiKey | None) -> list[str]:
    """What the config in force says that is not done as written (`file:line:column: reason`),
    for admins: a uni-api user sees which of their options Tollgate ignores."""
    if me is None or not me.is_admin:
        return []
    store: ConfigStore = request.app.state.store
    return [str(warning) for warning in store.file_config.warnings]


def flash_message(request: Request) -> str | None:
    """The message for `?done=` or `?error=`; a config that does not load is told in full
    (where it is wrong), read from the store rather than from the URL."""
    params = request.query_params
    code = params.get("done") or params.get("error") or ""
    error = request.app.state.store.last_error
    if code == "config_invalid" and error is not None:
        return config_error_message(error)
    return MESSAGES.get(code)


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form, size-capped (no multipart needed for these pages)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise GatewayError(413, "invalid_request_error", "request_too_large", "Form too large.")
    # Blank fields are kept: an emptied settings field means "remove this setting".
    return {name: values[0] for name, values in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)
