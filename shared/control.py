"""Per-stream control: compression modes and the config record kept in a NATS KV bucket.

Operators set a stream's mode (and optional overrides) with ``aic config set``
or the HTTP API; every compressor watches the bucket and applies a change to
the stream's next batch, without restart.  A record that names no mode is in
``adaptive``; a stream with no record at all runs on the worker's own flags
(``--target``, ``--level``).

Modes (quality target for the learned path, and the rate levels it may use):

==============  =====================  ======  ===============================================
mode            target                 levels  meaning
==============  =====================  ======  ===============================================
conservative    PSNR-Y 38 dB           4..7    quality first: high levels, a high bar
adaptive        PSNR-Y 34 dB           2..6    the default balance
aggressive      PSNR-Y 30 dB           0..4    bandwidth first: low levels, a low bar
off             (none)                 native  opt-out: native codec only, no neural inference
==============  =====================  ======  ===============================================

Within its range the level moves one step per batch: up after a batch that
missed the target, down after one that beat it by more than
``LEVEL_DOWN_MARGIN_DB``; a bandwidth budget caps it from above.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from shared.schemas import MODES, STREAM_ID_RE, STREAM_ID_RULE, subject_key

KV_BUCKET = "aic_config"
#: Receivers and gateways publish bandwidth estimates on ``aic.control.<stream_id>`` as JSON {"kbps": N}.
CONTROL_PREFIX = "aic.control"
#: A receiver that cannot decode a chained stream asks for a real key frame on
#: ``aic.keyframe.<stream_id>`` with JSON {"from_batch": N}: the stream's first batch N or later
#: that a worker codes after the request starts with a key frame (keyframe_reason ``requested``).
#: (A prefix of its own: under ``aic.control.`` a tenant's stream named ``keyframe`` and a request
#: for the default tenant's stream of the tenant's name would share a subject.)
KEYFRAME_PREFIX = "aic.keyframe"


def keyframe_subject(stream_id: str) -> str:
    return f"{KEYFRAME_PREFIX}.{subject_key(stream_id)}"


def estimate_subject(stream_id: str) -> str:
    return f"{CONTROL_PREFIX}.{subject_key(stream_id)}"


#: A receiver's estimate older than this no longer applies (and the bus keeps none older).
ESTIMATE_FRESH_S = 30.0
DEFAULT_MODE = "adaptive"
LEVEL_DOWN_MARGIN_DB = 2.0


@dataclass(frozen=True)
class ModePreset:
    target: float | None  # PSNR-Y dB; None: no learned path
    level_min: int
    level_max: int


MODE_PRESETS = {
    "conservative": ModePreset(38.0, 4, 7),
    "adaptive": ModePreset(34.0, 2, 6),
    "aggressive": ModePreset(30.0, 0, 4),
    "off": ModePreset(None, 0, 7),
}


class ConfigError(ValueError):
    """A stream config that does not validate (the message says which field and why)."""


@dataclass(frozen=True)
class StreamConfig:
    """What an operator sets for one stream; unset fields take the mode's preset."""

    mode: str = DEFAULT_MODE
    target: float | None = None  # PSNR-Y dB override
    level_min: int | None = None
    level_max: int | None = None
    budget_kbps: float | None = None  # static bandwidth budget; receivers' estimates also apply

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.target is not None and not 10.0 <= self.target <= 100.0:
            raise ConfigError("target is a PSNR-Y in dB, 10..100")
        for name in ("level_min", "level_max"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 7:
                raise ConfigError(f"{name} must be 0..7")
        if self.level_min is not None and self.level_max is not None and self.level_min > self.level_max:
            raise ConfigError("level_min must not exceed level_max")
        if self.budget_kbps is not None and not 1.0 <= self.budget_kbps <= 1e6:
            raise ConfigError("budget_kbps must be 1..1e6")

    @property
    def effective(self) -> ModePreset:
        """The mode's preset with this record's overrides applied."""
        p = MODE_PRESETS[self.mode]
        # An operator's bound always holds; the preset's other bound gives way to it.
        lo, hi = self.level_min, self.level_max
        if lo is None:
            lo = p.level_min if hi is None else min(p.level_min, hi)
        if hi is None:
            hi = max(p.level_max, lo)
        return ModePreset(p.target if self.target is None else self.target, lo, hi)

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "StreamConfig":
        try:
            obj = json.loads(data)
        except ValueError:
            raise ConfigError("stream config is not JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError("stream config must be a JSON object")
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: dict) -> "StreamConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ConfigError(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kw = {}
        for k, v in obj.items():
            if v is None or k == "mode":
                kw[k] = v
            elif k in ("level_min", "level_max"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"{k} must be an integer")
                kw[k] = v
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{k} must be a number")
                kw[k] = float(v)
        return cls(**kw)

    def merged(self, changes: dict) -> "StreamConfig":
        """This config with ``changes`` merged in, as a JSON merge patch (RFC 7396) would: a key set to
        None unsets its override (``mode``: back to the default mode); keys not named keep their value.
        ``PATCH /config/{stream}`` and ``aic config set`` both mean this."""
        current = {k: v for k, v in asdict(self).items() if v is not None}
        for k, v in changes.items():
            if v is None:
                current.pop(k, None)
            else:
                current[k] = v
        return StreamConfig.from_dict(current)

    def describe(self, stream_id: str) -> dict:
        """The one JSON shape of a stream's config, for the API and ``aic config`` alike: what is set,
        and what it means once the mode's preset fills the rest."""
        eff = self.effective
        return {"stream_id": stream_id, "config": json.loads(self.to_json()),
                "effective": {"mode": self.mode, "target_psnr_y": eff.target, "level_min": eff.level_min,
                              "level_max": eff.level_max, "budget_kbps": self.budget_kbps}}

    def updated(self, assignments: list[str]) -> "StreamConfig":
        """This config with ``key=value`` assignments merged in (``key=`` unsets an override)."""
        return self.merged(parse_assignments(assignments))


def parse_assignments(assignments: list[str]) -> dict:
    """``["mode=aggressive", "target=", "level_max=5"]`` → {"mode": "aggressive", "target": None, "level_max": 5}."""
    names = {f.name for f in fields(StreamConfig)}
    changes: dict = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {a!r}")
        if key not in names:
            raise ConfigError(f"unknown key {key!r}; known: {sorted(names)}")
        if value == "":
            changes[key] = None
        elif key == "mode":
            changes[key] = value
        else:
            try:
                changes[key] = int(value) if key.startswith("level") else float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, not {value!r}") from None
    return changes


def check_stream_id(stream_id: str) -> str:
    if not STREAM_ID_RE.match(stream_id):
        raise ConfigError(f"stream id must be {STREAM_ID_RULE}")
    return stream_id
