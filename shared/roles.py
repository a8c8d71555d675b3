"""Who may do what on the bus: one NATS user per role, each allowed only the subjects and JetStream
API calls its service makes.  ``aic up`` generates each role's password into its data folder and
starts nats-server with the permissions below; nothing is allowed to an anonymous client.

========== ======================================================= ===================================
role       may                                                     used by
========== ======================================================= ===================================
gateway    publish its tenant's frame batches (and their            ``aic ingest``, media gateways
           claim-check chunks); read and advance their numbering
compressor pull from the shared ``compressor`` consumer and ack;   ``aic compressor``
           publish compressed payloads, metrics, dead letters and
           references; read budgets and key-frame requests
metrics    pull from the ``metrics`` consumer; publish dead        ``aic metrics`` (and its HTTP API,
           letters of records it cannot store; read and write      which writes stream configs)
           stream configs (for the API)
receiver   read its tenant's compressed payloads; publish their    ``aic decode``, viewers
           bandwidth estimates and key-frame requests
operator   read, write and list its tenant's stream configs        ``aic config``
edge       what a gateway and a receiver may, for every tenant     ``aic edge`` (WebRTC: WHIP, WHEP;
           (it checks each caller's API token and tenant itself)   services/edge)
admin      everything: create, change and delete streams,          ``aic up`` (creates the topology)
           consumers and buckets
========== ======================================================= ===================================

**Tenants.**  The gateway, receiver and operator roles exist once per tenant: user ``<role>`` for
the default tenant, whose stream ids have no prefix (``cam1``), and ``<role>@<tenant>`` for tenant
``T``, whose stream ids are ``T.<name>``.  Their permissions name the tenant's ids as subject tokens
(``aic.frames.*`` for the default tenant, ``aic.frames.T.*`` for T), so neither reaches the other's
streams, config entries or numbering.  Requests whose subject does not name the stream (a stream's
info, a plain message get, an unfiltered consumer) are not granted to them: every read they make
names its subject (direct gets by subject, consumers whose filter is in the create subject).
Compressors, metrics and the admin serve every tenant.

Why users with permissions, not NKeys or accounts: every aic service shares one JetStream domain
(one shared consumer feeds every worker), which accounts per tenant would split and then have to
re-join with exports and imports; NKeys would keep the secrets off the server but need a signing
library in every client for the same permissions.  The server's config holds bcrypt hashes of
the passwords, never the passwords; clients read theirs from 0600 files (``docs/security.md``).

Each user subscribes to its replies under its own inbox prefix (``_INBOX.<user>``): a shared
``_INBOX.>`` would let a receiver read the raw frames JetStream delivers to a compressor's fetch.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, field

from shared.bus import (
    ADVISORY_STREAM, BLOBS_STREAM, COMPRESSED_STREAM, COMPRESSOR_CONSUMER, CONTROL_STREAM, DEADLETTER_STREAM,
    EXHAUSTED_CONSUMER, FRAMES_STREAM, INGEST_BUCKET, METRICS_CONSUMER, METRICS_STREAM, REFS_PREFIX, REFS_STREAM,
)
from shared.control import CONTROL_PREFIX, KEYFRAME_PREFIX, KV_BUCKET
from shared.schemas import DEFAULT_TENANT, DEFAULT_TOKEN, check_tenant

ROLES = ("gateway", "compressor", "metrics", "receiver", "operator", "edge", "admin")
#: The database roles of the metrics service (services/metrics/migrations.py, version 9): the writer
#: puts rows in, the reader serves the API's reads under row-level security by tenant.
DB_WRITER, DB_READER = "aic_writer", "aic_reader"
#: The roles that belong to one tenant (the others serve every tenant).
TENANT_ROLES = ("gateway", "receiver", "operator")
ADMIN = "admin"

_API = "$JS.API"


def user_name(role: str, tenant: str | None = None) -> str:
    """The NATS user of ``role`` (for ``tenant``, if the role belongs to one)."""
    if tenant in (None, DEFAULT_TENANT) or role not in TENANT_ROLES:
        return role
    return f"{role}@{check_tenant(tenant)}"


def parse_user(user: str) -> tuple[str, str | None]:
    """(role, tenant) of a user name; tenant None for the services' roles."""
    role, _, tenant = user.partition("@")
    if role not in TENANT_ROLES:
        return role, None
    return role, tenant or DEFAULT_TENANT


