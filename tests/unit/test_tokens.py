"""Session tokens: signed, expiring, bound to one session."""

from __future__ import annotations

import pytest

from services.common.tokens import TokenError, mint_session_token, verify_session_token


def test_a_token_grants_its_session_until_it_expires() -> None:
    token = mint_session_token("k", "s1", ttl_s=60, now=1000.0)
    assert verify_session_token("k", token, now=1059.0) == "s1"
    with pytest.raises(TokenError, match="expired"):
        verify_session_token("k", token, now=1060.0)


def test_a_forged_or_garbled_token_is_refused() -> None:
    token = mint_session_token("k", "s1", ttl_s=60)
    with pytest.raises(TokenError, match="invalid"):
        verify_session_token("other-secret", token)
    payload, _, signature = token.partition(".")
    with pytest.raises(TokenError):
        verify_session_token("k", payload[:-2] + "xx." + signature)
    with pytest.raises(TokenError):
        verify_session_token("k", "garbage")
