"""Who may do what on the bus: one NATS user per role, each allowed only the subjects and JetStream
API calls its service makes.  ``aic up`` generates each role's password into its data folder and
starts nats-server with the permissions below; nothing is allowed to an anonymous client.

========== ======================================================= ===================================
role       may                                                     used by
========== ======================================================= ===================================
gateway    publish frame batches (and their claim-check chunks);   ``aic ingest``, media gateways
           read and advance its streams' numbering (``aic_ingest``)
compressor pull from the shared ``compressor`` consumer and ack;   ``aic compressor``
           publish compressed payloads, metrics, dead letters and
           references; read budgets and key-frame requests
metrics    pull from the ``metrics`` consumer; publish dead        ``aic metrics`` (and its HTTP API,
           letters of records it cannot store; read and write      which writes stream configs)
           stream configs (for the API)
receiver   read compressed payloads; publish bandwidth estimates   ``aic decode``, viewers
           and key-frame requests
operator   read and write stream configs (modes, budgets)          ``aic config``
admin      everything: create, change and delete streams,          ``aic up`` (creates the topology)
           consumers and buckets
========== ======================================================= ===================================

Why users with permissions, not NKeys or accounts: every aic service shares one JetStream domain
(one shared consumer feeds every worker), which accounts would split and then have to re-join with
exports and imports; NKeys would keep the secrets off the server but need a signing library in
every client for the same permissions.  Passwords reach nats-server through its environment, never
its config file, and clients read theirs from 0600 files (``docs/security.md``).

Each role subscribes to its replies under its own inbox prefix (``_INBOX.<role>``): a shared
``_INBOX.>`` would let a receiver read the raw frames JetStream delivers to a compressor's fetch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.bus import (
    ADVISORY_STREAM, BLOBS_STREAM, COMPRESSED_STREAM, COMPRESSOR_CONSUMER, CONTROL_STREAM, DEADLETTER_STREAM,
    EXHAUSTED_CONSUMER, FRAMES_STREAM, INGEST_BUCKET, METRICS_CONSUMER, METRICS_STREAM, REFS_PREFIX, REFS_STREAM,
)
from shared.control import CONTROL_PREFIX, KEYFRAME_SUFFIX, KV_BUCKET

ROLES = ("gateway", "compressor", "metrics", "receiver", "operator", "admin")
#: The role a command uses by default (its credentials file in the data folder).
ADMIN = "admin"

_API = "$JS.API"


def inbox_prefix(role: str) -> str:
    return f"_INBOX.{role}"


def _pull(stream: str, consumer: str) -> list[str]:
    """Fetch from and ack a durable pull consumer (nothing else on it)."""
    return [f"{_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"{_API}.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>"]


def _kv_read(bucket: str) -> list[str]:
    """Read a KV bucket: get a key, list keys and watch (an ordered consumer on the bucket's stream)."""
    s = f"KV_{bucket}"
    return [f"{_API}.STREAM.INFO.{s}", f"{_API}.DIRECT.GET.{s}.>", f"{_API}.DIRECT.GET.{s}", f"{_API}.STREAM.MSG.GET.{s}",
            f"{_API}.CONSUMER.CREATE.{s}", f"{_API}.CONSUMER.CREATE.{s}.>", f"{_API}.CONSUMER.DELETE.{s}.>",
            f"{_API}.CONSUMER.INFO.{s}.>", f"$JS.FC.{s}.>"]


def _kv_write(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _info(*streams: str) -> list[str]:
    return [f"{_API}.STREAM.INFO.{s}" for s in streams]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def permissions(role: str) -> Permissions:
    """The subjects ``role`` may publish and subscribe to (admin: all)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if role == ADMIN:
        return Permissions((">",), (">",))
    inbox = [f"{inbox_prefix(role)}.>"]
    pub: list[str]
    sub: list[str] = []
    if role == "gateway":
        pub = ["aic.frames.>", "aic.blobs.frames.>", *_kv_read(INGEST_BUCKET), *_kv_write(INGEST_BUCKET),
               *_info(FRAMES_STREAM, BLOBS_STREAM)]
    elif role == "compressor":
        pub = ["aic.compressed.>", "aic.metrics.>", "aic.deadletter.>", f"{REFS_PREFIX}.>", "aic.blobs.compressed.>",
               *_pull(FRAMES_STREAM, COMPRESSOR_CONSUMER), *_pull(ADVISORY_STREAM, EXHAUSTED_CONSUMER),
               # a redelivered batch's earlier payload (dedupe check), a frame batch read or dropped by sequence
               f"{_API}.STREAM.MSG.GET.{FRAMES_STREAM}", f"{_API}.STREAM.MSG.DELETE.{FRAMES_STREAM}",
               f"{_API}.STREAM.MSG.GET.{COMPRESSED_STREAM}",
               # claim-checked chunks: read, and deleted once coded
               f"{_API}.DIRECT.GET.{BLOBS_STREAM}", f"{_API}.STREAM.MSG.GET.{BLOBS_STREAM}",
               f"{_API}.STREAM.MSG.DELETE.{BLOBS_STREAM}",
               # reference hand-off between workers (services/compressor/handoff.py)
               f"{_API}.DIRECT.GET.{REFS_STREAM}.>", f"{_API}.STREAM.MSG.GET.{REFS_STREAM}",
               f"{_API}.STREAM.PURGE.{REFS_STREAM}",
               # the latest budget per stream at start
               f"{_API}.DIRECT.GET.{CONTROL_STREAM}.>", f"{_API}.STREAM.MSG.GET.{CONTROL_STREAM}",
               *_kv_read(KV_BUCKET),
               *_info(FRAMES_STREAM, COMPRESSED_STREAM, METRICS_STREAM, DEADLETTER_STREAM, BLOBS_STREAM,
                      ADVISORY_STREAM, REFS_STREAM, CONTROL_STREAM)]
        sub = [f"{CONTROL_PREFIX}.*", f"{CONTROL_PREFIX}.*.{KEYFRAME_SUFFIX}"]
    elif role == "metrics":
        pub = ["aic.deadletter.>", *_pull(METRICS_STREAM, METRICS_CONSUMER), *_kv_read(KV_BUCKET),
               *_kv_write(KV_BUCKET), *_info(METRICS_STREAM, DEADLETTER_STREAM)]
    elif role == "receiver":
        pub = [f"{CONTROL_PREFIX}.*", f"{CONTROL_PREFIX}.*.{KEYFRAME_SUFFIX}",
               # an ordered consumer on the compressed payloads: found by subject, created, replaced, removed
               f"{_API}.STREAM.NAMES", f"{_API}.CONSUMER.CREATE.{COMPRESSED_STREAM}",
               f"{_API}.CONSUMER.CREATE.{COMPRESSED_STREAM}.>", f"{_API}.CONSUMER.DELETE.{COMPRESSED_STREAM}.>",
               f"{_API}.CONSUMER.INFO.{COMPRESSED_STREAM}.>", f"$JS.FC.{COMPRESSED_STREAM}.>",
               *_info(COMPRESSED_STREAM)]
    else:  # operator
        pub = [*_kv_read(KV_BUCKET), *_kv_write(KV_BUCKET)]
    return Permissions(tuple(pub), tuple(inbox + sub))


def password_env(role: str) -> str:
    """The environment variable through which nats-server gets ``role``'s password."""
    return f"AIC_NATS_PW_{role.upper()}"


def authorization_conf(roles: tuple[str, ...] = ROLES) -> str:
    """nats-server's ``authorization`` block: one user per role, passwords from the environment."""
    users = []
    for role in roles:
        p = permissions(role)
        perms = {"publish": {"allow": list(p.publish)}, "subscribe": {"allow": list(p.subscribe)}}
        users.append(f"    {{user: {role}, password: ${password_env(role)}, permissions: {json.dumps(perms)}}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"