def stream_ids(tenant: str) -> str:
    """The subject tokens of ``tenant``'s streams: ``_.*`` for the default tenant, ``T.*`` for tenant T
    (shared/schemas.py, ``subject_key``)."""
    return f"{DEFAULT_TOKEN}.*" if tenant == DEFAULT_TENANT else f"{check_tenant(tenant)}.*"


def inbox_prefix(user: str) -> str:
    return f"_INBOX.{user}"


def _pull(stream: str, consumer: str) -> list[str]:
    """Fetch from and ack a durable pull consumer (nothing else on it)."""
    return [f"{_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"{_API}.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>"]


def _kv_all(bucket: str) -> list[str]:
    """Read and watch a whole KV bucket (services that serve every tenant)."""
    s = f"KV_{bucket}"
    return [f"{_API}.STREAM.INFO.{s}", f"{_API}.DIRECT.GET.{s}.>", f"{_API}.DIRECT.GET.{s}", f"{_API}.STREAM.MSG.GET.{s}",
            f"{_API}.CONSUMER.CREATE.{s}", f"{_API}.CONSUMER.CREATE.{s}.>", f"{_API}.CONSUMER.DELETE.{s}.>",
            f"{_API}.CONSUMER.INFO.{s}.>", f"{_API}.CONSUMER.MSG.NEXT.{s}.*", f"$JS.FC.{s}.>"]


def _kv_keys(bucket: str, ids: str, list_keys: bool = False) -> list[str]:
    """Read and write the keys ``ids`` of a KV bucket, and nothing else of it: direct gets name the
    key's subject; listing uses a consumer whose filter is in its create subject."""
    s, keys = f"KV_{bucket}", f"$KV.{bucket}.{ids}"
    out = [keys, f"{_API}.DIRECT.GET.{s}.{keys}"]
    if list_keys:
        out += [f"{_API}.CONSUMER.CREATE.{s}.*.{keys}", f"{_API}.CONSUMER.MSG.NEXT.{s}.*",
                f"{_API}.CONSUMER.DELETE.{s}.*"]
    return out


def _info(*streams: str) -> list[str]:
    return [f"{_API}.STREAM.INFO.{s}" for s in streams]


def _gateway(ids: str) -> list[str]:
    return [f"aic.frames.{ids}", f"aic.frames.{ids}.chunk", *_kv_keys(INGEST_BUCKET, ids)]


def _receiver(ids: str) -> list[str]:
    return [f"{CONTROL_PREFIX}.{ids}", f"{KEYFRAME_PREFIX}.{ids}",
            # its own pull consumer on its streams' compressed payloads (the filter is in the subject)
            f"{_API}.CONSUMER.CREATE.{COMPRESSED_STREAM}.*.aic.compressed.{ids}",
            f"{_API}.CONSUMER.MSG.NEXT.{COMPRESSED_STREAM}.*", f"{_API}.CONSUMER.DELETE.{COMPRESSED_STREAM}.*"]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def permissions(role: str, tenant: str | None = None) -> Permissions:
    """The subjects ``role`` may publish and subscribe to (admin: all); ``tenant`` scopes the
    tenant roles (default: the default tenant)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if role == ADMIN:
        return Permissions((">",), (">",))
    ids = stream_ids(tenant or DEFAULT_TENANT)
    pub: list[str]
    sub: list[str] = [f"{inbox_prefix(user_name(role, tenant))}.>"]
    if role == "gateway":
        pub = _gateway(ids)
    elif role == "receiver":
        pub = _receiver(ids)
    elif role == "edge":  # every tenant's ids: the edge confines each browser to its token's tenant
        pub = _gateway("*.*") + _receiver("*.*")
    elif role == "operator":
        pub = _kv_keys(KV_BUCKET, ids, list_keys=True)
    elif role == "compressor":
        pub = ["aic.compressed.>", "aic.metrics.>", "aic.deadletter.>", f"{REFS_PREFIX}.>", "aic.blobs.compressed.>",
               *_pull(FRAMES_STREAM, COMPRESSOR_CONSUMER), *_pull(ADVISORY_STREAM, EXHAUSTED_CONSUMER),
               # a redelivered batch's earlier payload (dedupe check), a frame batch read or dropped by sequence
               f"{_API}.STREAM.MSG.GET.{FRAMES_STREAM}", f"{_API}.STREAM.MSG.DELETE.{FRAMES_STREAM}",
               f"{_API}.STREAM.MSG.GET.{COMPRESSED_STREAM}",
               # claim-checked chunks (a batch's in the frames stream): read, and deleted once coded
               f"{_API}.DIRECT.GET.{FRAMES_STREAM}", f"{_API}.DIRECT.GET.{BLOBS_STREAM}", f"{_API}.STREAM.MSG.GET.{BLOBS_STREAM}",
               f"{_API}.STREAM.MSG.DELETE.{BLOBS_STREAM}",
               # reference hand-off between workers (services/compressor/handoff.py)
               f"{_API}.DIRECT.GET.{REFS_STREAM}.>", f"{_API}.STREAM.MSG.GET.{REFS_STREAM}",
               f"{_API}.STREAM.PURGE.{REFS_STREAM}",
               # the latest budget per stream at start
               f"{_API}.DIRECT.GET.{CONTROL_STREAM}.>", f"{_API}.STREAM.MSG.GET.{CONTROL_STREAM}",
               *_kv_all(KV_BUCKET),
               *_info(FRAMES_STREAM, COMPRESSED_STREAM, METRICS_STREAM, DEADLETTER_STREAM, BLOBS_STREAM,
                      ADVISORY_STREAM, REFS_STREAM, CONTROL_STREAM)]
        sub += [f"{CONTROL_PREFIX}.*.*", f"{KEYFRAME_PREFIX}.*.*"]
    else:  # metrics (and its HTTP API, which reads and writes every tenant's configs for its tokens)
        pub = ["aic.deadletter.>", *_pull(METRICS_STREAM, METRICS_CONSUMER), *_kv_all(KV_BUCKET),
               f"$KV.{KV_BUCKET}.>", *_info(METRICS_STREAM, DEADLETTER_STREAM)]
    return Permissions(tuple(pub), tuple(sub))


#: bcrypt cost: the passwords are 192 random bits, which no cost factor makes easier or harder to
#: guess; a low one keeps each connection's check at a few milliseconds.
BCRYPT_COST = 6


@dataclass(frozen=True)
class User:
    name: str
    role: str
    tenant: str | None
    password: str = field(repr=False)


def read_users(credentials: Path) -> list[User]:
    """Every user with a password file under ``credentials``: ``<role>.password`` for the services and
    the default tenant, ``<tenant>/<role>.password`` for a tenant's roles."""
    found = [(r, None) for r in ROLES] + [(r, d.name) for d in sorted(p for p in credentials.iterdir() if p.is_dir())
                                           for r in TENANT_ROLES]
    return [User(user_name(r, t), r, t, password_file(credentials, r, t).read_text().strip())
            for r, t in found if password_file(credentials, r, t).exists()]


def password_file(credentials: Path, role: str, tenant: str | None = None) -> Path:
    if tenant in (None, DEFAULT_TENANT) or role not in TENANT_ROLES:
        return credentials / f"{role}.password"
    return credentials / check_tenant(tenant) / f"{role}.password"


def authorization_conf(users: list[User]) -> str:
    """nats-server's ``authorization`` block for ``users``: bcrypt hashes of their passwords and their
    permissions."""
    import bcrypt

    lines = []
    for u in users:
        hashed = bcrypt.hashpw(u.password.encode(), bcrypt.gensalt(BCRYPT_COST, prefix=b"2a")).decode()
        p = permissions(u.role, u.tenant)
        perms = {"publish": {"allow": list(p.publish)}, "subscribe": {"allow": list(p.subscribe)}}
        lines.append(f"    {{user: {json.dumps(u.name)}, password: {json.dumps(hashed)}, permissions: {json.dumps(perms)}}}")
    return "authorization {\n  users = [\n" + "\n".join(lines) + "\n  ]\n}\n"
