"""Signed session cookies and CSRF tokens for the web pages (stdlib HMAC, no server state).

The cookie holds the key's ledger id (a hash, never the key), a CSRF token and an expiry,
signed with a secret kept in the ledger database so sessions survive restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

SESSION_COOKIE = "tollgate_session"
LOGIN_CSRF_COOKIE = "tollgate_login_csrf"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    key_id: str
    csrf: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    def __init__(self, secret: str):
        self._secret = secret.encode()

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def dump(self, session: Session) -> str:
        payload = _b64(json.dumps({"k": session.key_id, "c": session.csrf, "e": session.expires}).encode())
        return f"{payload}.{self._sign(payload)}"

    def load(self, cookie: str | None) -> Session | None:
        """The session in a cookie we signed; None for anything else (what we sign is ASCII,
        and compare_digest refuses non-ASCII text with a TypeError)."""
        if not cookie or "." not in cookie or not cookie.isascii():
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(str(data["k"]), str(data["c"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None


def new_session(key_id: str) -> Session:
    return Session(key_id, secrets.token_urlsafe(24), time.time() + SESSION_SECONDS)


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    """HttpOnly and SameSite=Strict always; Secure when the page is served over HTTPS."""
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict", secure=secure)


def csrf_matches(expected: str | None, presented: str | None) -> bool:
    """Our tokens are ASCII: a non-ASCII one cannot match (and compare_digest would raise on it)."""
    if not expected or not presented or not expected.isascii() or not presented.isascii():
        return False
    return hmac.compare_digest(expected, presented)
