"""Configuration from the environment, overridable by command-line flags.

Each service takes a typed, validated config object; nothing reads the
environment after start-up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
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
    retention_s: float = 24 * 3600.0
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


def data_dir(path: str | None = None) -> Path:
    """Where embedded servers keep their data: ``--data-dir``, ``AIC_DATA_DIR`` or ``./.aic``."""
    return Path(path or env_str("AIC_DATA_DIR", ".aic")).resolve()
