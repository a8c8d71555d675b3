"""Configuration from the environment, overridable by command-line flags.

Each service takes a typed, validated config object; nothing reads the
environment after start-up.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.schemas import Limits


def env_str(name: str, default: str | None = None) -> str | None:
    val = os.environ.get(name)
    return val if val not in (None, "") else default


def env_int(name: str, default: int) -> int:
    val = os.environ.get(name)
    if val in (None, ""):
        return default
    try:
        return int(val)
    except ValueError:
        raise SystemExit(f"{name}={val!r} is not an integer") from None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``4G``, ``512M``, ``1.5G``, ``1048576`` → bytes (binary units; a trailing ``B``/``iB`` is allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 4G, 512M, 1048576)")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def _size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.3g} {unit}iB"
    return f"{n} B"


def env_bytes(name: str, default: int) -> int:
    val = os.environ.get(name)
    if val in (None, ""):
        return default
    try:
        return parse_bytes(val)
    except ValueError as exc:
        raise SystemExit(f"{name}: {exc}") from None


@dataclass(frozen=True)
class StoreLimits:
    """What aic's streams may hold on the JetStream store, set by the admin (``aic up``, ``aic bus init``)
    from this configuration at every start, never left unbounded.

    The frames stream refuses a batch once it holds ``frames_bytes`` (claim-checked chunks included):
    gateways then wait and retry (backpressure), a live source buffers and then drops with a counted
    row.  The output streams (payloads, metrics, dead letters, references) share ``outputs_bytes`` and
    drop their oldest messages instead of refusing, so a worker can always store what it coded and
    ack it, which is what empties a full frames stream.  A batch still unprocessed ``expire_margin_s``
    before its ``max_age_s`` gets an ``expired`` row instead of vanishing."""

    frames_bytes: int = 4 << 30
    outputs_bytes: int = 4 << 30
    max_age_s: float = 24 * 3600.0
    expire_margin_s: float = 600.0
    #: Room beyond the streams for the KV buckets and the advisories.
    HEADROOM = 64 << 20

    def __post_init__(self):
        if self.frames_bytes < (1 << 20) or self.outputs_bytes < (1 << 20):
            raise ValueError("the frames and outputs limits must be at least 1 MiB each")
        if not self.max_age_s > 0 or self.expire_margin_s < 0:
            raise ValueError("max_age_s must be > 0 and expire_margin_s >= 0")

    @property
    def store_bytes(self) -> int:
        """The JetStream store these streams need at most (``max_file_store`` of an embedded server)."""
        return self.frames_bytes + self.outputs_bytes + self.HEADROOM

    @property
    def expires_after_s(self) -> float:
        """A frame batch this old and still waiting is about to expire: it gets its ``expired`` row.
        The margin is at most a quarter of the age, so that short test ages still code most batches."""
        return self.max_age_s - min(self.expire_margin_s, self.max_age_s / 4)

    def fitted(self, room: int) -> "StoreLimits":
        """These limits shrunk in proportion so that :attr:`store_bytes` fits in ``room`` bytes (a
        disk with less free space than configured); unchanged when they fit."""
        if self.store_bytes <= room:
            return self
        share = max(0.0, room - self.HEADROOM) / (self.frames_bytes + self.outputs_bytes)
        return replace(self, frames_bytes=max(1 << 20, int(self.frames_bytes * share)),
                       outputs_bytes=max(1 << 20, int(self.outputs_bytes * share)))

    def describe(self) -> str:
        return (f"frames ≤ {_size(self.frames_bytes)} (then gateways wait), outputs ≤ {_size(self.outputs_bytes)} "
                f"(oldest dropped), batches kept {self.max_age_s:g} s (expired rows {self.max_age_s - self.expires_after_s:g} s "
                "before)")

    @classmethod
    def from_env(cls) -> "StoreLimits":
        """``AIC_FRAMES_MAX_BYTES``, ``AIC_OUTPUTS_MAX_BYTES`` (sizes: ``4G``), ``AIC_RETENTION_S``,
        ``AIC_EXPIRE_MARGIN_S``."""
        return cls(frames_bytes=env_bytes("AIC_FRAMES_MAX_BYTES", cls.frames_bytes),
                   outputs_bytes=env_bytes("AIC_OUTPUTS_MAX_BYTES", cls.outputs_bytes),
                   max_age_s=float(env_int("AIC_RETENTION_S", int(cls.max_age_s))),
                   expire_margin_s=float(env_int("AIC_EXPIRE_MARGIN_S", int(cls.expire_margin_s))))


@dataclass(frozen=True)
class BusConfig:
    """Where the bus is and how its streams are sized."""

    nats_url: str = "nats://127.0.0.1:4222"
    # Credentials (shared/roles.py): a user and password, and the CA that signed the server's
    # certificate (TLS is used when set, or with a tls:// URL).
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    ack_wait_s: float = 30.0
    max_deliver: int = 4
    store: StoreLimits = field(default_factory=StoreLimits)
    dedup_window_s: float = 120.0
    replicas: int = 1  # copies of every stream, consumer and bucket: 3 on a NATS cluster survives a node loss

    def __post_init__(self):
        if not 1 <= self.replicas <= 5:
            raise ValueError("replicas must be 1..5 (JetStream's range)")

    @classmethod
    def from_env(cls, nats_url: str | None = None, folder: str | Path | None = None,
                 role: str = "admin", tenant: str | None = None) -> "BusConfig":
        """``nats_url``, else ``AIC_NATS_URL``, else a running ``aic up``'s (in ``folder``, see
        :mod:`shared.endpoints`); none of them is a clear error, never a default server.  The
        credentials: ``AIC_NATS_USER`` / ``AIC_NATS_PASSWORD_FILE`` / ``AIC_NATS_CA``, else ``role``'s
        of that ``aic up``."""
        from shared.endpoints import nats_client

        c = nats_client(nats_url, folder, role, tenant)
        return cls(
            nats_url=c.url, user=c.user, password=c.password, ca_file=c.ca_file,
            ack_wait_s=float(env_int("AIC_ACK_WAIT_S", int(cls.ack_wait_s))),
            max_deliver=env_int("AIC_MAX_DELIVER", cls.max_deliver),
            replicas=env_int("AIC_NATS_REPLICAS", cls.replicas),
            store=StoreLimits.from_env(),
        )


POLICY_METRICS = ("psnr_y", "psnr_rgb", "ms_ssim")


@dataclass(frozen=True)
class PolicyConfig:
    """What the neural path must achieve to be delivered."""

    metric: str = "psnr_y"  # psnr_y | psnr_rgb | ms_ssim
    target: float = 34.0  # dB for PSNR, 0..1 for MS-SSIM
    compare_every: int = 8  # 1 in N batches of a stream is also coded natively at matched quality; 0 = never
    latency_budget_ms: float = 0.0  # neural coding time per batch above which native goes out; 0 = no limit

    def __post_init__(self):
        if self.metric not in POLICY_METRICS:
            raise ValueError(f"quality metric must be one of {POLICY_METRICS}, not {self.metric!r}")
        if self.metric == "ms_ssim" and not 0 <= self.target <= 1:
            raise ValueError("an MS-SSIM target lies in 0..1")
        if self.compare_every < 0 or self.latency_budget_ms < 0:
            raise ValueError("compare_every and latency_budget_ms must be >= 0")

    @classmethod
    def parse_target(cls, spec: str) -> tuple[str, float]:
        """``psnr_y:36`` → ("psnr_y", 36.0)."""
        metric, _, value = spec.partition(":")
        try:
            return metric, float(value)
        except ValueError:
            raise ValueError(f"target {spec!r}: expected METRIC:VALUE, e.g. psnr_y:36 or ms_ssim:0.98") from None


@dataclass(frozen=True)
class CompressorConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    codec: str = "auto"  # auto: the neural codec when its weights are present, else x264
    level: int | None = None  # rate level, 0 = fewest bits; None: the codec's default
    model: str | None = None  # neural model name under models/ (None: the default model)
    crf: int | None = None
    preset: str | None = None
    fallback: str = "auto"  # native codec the policy falls back to (auto: the best one for the target's metric)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    concurrency: int = 2
    quality_frames: int = 1  # frames per batch for PSNR-RGB and MS-SSIM; -1 = all, 0 = off
    # ... on 1 batch in N of each stream (batch_seq % N == 0): with them, quality took 91 ms a 720p batch
    # here (docs/benchmarks.md, pipeline efficiency), a third of a live 720p30 batch's time; PSNR-Y is
    # measured on every frame of every batch.
    quality_every: int = 4
    limits: Limits = field(default_factory=Limits)
    batch_timeout_s: float = 600.0  # coding a batch longer than this counts as a failed attempt
    # Reference hand-off (shared/codecs/reference.py): native codecs that can chain code each batch
    # against the previous batch's last decoded frame.
    chain: bool = True
    chain_wait_s: float = 2.0  # how long batch k+1 waits for batch k's reference before a real key frame
    keyframe_every_s: float = 10.0  # a real key frame this often (late joiners); 0 = only when needed
    reorder: bool = True  # x264: B-frames and look-ahead inside the batch (no latency beyond the batch)
    # A chained native codec tried per stream that is not live against the worker's own, on 1 batch in
    # try_every (services/compressor/choice.py): "av1" or "av1:PRESET"; None: the worker's own only.
    try_codec: str | None = None
    try_every: int = 16
    # A stream that is not live (a recorded file published at full speed) is cut into segments, coded
    # in parallel, at its periodic key frames, and also every this many batches (0: no more key frames
    # than the periodic ones), so that a file's backlog is not coded by one worker at a time.
    segment_batches: int = 0
    # Batches a worker holds while they wait for a reference another batch is still coding: they take
    # no codec slot meanwhile, so the worker fetches on and reaches the next segment.
    max_waiting: int = 16

    def __post_init__(self):
        if self.chain_wait_s < 0 or self.keyframe_every_s < 0:
            raise ValueError("chain_wait_s and keyframe_every_s must be >= 0")
        if self.try_every < 1:
            raise ValueError("try_every must be >= 1")
        if self.segment_batches < 0 or self.max_waiting < 0:
            raise ValueError("segment_batches and max_waiting must be >= 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not self.batch_timeout_s > 0:
            raise ValueError("batch_timeout_s must be > 0")
        if self.quality_every < 1:
            raise ValueError("quality_every must be >= 1")
        if self.quality_frames < -1:
            raise ValueError("quality_frames must be -1 (all), 0 (off) or a positive count")


@dataclass(frozen=True)
class MetricsConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # The HTTP API's reads: as aic_reader (row-level security by tenant) where the deployment gives
    # it (AIC_API_DATABASE_URL); else the writer's URL.
    api_database_url: str | None = None
    max_rows: int = 1000
    flush_interval_s: float = 0.25
    retention_days: int = 30  # day partitions older than this are dropped; 0 keeps everything
    partitions_ahead: int = 3  # day partitions created ahead of today

    def __post_init__(self):
        if self.retention_days < 0 or self.partitions_ahead < 0:
            raise ValueError("retention_days and partitions_ahead must be >= 0")

    @staticmethod
    def database_url_from_env(url: str | None = None, folder: str | Path | None = None) -> str:
        """``url``, else ``AIC_DATABASE_URL``, else a running ``aic up``'s (see :mod:`shared.endpoints`)."""
        from shared.endpoints import database_url

        return database_url(url, folder)


