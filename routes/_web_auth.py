"""Who is looking at a page: the session cookie's key, checked against the current config."""

from __future__ import annotations

from starlette.requests import Request

from core.config import ApiKey, Config
from core.errors import forbidden
from core.limits import check_key_usable
from routes._http import caller_ip, current_config
from routes._pages import read_form
from routes._session import SESSION_COOKIE, Session, SessionSigner, csrf_matches


class LoginRequired(Exception):
    """No valid session: pages answer with a redirect to the login form."""


def signer(request: Request) -> SessionSigner:
    value: SessionSigner = request.app.state.session_signer
    return value


def visitor(request: Request, config: Config) -> tuple[ApiKey, Session]:
    """The logged-in key, or LoginRequired (also when the key has left the config)."""
    session = signer(request).load(request.cookies.get(SESSION_COOKIE))
    key = config.keys_by_id.get(session.key_id) if session else None
    if session is None or key is None:
        raise LoginRequired()
    # A key disabled, expired or out of its allowed addresses after login loses its pages too.
    check_page_access(request, config, key)
    return key, session


def check_page_access(request: Request, config: Config, key: ApiKey) -> None:
    """The key's access rules that apply to its pages: enabled, expiry, addresses. Not
    `allowed_clients`, which is about API callers: it locked holders out of their usage page."""
    check_key_usable(key, request.app.state.clock(), caller_ip(request, config))


def admin_visitor(request: Request, config: Config) -> tuple[ApiKey, Session]:
    key, session = visitor(request, config)
    if not key.is_admin:
        raise forbidden("This page is for admins.", "admin_required")
    return key, session


async def admin_form(request: Request) -> tuple[Config, ApiKey, Session, dict[str, str]]:
    """The admin, the session and the posted form, whose CSRF token must be the session's."""
    config = current_config(request)
    admin, session = admin_visitor(request, config)
    form = await read_form(request)
    if not csrf_matches(session.csrf, form.get("csrf_token")):
        raise forbidden("The form expired; please reload the page and try again.", "bad_csrf")
    return config, admin, session, form
