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
    ack_wait_s: float = 30.0
    max_deliver: int = 4
    retention_s: float = 24 * 3600.0
    dedup_window_s: float = 120.0

    @classmethod
    def from_env(cls, nats_url: str | None = None) -> "BusConfig":
        return cls(
            nats_url=nats_url or env_str("AIC_NATS_URL", cls.nats_url),
            ack_wait_s=float(env_int("AIC_ACK_WAIT_S", int(cls.ack_wait_s))),
            max_deliver=env_int("AIC_MAX_DELIVER", cls.max_deliver),
        )


@dataclass(frozen=True)
class CompressorConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    codec: str = "x264"
    crf: int | None = None
    preset: str | None = None
    concurrency: int = 2
    quality_frames: int = 1  # frames per batch for PSNR-RGB and MS-SSIM; -1 = all, 0 = off
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.quality_frames < -1:
            raise ValueError("quality_frames must be -1 (all), 0 (off) or a positive count")


@dataclass(frozen=True)
class MetricsConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    max_rows: int = 1000
    flush_interval_s: float = 0.25

    @staticmethod
    def database_url_from_env(url: str | None = None) -> str:
        return url or env_str("AIC_DATABASE_URL", MetricsConfig.database_url)


def data_dir(path: str | None = None) -> Path:
    """Where embedded servers keep their data: ``--data-dir``, ``AIC_DATA_DIR`` or ``./.aic``."""
    return Path(path or env_str("AIC_DATA_DIR", ".aic")).resolve()
