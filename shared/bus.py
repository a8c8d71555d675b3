"""The bus: JetStream streams, consumers and the claim check for large messages.

Topology (created or updated idempotently by :meth:`Bus.ensure_topology`, with admin credentials):

=================  =====================  ==========  ==========================================
stream             subjects               retention   consumers
=================  =====================  ==========  ==========================================
AIC_FRAMES         aic.frames.<stream>    work queue  ``compressor`` (shared durable pull);
                   (+ ``….chunk``)        bounded,    claim-checked chunks of frame batches
                                          discard new (``aic.frames.<s>.chunk``) by sequence
AIC_COMPRESSED     aic.compressed.<s>     limits      receivers (their own consumers)
AIC_METRICS        aic.metrics.<worker>   limits      ``metrics`` (durable pull)
AIC_DEADLETTER     aic.deadletter.<s>     limits      operators
AIC_BLOBS          aic.blobs.<kind>.<s>   limits      direct get by sequence (payloads' claim check)
AIC_CONTROL        aic.control.<s>        last, 30 s  workers read the last per subject at start
AIC_REFS           aic.refs.<s>.<part>    last, 10 m  the next batch's worker (reference hand-off)
AIC_ADVISORIES     max-deliveries events  limits      ``exhausted`` (failed batches)
=================  =====================  ==========  ==========================================

``<s>`` is a stream id as subject tokens, tenant first: ``_.NAME`` for the default tenant's stream
``NAME``, ``T.NAME`` for tenant T's (:func:`~shared.schemas.subject_key`), so that permissions can
confine a tenant's credentials to ``….T.*`` (shared/roles.py).  Key-frame requests travel on
``aic.keyframe.<s>`` (core NATS).  Only the admin creates or changes the topology
(:meth:`Bus.ensure_topology`: ``aic up``, ``aic bus init``); services check that their streams
exist (:meth:`Bus.prepare`).

Storage is bounded by :class:`~shared.config.StoreLimits`, applied at every topology update: the
frames stream, chunks included, refuses new batches when full (:class:`StreamFull`: gateways wait
and retry, which is backpressure); every other stream drops its oldest messages instead, and their
sum stays below the server's store, so a worker can always store its outputs and ack, and a full
frames stream empties as the workers drain it.

Receivers publish bandwidth estimates on ``aic.control.<stream>`` with plain
NATS; workers subscribe to them, and AIC_CONTROL (in memory, one message per
subject, 30 s) keeps the latest so a worker that starts mid-stream has the
budget before its first batch.  KV buckets: ``aic_config`` (per-stream
config, watched by every worker) and ``aic_ingest`` (each stream's next batch
number, so a restarted gateway continues its numbering).

Messages larger than the server's ``max_payload`` travel by claim check: the
bytes are cut into chunks published on AIC_BLOBS, and the message itself is
empty with an ``Aic-Claim`` header listing the chunk sequences.  Readers fetch
the chunks with JetStream direct get.  Measured here, this moves 400-700 MB/s,
against 5-46 MB/s for the nats-py object store (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, replace

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.aio import pause
from shared.config import BusConfig
from shared.control import CONTROL_PREFIX, ESTIMATE_FRESH_S, KV_BUCKET
from shared.endpoints import redact
from shared.logs import get_logger
from shared.schemas import STREAM_ID_RE, stream_of_key, subject_key

log = get_logger("bus")

FRAMES_STREAM = "AIC_FRAMES"
COMPRESSED_STREAM = "AIC_COMPRESSED"
METRICS_STREAM = "AIC_METRICS"
DEADLETTER_STREAM = "AIC_DEADLETTER"
BLOBS_STREAM = "AIC_BLOBS"
COMPRESSOR_CONSUMER = "compressor"
METRICS_CONSUMER = "metrics"
# JetStream announces a batch that used up max_deliver without an ack (its worker crashed or hung
# on every attempt) with an advisory; a stream keeps those so a worker turns each into a failed row.
ADVISORY_STREAM = "AIC_ADVISORIES"
# The latest bandwidth estimate per stream, so that a worker that starts or scales out mid-stream
# knows the budget before its first batch instead of after the receiver's next publish.
CONTROL_STREAM = "AIC_CONTROL"
INGEST_BUCKET = "aic_ingest"
# Each chained stream's latest decoded frame, in parts (services/compressor/handoff.py).
REFS_STREAM = "AIC_REFS"
REFS_PREFIX = "aic.refs"
#: A reference older than this is gone: the stream's next batch starts with a real key frame.
REFS_MAX_AGE_S = 600.0
EXHAUSTED_SUBJECT = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{FRAMES_STREAM}.{COMPRESSOR_CONSUMER}"
EXHAUSTED_CONSUMER = "exhausted"
CLAIM_HEADER = "Aic-Claim"
#: Frame batches on the frames stream (``aic.frames.<tenant>.<name>``), not their chunks.
FRAMES_FILTER = "aic.frames.*.*"
#: How the outputs' bound (StoreLimits.outputs_bytes) is shared among the output streams.
OUTPUT_SHARES = {COMPRESSED_STREAM: 0.40, BLOBS_STREAM: 0.30, METRICS_STREAM: 0.10, REFS_STREAM: 0.10,
                 DEADLETTER_STREAM: 0.05, ADVISORY_STREAM: 0.05}
#: On an empty frames message: the gateway dropped this batch (a live source while the bus was away);
#: the worker records it as a rejected row (``dropped_at_gateway: <why>``).
DROPPED_HEADER = "Aic-Dropped"
#: A frame batch's capture time (``repr`` of the float): a failure row keyed on it cannot make a second
#: row beside the batch's ``ok`` row, whose key is the same capture time.
CAPTURED_HEADER = "Aic-Captured-At"
JS_TIMEOUT_S = 30.0  # a JetStream request (publish ack, API call) unanswered this long has failed
MSG_ID_HEADER = "Nats-Msg-Id"
# Leave room for headers and protocol framing inside max_payload.
_HEADROOM = 16 * 1024
_MAX_CHUNK = 8 * 1024 * 1024


def frames_subject(stream_id: str) -> str:
    return f"aic.frames.{subject_key(stream_id)}"


def compressed_subject(stream_id: str) -> str:
    return f"aic.compressed.{subject_key(stream_id)}"


def stream_of_subject(subject: str) -> str | None:
    """The stream id in a per-stream subject (``aic.<kind>.<tenant>.<name>``), or None if it holds none."""
    parts = subject.split(".", 2)
    sid = stream_of_key(parts[2]) if len(parts) == 3 else ""
    return sid if STREAM_ID_RE.match(sid) else None


def metrics_subject(worker_id: str) -> str:
    return f"aic.metrics.{_token(worker_id)}"


def deadletter_subject(stream_id: str) -> str:
    return f"aic.deadletter.{subject_key(stream_id)}"


def _token(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "_"


class BusUnavailable(ConnectionError):
    """No NATS server answered."""


class PermissionDenied(PermissionError):
    """The server refused an operation to these credentials (shared/roles.py); the message names it."""


class TopologyMissing(RuntimeError):
    """A stream or bucket this service needs does not exist, and its credentials may not create it."""


class StreamFull(RuntimeError):
    """JetStream refused a message for want of room: the stream is at its limit (the frames stream's
    bound: backpressure) or the server's store is full.  Retrying later, with the same id, is right."""


