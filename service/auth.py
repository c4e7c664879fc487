"""API keys with scopes. Keys are looked up by their sha256, so the secret is never compared or
kept in the clear beyond settings; records carry the key's `name`.

Looking a digest up in a dict is safe against timing: what a lookup's time can reveal is how
much of a guess's sha256 matches a stored one's, which says nothing of the key (finding a key
whose digest starts a given way is a preimage search)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from service.errors import Forbidden, Unauthenticated
from service.settings import ApiKey, Scope

ALL_SCOPES: frozenset[Scope] = frozenset({"chat", "feedback", "admin"})


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def require(self, scope: Scope) -> Principal:
        if scope not in self.scopes and not self.is_admin:
            raise Forbidden(f"this API key lacks the '{scope}' scope", code="insufficient_scope")
        return self


# With no keys configured the service binds to loopback only, and every caller is this one.
LOCAL = Principal("local", ALL_SCOPES)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Authenticator:
    def __init__(self, keys: list[ApiKey]):
        self._by_digest = {
            _digest(k.key.get_secret_value()): Principal(k.name, frozenset(k.scopes)) for k in keys
        }

    def __call__(self, token: str | None) -> Principal:
        """The holder of bearer `token` (None: the request sent no bearer token)."""
        if not self._by_digest:
            return LOCAL
        if not token:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:
            raise Unauthenticated("invalid API key", code="invalid_api_key")
        return principal