@dataclass(frozen=True)
class EdgeConfig:
    """The WebRTC edge (``aic edge``, services/edge): WHIP publishes in, WHEP viewers out."""

    bus: BusConfig = field(default_factory=BusConfig)
    host: str = "127.0.0.1"
    port: int = 8890
    # API tokens (services/metrics/auth.py) are checked against this database (as aic_reader); None:
    # no tokens, and only clients on this machine (loopback) are served.
    database_url: str | None = None
    api_url: str | None = None  # the metrics API, whose rows the watch page shows (proxied, GET only)
    batch_frames: int = 8
    fps: int = 30  # the batches' nominal rate (WebRTC frames are timed by their capture)
    idle_s: float = 5.0  # a publish that sends no frame this long has ended (the peer is gone)
    connect_s: float = 15.0  # ICE and DTLS must be up by then
    max_publishes: int = 16
    max_viewers: int = 32
    rate: float = 2.0  # session POSTs a second per client address (a burst of 4 at once)
    buffer_batches: int = 32  # a publish's batches held while the bus is away (then dropped, counted)
    outage_s: float = 120.0
    # (certificate, key) files: HTTPS, which a browser on another machine needs for its camera
    tls: tuple[str, str] | None = None

    def __post_init__(self):
        if not 1 <= self.batch_frames <= Limits().max_frames:
            raise ValueError(f"batch_frames must be 1..{Limits().max_frames}")
        if not 1 <= self.fps <= 240:
            raise ValueError("fps must be 1..240")
        if min(self.idle_s, self.connect_s, self.rate, self.outage_s) <= 0:
            raise ValueError("idle_s, connect_s, rate and outage_s must be > 0")
        if self.max_publishes < 1 or self.max_viewers < 0 or self.buffer_batches < 0:
            raise ValueError("max_publishes must be >= 1, max_viewers and buffer_batches >= 0")


def data_dir(path: str | None = None) -> Path:
    """Where embedded servers keep their data: ``--data-dir``, ``AIC_DATA_DIR`` or ``./.aic``."""
    return Path(path or env_str("AIC_DATA_DIR", ".aic")).resolve()