#: JetStream's error codes for a message refused for want of room: the stream's own limit
#: (``maximum bytes/messages exceeded``) and the server's store (``insufficient resources``).
_NO_ROOM = (10077, 10023, 10047, 10002)  # (10002: the account's storage limit)


class ClaimError(RuntimeError):
    """A claim-checked message whose chunks are missing or inconsistent."""


@dataclass(frozen=True)
class Claim:
    """Where a claim-checked message's bytes are: ``size`` bytes in chunks at ``seqs`` of ``stream``
    (a frame batch's in AIC_FRAMES, under its bound; a payload's in AIC_BLOBS)."""

    size: int
    seqs: tuple[int, ...]
    stream: str = BLOBS_STREAM

    def encode(self) -> str:
        tail = "" if self.stream == BLOBS_STREAM else f":{self.stream}"
        return f"{self.size}:{','.join(map(str, self.seqs))}{tail}"

    @classmethod
    def decode(cls, value: str) -> "Claim":
        try:
            size, seqs, *stream = value.split(":", 2)
            claim = cls(int(size), tuple(int(s) for s in seqs.split(",") if s), *stream)
        except ValueError:
            raise ClaimError(f"malformed {CLAIM_HEADER} header") from None
        if claim.stream not in (BLOBS_STREAM, FRAMES_STREAM):
            raise ClaimError(f"a claim may not point into stream {claim.stream!r}")
        return claim


