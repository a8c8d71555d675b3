"""Versioned msgpack messages between the services, validated once at the edge.

Every message is a msgpack map with ``"v"`` (schema version) and ``"kind"``.
``unpack_*`` functions check every field and raise :class:`SchemaError` with a
short machine-readable ``code`` and a human-readable reason; they never let a
malformed message reach a codec or the database.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np

from shared.pixfmt import SUPPORTED as PIX_FMTS
from shared.pixfmt import frame_size

SCHEMA_VERSION = 1
#: A stream id: ``NAME``, a stream of the default tenant, or ``TENANT.NAME``: a name of 1-64
#: characters of [A-Za-z0-9_-], a tenant of 1-32 that starts with a letter or digit (and is not
#: ``default``: its streams have no prefix).
STREAM_ID_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,31}\.)?[A-Za-z0-9_-]{1,64}$"  # (the API's validators: no look-ahead)
STREAM_ID_RE = re.compile(r"^(?!default\.)" + STREAM_ID_PATTERN[1:])
STREAM_ID_RULE = "[TENANT.]NAME of [A-Za-z0-9_-], NAME 1-64 and TENANT 1-32 characters"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
DEFAULT_TENANT = "default"
#: The default tenant's token in subjects and KV keys.  Every per-stream subject names the tenant
#: as a token of its own (``aic.frames._.cam``, ``aic.frames.acme.cam``), so that credentials can be
#: confined to one tenant with ``aic.frames.acme.*`` -- and, for the default tenant, ``aic.frames._.*``:
#: a one-token pattern (``aic.frames.*``) would also match a literal ``>``, which a consumer's filter
#: in its create subject may be (shared/roles.py).
DEFAULT_TOKEN = "_"


def subject_key(stream_id: str) -> str:
    """A stream id as subject tokens and KV key: ``TENANT.NAME`` (``_.NAME`` for the default tenant)."""
    return stream_id if "." in stream_id else f"{DEFAULT_TOKEN}.{stream_id}"


def stream_of_key(key: str) -> str:
    """The stream id of a subject key (:func:`subject_key`); a key of one token is one from before
    tenants, the stream's id itself."""
    tenant, dot, name = key.partition(".")
    return name if dot and tenant == DEFAULT_TOKEN else key


def tenant_of(stream_id: str) -> str:
    """The tenant a stream belongs to (``DEFAULT_TENANT`` for an id without a prefix)."""
    tenant, dot, _ = stream_id.partition(".")
    return tenant if dot else DEFAULT_TENANT


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant) or tenant == DEFAULT_TENANT:
        raise ValueError(f"tenant {tenant!r}: 1-32 characters of [A-Za-z0-9_-], the first a letter or digit, "
                         f"not {DEFAULT_TENANT!r}")
    return tenant
STATUSES = ("ok", "rejected", "failed")


class SchemaError(ValueError):
    """A message that cannot be accepted; ``code`` is stable, ``reason`` explains."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What a worker accepts; anything larger is rejected, never attempted."""

    max_width: int = 7680
    max_height: int = 4320
    max_frames: int = 256
    max_batch_bytes: int = 512 * 1024 * 1024


#: 9999-12-31: later "times" are milliseconds or garbage, and Python's datetime cannot hold them.
MAX_TIMESTAMP = 253_402_300_799.0


# --------------------------------------------------------------------------- helpers


