"""Short-lived session tokens: what lets a browser or phone bridge open the WebSocket of one
conversation without holding an API key. HMAC-SHA256 over {session id, expiry}, keyed by
ECHOX_TOKEN_SECRET (every replica of the API and gateway must share it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time


class TokenError(Exception):
    """The token is malformed, forged, or expired."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_session_token(secret: str, session_id: str, ttl_s: float, now: float | None = None) -> str:
    payload = _b64(json.dumps({"sid": session_id, "exp": int((now or time.time()) + ttl_s)}).encode())
    signature = _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def verify_session_token(secret: str, token: str, now: float | None = None) -> str:
    """The session id the token grants, or TokenError."""
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())
    if not payload or not hmac.compare_digest(signature, expected):
        raise TokenError("invalid session token")
    try:
        claims = json.loads(_unb64(payload))
        session_id, expires = str(claims["sid"]), int(claims["exp"])
    except (ValueError, KeyError, TypeError):
        raise TokenError("malformed session token") from None
    if (now or time.time()) >= expires:
        raise TokenError("the session token has expired")
    return session_id