def chunk_subject(subject: str, kind: str) -> tuple[str, str]:
    """(stream, subject) of the claim-check chunks of a message on ``subject``.  A frame batch's stay in
    the frames stream, under its bound (``aic.frames.<s>.chunk``: one token more than a batch's, which
    the compressor consumer's filter leaves out); others' go to AIC_BLOBS."""
    if subject.startswith("aic.frames."):
        return FRAMES_STREAM, f"{subject}.chunk"
    return BLOBS_STREAM, f"aic.blobs.{kind}.{subject.split('.', 2)[-1]}"  # the stream id: one tenant's chunks


def _chunk_subject_ok(subject: str, claim: Claim, chunk: str) -> bool:
    """Whether a chunk stored on ``chunk`` can belong to a message on ``subject``: chunk ids are not
    secret, and another tenant's message with a copied id must not stand in for this one's chunk."""
    if claim.stream == FRAMES_STREAM:
        return chunk == f"{subject}.chunk"
    kind_and_key = chunk.split(".", 2)[-1]  # aic.blobs.<kind>.<key>
    return chunk.startswith("aic.blobs.") and kind_and_key.partition(".")[2] == subject.split(".", 2)[-1]


class Bus:
    """A NATS connection with the project's JetStream topology and claim check."""

    def __init__(self, nc: NATS, cfg: BusConfig):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=JS_TIMEOUT_S)
        self.cfg = cfg
        self._verified: dict[str, None] = {}  # claims payload() checked, oldest first (release deletes only these)
        self._watching_denials: list[asyncio.Future] = []

    @classmethod
    async def connect(cls, cfg: BusConfig, name: str, wait_s: float = 10.0, **kwargs) -> "Bus":
        """Connect, waiting at most ``wait_s`` for the first connection (nats-py alone would retry
        forever); once connected, reconnects are unlimited.  Raises :class:`BusUnavailable`, or
        :class:`PermissionDenied` for credentials the server refuses."""
        state = _Connecting()
        kwargs.setdefault("error_cb", _error_logger(state))
        if cfg.user is not None:
            kwargs.update(user=cfg.user, password=cfg.password or "", inbox_prefix=f"_INBOX.{cfg.user}")
        if cfg.ca_file or cfg.nats_url.startswith("tls://"):
            from shared.pki import client_context

            kwargs["tls"] = client_context(cfg.ca_file)
        state.task = asyncio.ensure_future(nats.connect(
            [u.strip() for u in cfg.nats_url.split(",")],  # a cluster: its nodes, comma-separated
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=min(5.0, wait_s),
            drain_timeout=5,
            **kwargs,
        ))  # fmt: skip
        try:
            nc = await asyncio.wait_for(state.task, wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError, OSError, nats.errors.Error) as exc:
            if isinstance(exc, asyncio.CancelledError) and state.refusal is None:
                raise  # our caller's cancellation, not the error logger's
            if state.refusal is not None or _refused(exc):
                raise PermissionDenied(f"the NATS server at {redact(cfg.nats_url)} refused the credentials of "
                                       f"user {cfg.user or '(none)'}: {state.refusal or exc}") from None
            tls = next((f for f in state.errors if "CERTIFICATE" in str(f) or "SSL" in type(f).__name__), None)
            if tls is not None:
                raise BusUnavailable(f"TLS with the NATS server at {redact(cfg.nats_url)} failed: {tls} "
                                     f"(CA file: {cfg.ca_file or 'the system CAs'})") from None
            raise BusUnavailable(f"no NATS server answered at {redact(cfg.nats_url)} within {wait_s:g} s "
                                 f"({type(exc).__name__})") from None
        state.bus = cls(nc, cfg)
        return state.bus

    def _denied(self, message: str) -> None:
        for fut in self._watching_denials:
            if not fut.done():
                fut.set_exception(PermissionDenied(message))

    async def guarded(self, aw):
        """Await ``aw``, failing fast with :class:`PermissionDenied` when the server refuses one of its
        operations meanwhile: NATS answers a denied request with an error on the connection, not a
        reply, and the request would otherwise wait out its timeout."""
        fut = asyncio.get_running_loop().create_future()
        self._watching_denials.append(fut)
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task, fut}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            raise fut.exception()
        finally:
            self._watching_denials.remove(fut)
            if not fut.done():
                fut.cancel()
            else:
                fut.exception()  # retrieved: no "never retrieved" warning
            if not task.done():  # abandoned (this call was cancelled or timed out): so is its work
                task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @classmethod
    async def connect_until(cls, cfg: BusConfig, name: str, stop: asyncio.Event) -> "Bus | None":
        """For services: wait for the server as long as it takes (it may start after us), logging
        each failed try, unless ``stop`` is set first (then None)."""
        while not stop.is_set():
            try:
                return await cls.connect(cfg, name, wait_s=5.0)
            except BusUnavailable as exc:
                log.warning("nats_unavailable", error=str(exc))
                await pause(stop, 1.0)
        return None

    @property
    def max_inline(self) -> int:
        return max(1024, self.nc.max_payload - _HEADROOM)

    async def close(self) -> None:
        """Drain: let in-flight messages finish, then close."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:
                try:
                    await self.nc.close()
                except Exception:  # a TLS transport the server dropped mid-write (asyncio's sslproto)
                    pass

    # ------------------------------------------------------------------ topology

    def _stream_configs(self) -> list[jsapi.StreamConfig]:
        return [replace(sc, num_replicas=self.cfg.replicas) for sc in self._stream_shapes()]

    def _stream_shapes(self) -> list[jsapi.StreamConfig]:
        lim = self.cfg.store
        age, out = lim.max_age_s, lim.outputs_bytes
        dup = min(self.cfg.dedup_window_s, age)  # (JetStream's rule)
        return [
            jsapi.StreamConfig(
                name=FRAMES_STREAM,
                subjects=["aic.frames.>"],
                retention=jsapi.RetentionPolicy.WORK_QUEUE,
                max_age=age,
                max_bytes=lim.frames_bytes,
                discard=jsapi.DiscardPolicy.NEW,  # a full frames stream refuses: the gateways wait
                duplicate_window=dup,
                allow_direct=True,  # claim-checked chunks, read by sequence
            ),
            # The outputs share their bound (OUTPUT_SHARES) and drop their oldest when full: never refuse.
            jsapi.StreamConfig(name=COMPRESSED_STREAM, subjects=["aic.compressed.>"], max_age=age,
                               max_bytes=_share(out, COMPRESSED_STREAM), duplicate_window=dup),
            jsapi.StreamConfig(name=METRICS_STREAM, subjects=["aic.metrics.>"], max_age=7 * age,
                               max_bytes=_share(out, METRICS_STREAM), duplicate_window=dup),
            jsapi.StreamConfig(name=DEADLETTER_STREAM, subjects=["aic.deadletter.>"], max_age=7 * age,
                               max_bytes=_share(out, DEADLETTER_STREAM), duplicate_window=dup),
            jsapi.StreamConfig(name=BLOBS_STREAM, subjects=["aic.blobs.>"], max_age=age,
                               max_bytes=_share(out, BLOBS_STREAM), duplicate_window=dup, allow_direct=True),
            jsapi.StreamConfig(name=ADVISORY_STREAM, subjects=[EXHAUSTED_SUBJECT], max_age=age,
                               max_bytes=_share(out, ADVISORY_STREAM)),
            jsapi.StreamConfig(
                name=REFS_STREAM, subjects=[f"{REFS_PREFIX}.>"], max_msgs_per_subject=1, max_age=REFS_MAX_AGE_S,
                max_bytes=_share(out, REFS_STREAM), allow_direct=True,
            ),
            jsapi.StreamConfig(
                name=CONTROL_STREAM, subjects=[f"{CONTROL_PREFIX}.>"], max_msgs_per_subject=1,
                max_age=ESTIMATE_FRESH_S, storage=jsapi.StorageType.MEMORY, allow_direct=True,
            ),
        ]

    async def config_kv(self) -> "StreamKV":
        """The per-stream config bucket (:mod:`shared.control`)."""
        return StreamKV(self, KV_BUCKET)

    async def ingest_kv(self) -> "StreamKV":
        """Each stream's next batch number, kept by the gateway (``aic ingest``) so that a restarted
        ingest continues the numbering instead of publishing ids the bus drops as repeats."""
        return StreamKV(self, INGEST_BUCKET)

    def _kv(self, bucket: str) -> KeyValue:
        # Bound without asking for the bucket's stream info, which a tenant's credentials may not
        # read (it lists every tenant's keys); the admin creates it, with direct gets (ensure_topology).
        return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=self.js, direct=True)

    async def kv_keys(self, bucket: str, keys: str = ">") -> list[str]:
        """The keys of ``bucket`` that match ``keys`` (a subject pattern, e.g. ``acme.*``), read with a
        consumer whose filter is in its create subject, so that permissions can confine it to a
        tenant's keys (nats-py's ``keys()`` asks for every key)."""
        prefix = f"$KV.{bucket}."
        reader = await self.follow(f"KV_{bucket}", prefix + keys, deliver_policy=jsapi.DeliverPolicy.LAST_PER_SUBJECT,
                                   headers_only=True)
        found: set[str] = set()
        try:
            pending = reader.pending
            while pending:
                msg = await reader.next_msg(timeout=5)
                pending = msg.metadata.num_pending
                if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    found.add(msg.subject[len(prefix):])
        finally:
            await reader.close()
        return sorted(found)

    async def _ensure_kv(self, bucket: str, history: int, description: str) -> None:
        try:
            si = await self.js.stream_info(f"KV_{bucket}")
        except NotFoundError:
            await self.js.create_key_value(jsapi.KeyValueConfig(
                bucket=bucket, history=history, replicas=self.cfg.replicas, description=description, direct=True))
            return
        if not si.config.allow_direct:  # a bucket made before tenants: reads by key subject need direct gets
            await self.js.update_stream(replace(si.config, allow_direct=True))
        # Entries from before tenants are keyed by the bare stream id: move them under their subject key.
        kv = self._kv(bucket)
        for key in await self.kv_keys(bucket, "*"):
            try:
                entry = await kv.get(key)
                await kv.create(subject_key(key), entry.value)
            except KeyWrongLastSequenceError:
                pass  # moved already (an interrupted earlier move)
            except KeyNotFoundError:
                continue
            await kv.delete(key)

    async def prepare(self, streams: tuple[str, ...]) -> None:
        """For a service: make sure the streams it uses exist.  Creates the whole topology when one is
        missing and these credentials may (admin); otherwise :class:`TopologyMissing` says who must.
        Streams that exist are left as they are: changing them is the admin's (``aic up``)."""
        try:
            for name in streams:
                await self.guarded(self.js.stream_info(name))
            return
        except NotFoundError:
            pass
        try:
            await self.guarded(self.ensure_topology())
        except PermissionDenied:
            raise TopologyMissing(_missing(f"stream {name}", self.cfg.user)) from None

    async def prepare_until(self, streams: tuple[str, ...], stop: asyncio.Event) -> bool:
        """:meth:`prepare`, retried every 2 s while the topology is missing (``aic up`` may still be
        creating it); False if ``stop`` came first."""
        while not stop.is_set():
            try:
                await self.prepare(streams)
                return True
            except TopologyMissing as exc:
                log.error("topology_missing", error=str(exc))
                await pause(stop, 2.0)
        return False

    async def ensure_topology(self) -> None:
        """Create or update every stream, durable consumer and KV bucket (admin credentials)."""
        await self._ensure_kv(KV_BUCKET, 16, "aic per-stream compression config")
        await self._ensure_kv(INGEST_BUCKET, 1, "aic ingest: next batch number per stream")
        for sc in self._stream_configs():
            try:
                await self.js.stream_info(sc.name)
                await self.js.update_stream(sc)
            except NotFoundError:
                try:
                    await self.js.add_stream(sc)
                except nats.js.errors.BadRequestError:
                    # Another service created it between our two calls.
                    await self.js.update_stream(sc)
        await self.js.add_consumer(
            FRAMES_STREAM,
            jsapi.ConsumerConfig(
                durable_name=COMPRESSOR_CONSUMER,
                ack_policy=jsapi.AckPolicy.EXPLICIT,
                ack_wait=self.cfg.ack_wait_s,
                max_deliver=self.cfg.max_deliver,
                max_ack_pending=256,
                filter_subject=FRAMES_FILTER,  # batches only, not their chunks (one token more)
            ),
        )
        await self.js.add_consumer(
            ADVISORY_STREAM,
            jsapi.ConsumerConfig(
                durable_name=EXHAUSTED_CONSUMER, ack_policy=jsapi.AckPolicy.EXPLICIT, ack_wait=30.0, max_deliver=-1
            ),
        )
        await self.js.add_consumer(
            METRICS_STREAM,
            jsapi.ConsumerConfig(
                durable_name=METRICS_CONSUMER,
                ack_policy=jsapi.AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_deliver=-1,  # a database outage must never drop a record
                max_ack_pending=20000,
                filter_subject="aic.metrics.>",
            ),
        )

    async def follow(self, stream: str, subject: str, **config) -> "Follower":
        """Read ``subject``'s messages on ``stream`` in order, from its first (``config``: other consumer
        settings), with a consumer of this reader's own: named, so that its filter is in the create
        subject and permissions can confine a reader to its tenant's streams; removed by
        :meth:`Follower.close`, or after a minute unused."""
        name = f"rx-{secrets.token_hex(8)}"
        config = {"deliver_policy": jsapi.DeliverPolicy.ALL, **config}
        info = await self.guarded(self.js.add_consumer(stream, jsapi.ConsumerConfig(
            name=name, filter_subject=subject, ack_policy=jsapi.AckPolicy.NONE, mem_storage=True,
            inactive_threshold=60.0, **config)))
        sub = await self.js.pull_subscribe_bind(durable=name, stream=stream)
        return Follower(self, stream, name, sub, info.num_pending)

    async def pull(self, stream: str, durable: str) -> JetStreamContext.PullSubscription:
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    # ------------------------------------------------------------------ publish / resolve

    async def publish(self, subject: str, data: bytes, msg_id: str, kind: str = "data",
                      varies: bool = False, headers: dict[str, str] | None = None,
                      tag: str | None = None) -> jsapi.PubAck:
        """Publish with a message id (JetStream drops duplicates); claim-check it if too large.

        ``varies``: two publishes of this id may carry different bytes (a batch coded again after a
        redelivery).  Chunk ids then also name a digest of the bytes, so that chunks of two versions
        never dedupe into one claim: whichever header JetStream keeps points at its own chunks.
        ``tag``: instead, a secret the caller keeps for this message across its retries (a gateway's
        per batch), so that nobody can take its chunks' ids first.  ``headers`` travel on the message
        itself (not on its chunks).  Raises :class:`StreamFull` when JetStream has no room for it.
        """
        try:
            return await self.guarded(self._publish(subject, data, msg_id, kind, varies, headers, tag))
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            # (On a cluster, also for a moment while a stream elects its leader: callers that know the
            # stream exists retry.)
            raise TopologyMissing(f"no stream takes {subject}: " + _missing("its stream", self.cfg.user)) from None
        except nats.js.errors.APIError as exc:  # (the room errors come as 503s and 500s)
            if exc.err_code in _NO_ROOM:
                raise StreamFull(f"no room for {subject}: {exc.description}") from None
            raise

    async def _publish(self, subject: str, data: bytes, msg_id: str, kind: str, varies: bool,
                       headers: dict[str, str] | None, tag: str | None) -> jsapi.PubAck:
        headers = {**(headers or {}), MSG_ID_HEADER: msg_id}
        if len(data) <= self.max_inline:
            return await self.js.publish(subject, data, headers=headers)
        chunk = min(self.max_inline, _MAX_CHUNK)
        stream, blob_subject = chunk_subject(subject, kind)
        if tag is None:
            tag = hashlib.blake2b(data, digest_size=8).hexdigest() if varies else ""
        view = memoryview(data)
        # Concurrent request-reply publishes, not nats-py's publish_async: its futures never resolve
        # when JetStream answers with an error (its reply handler raises instead of failing the future,
        # nats-py 2.16), so a full frames stream would look like a server that stopped answering.
        acks = await asyncio.gather(*(
            self.js.publish(blob_subject, bytes(view[i : i + chunk]),
                            headers={MSG_ID_HEADER: _chunk_id(subject, msg_id, i // chunk, tag)})
            for i in range(0, len(data), chunk)
        ))  # fmt: skip
        headers[CLAIM_HEADER] = Claim(len(data), tuple(a.seq for a in acks), stream).encode()
        return await self.js.publish(subject, b"", headers=headers)

    async def payload(self, msg: Msg, max_size: int | None = None) -> bytes:
        """The bytes a message carries, fetching claim-checked chunks.  Each chunk must be this
        message's own (its id names the message's subject and id), and the claimed size at most
        ``max_size``: a forged or stale claim raises :class:`ClaimError` before anything large is read."""
        claim = (msg.headers or {}).get(CLAIM_HEADER)
        if claim is None:
            return msg.data
        c = Claim.decode(claim)
        if max_size is not None and c.size > max_size:
            raise ClaimError(f"claim-checked message of {c.size} bytes is over the {max_size}-byte limit")
        msg_id = (msg.headers or {}).get(MSG_ID_HEADER, "")
        parts, tag = [], None
        for i, seq in enumerate(c.seqs):
            try:
                part = await self._chunk(c.stream, seq)
            except NotFoundError:
                raise ClaimError(f"claim-checked chunk {seq} is gone (expired or deleted)") from None
            part_id = (part.headers or {}).get(MSG_ID_HEADER) or ""
            if tag is None:  # the first chunk says which version; every other must be the same one
                tag = part_id.partition("@")[2]
            if part_id != _chunk_id(msg.subject, msg_id, i, tag) or not _chunk_subject_ok(msg.subject, c, part.subject):
                raise ClaimError(f"claim-checked chunk {seq} belongs to another message")
            parts.append(part.data or b"")
        data = b"".join(parts)
        if len(data) != c.size:
            raise ClaimError(f"claim-checked message has {len(data)} bytes, header says {c.size}")
        self._verified[claim] = None
        while len(self._verified) > 1024:
            self._verified.pop(next(iter(self._verified)))
        return data

    async def _chunk(self, stream: str, seq: int):
        try:
            return await self.js.get_msg(stream, seq, direct=True)
        except NotFoundError:
            # Direct gets may be answered by a replica that has not caught up yet; the stream
            # leader's answer is the one that counts.
            return await self.js.get_msg(stream, seq)

    async def release(self, msg: Msg) -> None:
        """Delete a processed message's claim-checked chunks (they also expire with the stream's
        max_age).  Only chunks that :meth:`payload` verified as the message's own: a forged claim
        must not delete other messages' chunks."""
        claim = (msg.headers or {}).get(CLAIM_HEADER)
        if claim is None or claim not in self._verified:
            return
        del self._verified[claim]
        c = Claim.decode(claim)
        for seq in c.seqs:
            try:
                await self.js.delete_msg(c.stream, seq)
            except Exception:
                pass  # already gone: deletion is an optimisation, expiry is the guarantee


class _QuietTlsClose(logging.Filter):
    """asyncio warns at every TLS connection the server closes ("returning true from eof_received()
    has no effect when using ssl"): nats-py's protocol says so, and nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsClose())


def _refused(exc: BaseException) -> bool:
    return "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower()


def _missing(what: str, user: str | None) -> str:
    return (f"{what} does not exist and user {user or '(anonymous)'} may not create it: start the stack with "
            "`aic up`, which creates it, or create it once with the admin credentials")


class _Connecting:
    """A connection being made, as its error logger sees it: the connect task (cancelled at a refusal:
    trying again cannot help), the last errors before it succeeded, and the bus once it has."""

    def __init__(self):
        self.task: asyncio.Future | None = None
        self.errors: list[Exception] = []
        self.refusal: str | None = None
        self.bus: Bus | None = None


def _error_logger(state: _Connecting):
    """nats-py prints a traceback for every failed (re)connect try; one line per kind of error
    every 10 s says the same.  A permission violation is logged with the subject it names and fails
    the operation that caused it (:meth:`Bus.guarded`)."""
    last: dict[str, float] = {}

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        if state.bus is None:
            state.errors = [*state.errors[-7:], exc]
            if _refused(exc):
                state.refusal = text
                state.task.cancel()
        elif "permissions violation" in text.lower():
            log.error("nats_permission_denied", user=state.bus.cfg.user, error=text)
            state.bus._denied(text.replace("nats: ", ""))
            return
        key, now = f"{type(exc).__name__}: {text}", time.monotonic()
        if now - last.get(key, -1e9) >= 10.0:
            last[key] = now
            log.warning("nats_error", error=redact(key))

    return on_error


class StreamKV:
    """A KV bucket keyed by stream id; each entry is kept under the stream's subject key
    (:func:`~shared.schemas.subject_key`), so that a tenant's credentials reach its entries only."""

    def __init__(self, bus: Bus, bucket: str):
        self.bus, self.bucket, self.kv = bus, bucket, bus._kv(bucket)

    async def get(self, stream_id: str):
        return await self.bus.guarded(self.kv.get(subject_key(stream_id)))

    async def put(self, stream_id: str, value: bytes | str) -> int:
        return await self.bus.guarded(self.kv.put(subject_key(stream_id), _bytes(value)))

    async def create(self, stream_id: str, value: bytes | str) -> int:
        return await self.bus.guarded(self.kv.create(subject_key(stream_id), _bytes(value)))

    async def update(self, stream_id: str, value: bytes | str, last: int) -> int:
        return await self.bus.guarded(self.kv.update(subject_key(stream_id), _bytes(value), last=last))

    async def delete(self, stream_id: str) -> bool:
        return await self.bus.guarded(self.kv.delete(subject_key(stream_id)))

    async def stream_ids(self, keys: str = ">") -> list[str]:
        """The stream ids with an entry, of the keys ``keys`` (a pattern: ``acme.*``, ``_.*``)."""
        return sorted(stream_of_key(k) for k in await self.bus.kv_keys(self.bucket, keys))

    async def watchall(self):
        """nats-py's watcher of every entry; ``stream_of_key(entry.key)`` is an entry's stream."""
        return await self.kv.watchall()


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class Follower:
    """A reader's own consumer on one subject (:meth:`Bus.follow`)."""

    def __init__(self, bus: Bus, stream: str, name: str, sub: JetStreamContext.PullSubscription, pending: int):
        self.bus, self.stream, self.name, self._sub = bus, stream, name, sub
        self.pending = pending  # messages the consumer had to deliver when it was made
        self._ready: list[Msg] = []

    async def next_msg(self, timeout: float) -> Msg:
        """The next message; nats-py's TimeoutError when none came within ``timeout`` seconds."""
        if not self._ready:
            self._ready = list(reversed(await self.bus.guarded(self._sub.fetch(64, timeout=timeout))))
        return self._ready.pop()

    async def close(self) -> None:
        await unsubscribe(self._sub)
        try:
            await self.bus.js.delete_consumer(self.stream, self.name)
        except Exception:
            pass  # gone already, or expires after its inactive threshold


def _share(outputs_bytes: int, stream: str) -> int:
    return max(1 << 18, int(outputs_bytes * OUTPUT_SHARES[stream]))


def _chunk_id(subject: str, msg_id: str, index: int, tag: str = "") -> str:
    """A chunk's message id.  It names the message's subject, not just its id: a frame batch and its
    compressed batch share ``stream:seq``, and JetStream would take the second's chunks for
    duplicates of the first's.  ``tag`` (a digest of the whole message's bytes, see
    :meth:`Bus.publish`) tells versions of one message apart."""
    return f"{subject}/{msg_id}#{index}" + (f"@{tag}" if tag else "")


async def unsubscribe(sub) -> None:
    """Stop a pull subscription before draining, so a pending fetch cannot stall the drain."""
    try:
        await sub.unsubscribe()
    except Exception:
        pass  # already closed
