"""Who may call the HTTP API: bearer tokens with a role and a tenant, a request rate per token, and
the audit of every config change.

A token is ``aic_<id>_<secret>``: the id finds its row, the secret is checked against a SHA-256
digest (the secret is 256 random bits, so a slow hash would add nothing; the database never holds
a token that works).  Tokens are made, listed and revoked with ``aic token``, which writes the
``api_tokens`` table directly; the token itself is printed once.

========  ====================================================================================
role      may
========  ====================================================================================
viewer    read metrics, summaries, bandwidth and configs of its tenant's streams
operator  what a viewer may, and set its tenant's stream configs
admin     everything, for every tenant (``--tenant '*'``), and read the audit of config changes
========  ====================================================================================

A token's tenant confines it: a stream id of another tenant is refused (403) and listings hold
only its tenant's rows.  ``/healthz`` and ``/readyz`` need no token; ``/metrics`` needs one unless
the service runs with ``--open-metrics``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg

from shared.schemas import DEFAULT_TENANT, check_tenant, tenant_of

ROLES = ("viewer", "operator", "admin")
ALL_TENANTS = "*"
PREFIX = "aic_"
#: Requests per second per token, and the burst a token may spend at once (``AIC_API_RATE``).
DEFAULT_RATE = 20.0
BURST_SECONDS = 2.0


@dataclass(frozen=True)
class Token:
    id: str
    name: str
    role: str
    tenant: str  # a tenant, or ALL_TENANTS (admins only)
    expires_at: datetime | None

    def may(self, role: str) -> bool:
        """Whether this token's role includes ``role``'s rights."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def reaches(self, stream_id: str) -> bool:
        return self.tenant == ALL_TENANTS or tenant_of(stream_id) == self.tenant

    @property
    def tenant_filter(self) -> str | None:
        """The tenant a listing is confined to (None: every tenant)."""
        return None if self.tenant == ALL_TENANTS else self.tenant


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(spec: str) -> timedelta:
    """``90d``, ``12h``, ``30m`` → a timedelta."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        value = float(spec[:-1])
        if value <= 0 or spec[-1] not in units:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"duration {spec!r}: expected a number and d, h, m or s, e.g. 90d") from None
    return timedelta(seconds=value * units[spec[-1]])


async def create_token(conn: asyncpg.Connection, role: str, tenant: str = DEFAULT_TENANT,
                       expires_in: timedelta | None = timedelta(days=90), name: str = "") -> tuple[Token, str]:
    """A new token: its row, and the token itself (shown once; only its digest is kept)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    if tenant == ALL_TENANTS:
        if role != "admin":
            raise ValueError("only an admin token serves every tenant ('*'); name a tenant for this one")
    elif tenant != DEFAULT_TENANT:
        check_tenant(tenant)
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    expires = datetime.now(timezone.utc) + expires_in if expires_in else None
    await conn.execute("INSERT INTO api_tokens (id, digest, name, role, tenant, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                       token_id, digest(secret), name[:200], role, tenant, expires)
    return Token(token_id, name, role, tenant, expires), f"{PREFIX}{token_id}_{secret}"


async def revoke_token(conn: asyncpg.Connection, token_id: str) -> bool:
    done = await conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id)
    return done.endswith(" 1")


async def list_tokens(conn: asyncpg.Connection) -> list[dict]:
    rows = await conn.fetch("SELECT id, name, role, tenant, created_at, expires_at, revoked_at FROM api_tokens "
                            "ORDER BY created_at")
    return [dict(r) for r in rows]


async def verify(conn, presented: str) -> Token | None:
    """The token ``presented`` is, if it is one that works now (known, secret right, not revoked, not expired)."""
    if not presented.startswith(PREFIX) or len(presented) > 200:
        return None
    token_id, _, secret = presented[len(PREFIX):].partition("_")
    row = await conn.fetchrow("SELECT * FROM aic_token($1)", token_id)  # (the API's role reads no digest table)
    if row is None or not hmac.compare_digest(row["digest"], digest(secret)):
        return None
    if row["revoked_at"] is not None or (row["expires_at"] is not None and row["expires_at"] <= datetime.now(timezone.utc)):
        return None
    return Token(token_id, row["name"], row["role"], row["tenant"], row["expires_at"])


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second on average, ``rate * BURST_SECONDS`` at once."""

    def __init__(self, rate: float = DEFAULT_RATE):
        self.rate, self.burst = rate, max(1.0, rate * BURST_SECONDS)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may (for Retry-After)."""
        now = time.monotonic()
        if key not in self._buckets and len(self._buckets) >= 10000:  # bounded: forget the idlest
            for k in sorted(self._buckets, key=lambda k: self._buckets[k][1])[:5000]:
                del self._buckets[k]
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


async def audit_config(conn, token: Token, stream_id: str, action: str, before: str | None, after: str | None) -> None:
    """Record a config change: who (the token), when, the stream, the config before and after."""
    await conn.execute("SELECT aic_audit_config($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)",
                       token.id, token.name, token.role, stream_id, action, before, after)