def _load(data: bytes, kind: str) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise SchemaError("not_msgpack", f"payload is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise SchemaError("bad_message", f"expected a msgpack map, got {type(obj).__name__}")
    v = obj.get("v")
    if v != SCHEMA_VERSION:
        raise SchemaError("unknown_version", f"schema version {v!r} is not supported (expected {SCHEMA_VERSION})")
    if obj.get("kind") != kind:
        raise SchemaError("wrong_kind", f"expected kind {kind!r}, got {obj.get('kind')!r}")
    return obj


def _get(obj: dict, key: str, typ: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise SchemaError("missing_field", f"field {key!r} is missing")
    val = obj[key]
    # bool is an int subclass; it is never a valid int field here.
    if isinstance(val, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise SchemaError("bad_field", f"field {key!r} must be {typ}, got bool")
    if not isinstance(val, typ):
        raise SchemaError("bad_field", f"field {key!r} must be {typ}, got {type(val).__name__}")
    if isinstance(val, float) and not math.isfinite(val):
        raise SchemaError("bad_field", f"field {key!r} must be finite")
    if isinstance(val, str) and "\x00" in val:  # PostgreSQL text cannot hold NUL
        raise SchemaError("bad_field", f"field {key!r} contains a NUL character")
    return val


def _int_in(obj: dict, key: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
    val = _get(obj, key, int, optional=optional)
    if val is not None and not lo <= val <= hi:
        raise SchemaError("bad_field", f"field {key!r}={val} outside [{lo}, {hi}]")
    return val


def _float(obj: dict, key: str, *, optional: bool = False, lo: float = -math.inf) -> float | None:
    val = _get(obj, key, (int, float), optional=optional)
    if val is not None and val < lo:
        raise SchemaError("bad_field", f"field {key!r}={val} below {lo}")
    return None if val is None else float(val)


def _unix_time(obj: dict, key: str, *, optional: bool = False) -> float | None:
    t = _float(obj, key, optional=optional)
    if t is not None and not 0.0 <= t <= MAX_TIMESTAMP:
        raise SchemaError("bad_field", f"field {key!r}={t} is not a Unix time in seconds (0..{MAX_TIMESTAMP:.0f})")
    return t


def _stream_id(obj: dict) -> str:
    sid = _get(obj, "stream_id", str)
    if not STREAM_ID_RE.match(sid):
        raise SchemaError("bad_field", f"stream_id must be {STREAM_ID_RULE}")
    return sid


def pack_dead_letter(batch_id: str | None, status: str, reason: str, subject: str, stream_seq: int,
                     **details: Any) -> bytes:
    """A dead letter for ``aic.deadletter.<stream>``: why a message ended without a result, and where
    it was; ``details`` add what the writer knows (attempts, worker, the record itself)."""
    return msgpack.packb({"v": 1, "kind": "dead_letter", "batch_id": batch_id, "status": status,
                          "reason": reason[:500], "subject": subject, "stream_seq": stream_seq,
                          "at": time.time(), **details})


def peek_ids(data: bytes) -> tuple[str | None, int | None]:
    """Best-effort (stream_id, batch_seq) of a message that failed validation, for its reject row."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    sid = obj.get("stream_id")
    seq = obj.get("batch_seq")
    sid = sid if isinstance(sid, str) and STREAM_ID_RE.match(sid) else None
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**62 else None
    return sid, seq


# --------------------------------------------------------------------------- FrameBatch


@dataclass(frozen=True)
class FrameBatch:
    """A group of consecutive raw frames of one stream: one closed GOP for the codec."""

    stream_id: str
    batch_seq: int
    width: int
    height: int
    fps_num: int
    fps_den: int
    first_pts: int
    captured_at: float
    frames: np.ndarray  # (n, frame_size) uint8, packed yuv420p
    pix_fmt: str = "yuv420p"
    # A live source (paced at its frame rate, or a camera/network feed) must be coded as fast as it
    # arrives; a recorded file published at full speed has no such deadline (the worker then spends
    # what it takes for the fewest bytes: services/compressor/speed.py).  Absent: live.
    live: bool = True

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def fps(self) -> float:
        return self.fps_num / self.fps_den

    @property
    def raw_bytes(self) -> int:
        return int(self.frames.nbytes)

    @property
    def msg_id(self) -> str:
        return f"{self.stream_id}:{self.batch_seq}"

    def pack(self) -> bytes:
        return msgpack.packb(
            {
                "v": SCHEMA_VERSION,
                "kind": "frame_batch",
                "stream_id": self.stream_id,
                "batch_seq": self.batch_seq,
                "width": self.width,
                "height": self.height,
                "pix_fmt": self.pix_fmt,
                "fps_num": self.fps_num,
                "fps_den": self.fps_den,
                "first_pts": self.first_pts,
                "captured_at": self.captured_at,
                "live": self.live,
                "frame_count": self.frame_count,
                # Packed as bin from the array's own rows: one copy of the batch fewer.
                "frames": [memoryview(f) for f in np.ascontiguousarray(self.frames)],
            },
            use_bin_type=True,
        )


def unpack_frame_batch(data: bytes, limits: Limits = Limits()) -> FrameBatch:
    """Decode and validate a FrameBatch; raises SchemaError."""
    if len(data) > limits.max_batch_bytes + 65536:
        raise SchemaError("too_large", f"message of {len(data)} bytes exceeds the {limits.max_batch_bytes}-byte batch limit")
    obj = _load(data, "frame_batch")
    sid = _stream_id(obj)
    seq = _int_in(obj, "batch_seq", 0, 2**62)
    width = _int_in(obj, "width", 2, 1 << 30)
    height = _int_in(obj, "height", 2, 1 << 30)
    if width > limits.max_width or height > limits.max_height:
        raise SchemaError("too_large", f"{width}x{height} exceeds the {limits.max_width}x{limits.max_height} limit")
    pix_fmt = _get(obj, "pix_fmt", str)
    if pix_fmt not in PIX_FMTS:
        raise SchemaError("bad_field", f"pix_fmt {pix_fmt!r} not in {PIX_FMTS}")
    fps_num = _int_in(obj, "fps_num", 1, 1_000_000)
    fps_den = _int_in(obj, "fps_den", 1, 1_000_000)
    if not 0.01 <= fps_num / fps_den <= 1000:
        raise SchemaError("bad_field", f"frame rate {fps_num}/{fps_den} outside [0.01, 1000]")
    first_pts = _int_in(obj, "first_pts", -(2**62), 2**62)
    captured_at = _unix_time(obj, "captured_at")
    count = _int_in(obj, "frame_count", 1, limits.max_frames)
    frames = _get(obj, "frames", list)
    if len(frames) != count:
        raise SchemaError("truncated", f"frame_count says {count} but {len(frames)} frames arrived")
    fsize = frame_size(width, height, pix_fmt)
    if fsize * count > limits.max_batch_bytes:
        raise SchemaError("too_large", f"batch of {fsize * count} raw bytes exceeds {limits.max_batch_bytes}")
    for i, f in enumerate(frames):
        if not isinstance(f, bytes):
            raise SchemaError("bad_field", f"frame {i} is {type(f).__name__}, expected bytes")
        if len(f) != fsize:
            raise SchemaError(
                "bad_frame_size", f"frame {i} has {len(f)} bytes; {width}x{height} {pix_fmt} needs {fsize}"
            )
    arr = np.frombuffer(b"".join(frames), np.uint8).reshape(count, fsize)
    live = _get(obj, "live", bool, optional=True)
    return FrameBatch(sid, seq, width, height, fps_num, fps_den, first_pts, captured_at, arr, pix_fmt,
                      True if live is None else live)


# --------------------------------------------------------------------------- CompressedBatch


@dataclass(frozen=True)
class CompressedBatch:
    """A coded batch for receivers.  ``payload`` is self-describing (see shared.codecs)."""

    stream_id: str
    batch_seq: int
    codec: str
    width: int
    height: int
    frame_count: int
    fps_num: int
    fps_den: int
    first_pts: int
    captured_at: float
    encoded_at: float
    worker_id: str
    payload: bytes
    pix_fmt: str = "yuv420p"

    @property
    def msg_id(self) -> str:
        return f"{self.stream_id}:{self.batch_seq}"

    def pack(self) -> bytes:
        d = asdict(self)
        d.update(v=SCHEMA_VERSION, kind="compressed_batch")
        return msgpack.packb(d, use_bin_type=True)


def unpack_compressed_batch(data: bytes) -> CompressedBatch:
    obj = _load(data, "compressed_batch")
    return CompressedBatch(
        stream_id=_stream_id(obj),
        batch_seq=_int_in(obj, "batch_seq", 0, 2**62),
        codec=_get(obj, "codec", str),
        width=_int_in(obj, "width", 2, 1 << 16),
        height=_int_in(obj, "height", 2, 1 << 16),
        frame_count=_int_in(obj, "frame_count", 1, 1 << 16),
        fps_num=_int_in(obj, "fps_num", 1, 1_000_000),
        fps_den=_int_in(obj, "fps_den", 1, 1_000_000),
        first_pts=_int_in(obj, "first_pts", -(2**62), 2**62),
        captured_at=_unix_time(obj, "captured_at"),
        encoded_at=_float(obj, "encoded_at", lo=0.0),
        worker_id=_get(obj, "worker_id", str),
        payload=_get(obj, "payload", bytes),
        pix_fmt=_get(obj, "pix_fmt", str),
    )


# --------------------------------------------------------------------------- BatchMetrics


@dataclass(frozen=True)
class BatchMetrics:
    """One row per batch in PostgreSQL: what was coded, how well, how fast, or why not."""

    batch_id: str  # "<stream_id>:<batch_seq>", or "<stream_id>:js<seq>" when the batch had no readable id
    stream_id: str
    status: str  # ok | rejected | failed
    worker_id: str
    completed_at: float
    batch_seq: int | None = None
    reason: str | None = None
    codec: str | None = None
    codec_params: str | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    raw_bytes: int | None = None
    compressed_bytes: int | None = None
    kbps: float | None = None
    psnr_y: float | None = None
    psnr_rgb: float | None = None
    ms_ssim: float | None = None
    ms_ssim_frames: int | None = None
    encode_ms: float | None = None
    quality_ms: float | None = None
    latency_ms: float | None = None
    captured_at: float | None = None
    attempts: int | None = None
    level: int | None = None  # rate level of the codec used
    fallback_reason: str | None = None  # why native went out instead of neural: quality | size | latency | error
    baseline_bytes: int | None = None  # native payload at matched quality, on sampled batches
    mode: str | None = None  # the stream's compression mode when the batch was coded
    budget_kbps: float | None = None  # the stream's bandwidth budget when the batch was coded
    # Chained streams: why this batch starts with a real key frame (KEYFRAME_REASONS); None when it
    # predicts from the previous batch, or for codecs that code every batch as a closed GOP.
    keyframe_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def pack(self) -> bytes:
        d = asdict(self)
        d.update(v=SCHEMA_VERSION, kind="batch_metrics")
        return msgpack.packb(d, use_bin_type=True)


_METRIC_INTS = (
    "batch_seq", "frames", "width", "height", "raw_bytes", "compressed_bytes", "ms_ssim_frames", "attempts",
    "level", "baseline_bytes",
)  # fmt: skip
FALLBACK_REASONS = ("quality", "size", "latency", "error")
#: Why a batch of a chained stream starts with a real key frame instead of the previous batch's frame.
#: ``segment``: a batch that is not live starts a new segment of its stream (``--segment-batches``), so
#: that several workers can code one recorded file's backlog at once.
KEYFRAME_REASONS = ("first", "no_reference", "timeout", "periodic", "requested", "resolution", "codec_change",
                    "segment")
#: Per-stream compression modes (see docs/architecture.md).
MODES = ("conservative", "adaptive", "aggressive", "off")
_METRIC_BIGINTS = ("batch_seq", "raw_bytes", "compressed_bytes", "baseline_bytes")
_METRIC_FLOATS = ("kbps", "psnr_y", "psnr_rgb", "ms_ssim", "encode_ms", "quality_ms", "latency_ms", "captured_at",
                  "budget_kbps")
_METRIC_STRS = ("reason", "codec", "codec_params")


def unpack_batch_metrics(data: bytes) -> BatchMetrics:
    obj = _load(data, "batch_metrics")
    status = _get(obj, "status", str)
    if status not in STATUSES:
        raise SchemaError("bad_field", f"status {status!r} not in {STATUSES}")
    batch_id = _get(obj, "batch_id", str)
    if not 1 <= len(batch_id) <= 160:
        raise SchemaError("bad_field", "batch_id must be 1..160 characters")
    # Bounded by the columns they land in (integer vs bigint), so that no valid record can fail the insert.
    kw: dict[str, Any] = {k: _int_in(obj, k, 0, 2**62 if k in _METRIC_BIGINTS else 2**31 - 1, optional=True)
                          for k in _METRIC_INTS}
    kw.update({k: _float(obj, k, optional=True) for k in _METRIC_FLOATS})
    kw["captured_at"] = _unix_time(obj, "captured_at", optional=True)
    kw.update({k: _get(obj, k, str, optional=True) for k in _METRIC_STRS})
    kw["mode"] = _get(obj, "mode", str, optional=True)
    if kw["mode"] not in (None, *MODES):
        raise SchemaError("bad_field", f"mode {kw['mode']!r} not in {MODES}")
    kw["fallback_reason"] = _get(obj, "fallback_reason", str, optional=True)
    if kw["fallback_reason"] not in (None, *FALLBACK_REASONS):
        raise SchemaError("bad_field", f"fallback_reason {kw['fallback_reason']!r} not in {FALLBACK_REASONS}")
    kw["keyframe_reason"] = _get(obj, "keyframe_reason", str, optional=True)
    if kw["keyframe_reason"] not in (None, *KEYFRAME_REASONS):
        raise SchemaError("bad_field", f"keyframe_reason {kw['keyframe_reason']!r} not in {KEYFRAME_REASONS}")
    extra = _get(obj, "extra", dict, optional=True) or {}
    try:
        text = json.dumps(extra)
    except (TypeError, ValueError):
        raise SchemaError("bad_field", "field 'extra' must hold JSON values only") from None
    if "\\u0000" in text:  # nor can jsonb
        raise SchemaError("bad_field", "field 'extra' contains a NUL character")
    return BatchMetrics(
        batch_id=batch_id,
        stream_id=_stream_id(obj),
        status=status,
        worker_id=_get(obj, "worker_id", str),
        completed_at=_unix_time(obj, "completed_at"),
        extra=extra,
        **kw,
    )
