"""The per-batch codec policy: the learned path goes out only when it is at least as good.

For each batch the learned codec (``neural`` or ``hybrid``) codes first.  Native
goes out instead when the learned path fails (``error``), is too slow
(``latency``), misses the quality target (``quality``), or — on sampled batches,
where the native codec also codes the batch at matched quality — spends more
bytes (``size``); a stream whose sampled batch went out natively for size stays
native, at that rate and without running the model, until its next sampled
batch.  Every fallback is named in the metrics row; none is silent.

"Matched quality" is the native codec's cheapest payload whose quality reaches
the learned payload's: for native codecs with a CRF, a binary search over every
integer CRF its levels span (about five encodes), not just over the eight
levels, so the size comparison is not flattered by coarse steps.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared.codecs import Codec, NativeCodec, read_header
from shared.config import PolicyConfig
from shared.quality import measure_batch, ms_ssim, psnr, sample_indices
from shared.pixfmt import split_planes, to_rgb
from shared.schemas import FrameBatch

if TYPE_CHECKING:  # choice.py uses this module's rate search
    from services.compressor.choice import CodecChoice

@dataclass(frozen=True)
class Coded:
    """The payload that goes out, and why."""

    payload: bytes
    decoded: np.ndarray
    codec: str
    level: int | None
    fallback_reason: str | None = None
    detail: str | None = None
    baseline_bytes: int | None = None


def batch_quality(metric: str, fb: FrameBatch, decoded: np.ndarray) -> float:
    """The policy's metric for a decoded batch: PSNR-Y on all frames, RGB metrics on the last frame."""
    w, h = fb.width, fb.height
    if metric == "psnr_y":
        return measure_batch(fb.frames, decoded, w, h, 0).psnr_y
    i = sample_indices(len(fb.frames), 1)[0]
    if metric == "psnr_rgb":
        return psnr(to_rgb(fb.frames[i], w, h), to_rgb(decoded[i], w, h))
    value = ms_ssim(split_planes(fb.frames[i], w, h)[0], split_planes(decoded[i], w, h)[0])
    # Under 11 px a side there is no MS-SSIM: a target nobody can measure is not met (native goes out).
    return -math.inf if value is None else value


class Policy:
    """Chooses, per batch, between a neural codec (may be None: native only) and a native one."""

    def __init__(self, neural: Codec | None, native: Codec, cfg: PolicyConfig, level: int | None = None,
                 choice: CodecChoice | None = None):
        self.neural, self.native, self.cfg, self.level = neural, native, cfg, level
        self.choice = choice  # native only: a challenger tried per stream (services.compressor.choice)
        # Soft state per stream: the native rate (encode options) that beat the learned payload at the
        # last sampled batch, and that batch's number.  Until the next sample, that stream's batches go
        # out natively at that rate without running the model.  Losing it (restart, another worker)
        # only costs a learned attempt.
        self._native_wins: dict[str, tuple[dict, int]] = {}
        self._learned_lock = threading.Lock()

    def code(self, fb: FrameBatch, decision=None, reference=None, preset: str | None = None) -> Coded:
        """Code one batch.  ``decision`` (from the stream's live config and bandwidth budget) overrides
        the level and, for the PSNR-Y metric, the target; mode ``off`` codes natively; a budget caps
        the payload (see :meth:`_fit_budget`).  ``reference`` (a native chaining codec only): the
        previous batch's last decoded frame, which every native coding of this batch predicts from;
        ``preset``: the native encoder's speed preset for this batch (see services.compressor.speed)."""
        ref = {k: v for k, v in (("reference", reference), ("preset", preset)) if v is not None}
        level, target = self.level, self.cfg.target
        off = decision is not None and decision.mode == "off"
        if decision is not None:
            level = level if decision.level is None else decision.level
            if decision.target is not None and self.cfg.metric == "psnr_y":
                target = decision.target
        if self.neural is None and not off and self.choice is not None and not fb.live:
            t = self.choice.code(fb, self.native, level, ref)
            coded = Coded(t.payload, t.decoded, t.codec, _level(t.payload), None, t.detail, t.baseline_bytes)
        elif self.neural is None or off:
            payload, decoded = self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps,
                                                              None if off else level, **ref)
            coded = Coded(payload, decoded, self.native.name, _level(payload))
        else:
            coded = self._code_learned(fb, level, target, ref)
        if decision is not None and decision.budget_kbps:
            coded = self._fit_budget(fb, coded, decision.budget_kbps, ref)
        return coded

    def _fit_budget(self, fb: FrameBatch, coded: Coded, budget_kbps: float, ref: dict | None = None) -> Coded:
        """The best payload within the batch's share of the budget.

        The learned codec steps down its levels first; if none fits, native goes out at the lowest
        CRF (best quality) that fits, found by binary search up to the encoder's coarsest CRF.
        Quality targets yield to the budget: a stream that must fit a link gets the best picture
        that fits.
        """
        limit = int(budget_kbps * 1000 / 8 * fb.frame_count / fb.fps)
        if len(coded.payload) <= limit:
            return coded
        if self.neural is not None and coded.codec == self.neural.name and coded.level is not None:
            for lv in range(coded.level - 1, -1, -1):
                payload, decoded = self.neural.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, lv,
                                                                  **_for(self.neural, ref))
                if len(payload) <= limit:
                    return Coded(payload, decoded, self.neural.name, lv, None, f"level {lv} to fit {budget_kbps:g} kbps")
        if not isinstance(self.native, NativeCodec):
            return coded
        ref = _for(self.native, ref)
        best = _first_passing(self.native.crf_range[0], self.native.max_crf,
                              lambda crf: self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps,
                                                                         crf=crf, **ref),
                              lambda coded: len(coded[0]) <= limit)
        fits = best is not None
        payload, decoded = best or self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps,
                                                                  crf=self.native.max_crf, **ref)
        learned = self.neural is not None and coded.codec == self.neural.name
        detail = (f"native CRF {read_header(payload)[0].params['crf']} to fit {budget_kbps:g} kbps"
                  + ("" if fits else " (does not fit even at the highest CRF)"))
        return Coded(payload, decoded, self.native.name, None, "size" if learned else coded.fallback_reason, detail)

    def _code_learned(self, fb: FrameBatch, level: int | None, target: float, ref: dict) -> Coded:
        """``ref``: the batch's reference and preset, for whichever codec can take them (a chained
        stream: the hybrid on a chained base, and the native codec behind it)."""
        sampled = bool(self.cfg.compare_every) and fb.batch_seq % self.cfg.compare_every == 0
        won = self._native_wins.get(fb.stream_id)
        if won is not None and not sampled and 0 < fb.batch_seq - won[1] < self.cfg.compare_every:
            payload, decoded = self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, **won[0],
                                                              **_for(self.native, ref))
            return Coded(payload, decoded, self.native.name, _level(payload), "size",
                         f"native was smaller at matched quality on sampled batch {won[1]}")
        # A model codes one batch at a time; the clock starts once this batch has it, so waiting
        # behind another batch of the worker never counts as this batch's coding time.
        with self._learned_lock:
            t0 = time.perf_counter()
            try:
                payload, decoded = self.neural.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, level,
                                                                  **_for(self.neural, ref))
            except Exception as exc:  # a model failure must not lose the batch: native goes out
                payload = decoded = None
                error = f"{type(exc).__name__}: {exc}"
            ms = (time.perf_counter() - t0) * 1000
        if payload is None:
            return self._native(fb, "error", error, target, ref)
        if self.cfg.latency_budget_ms and ms > self.cfg.latency_budget_ms:
            return self._native(fb, "latency", f"neural took {ms:.0f} ms > {self.cfg.latency_budget_ms:.0f} ms",
                                target, ref)
        q = batch_quality(self.cfg.metric, fb, decoded)
        if q < target:
            return self._native(fb, "quality", f"{self.neural.name} {self.cfg.metric} {q:.3f} < target {target}",
                                target, ref)
        if not sampled:
            return Coded(payload, decoded, self.neural.name, _level(payload))
        base = self._native_at_least(fb, q, ref)
        if len(base[0]) < len(payload):
            self._native_wins[fb.stream_id] = (_rate_options(base[0]), fb.batch_seq)
            return Coded(base[0], base[1], self.native.name, _level(base[0]), "size",
                         f"native {len(base[0])} B < neural {len(payload)} B at {self.cfg.metric} >= {q:.3f}",
                         len(base[0]))
        self._native_wins.pop(fb.stream_id, None)
        return Coded(payload, decoded, self.neural.name, _level(payload), baseline_bytes=len(base[0]))

    def _native(self, fb: FrameBatch, reason: str, detail: str, target: float, ref: dict) -> Coded:
        """The native payload that meets the target (or the best it has), as a named fallback."""
        payload, decoded = self._native_at_least(fb, target, ref)
        return Coded(payload, decoded, self.native.name, _level(payload), reason, detail)

    def _native_at_least(self, fb: FrameBatch, quality: float, ref: dict) -> tuple[bytes, np.ndarray]:
        """The fewest-bits native payload whose quality reaches ``quality`` (or the best native can do)."""
        if isinstance(self.native, NativeCodec):
            return self._native_crf_at_least(fb, quality, _for(self.native, ref))
        top = self.native.levels - 1
        code = lambda level: self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, level)  # noqa: E731
        best = _first_passing(0, top, code, lambda coded: batch_quality(self.cfg.metric, fb, coded[1]) >= quality)
        return best or code(top)  # nothing reaches it: the top level is the best native can do

    def _native_crf_at_least(self, fb: FrameBatch, quality: float, ref: dict) -> tuple[bytes, np.ndarray]:
        """The native coding at the largest CRF (fewest bits) whose quality reaches ``quality``."""
        found = cheapest_crf(self.native, fb, lambda decoded: batch_quality(self.cfg.metric, fb, decoded) >= quality,
                             **ref)
        if found is not None:
            return found[1]
        # Nothing reaches it: the best the level range offers.
        return self.native.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, crf=self.native.crf_range[0],
                                              **ref)


def cheapest_crf(codec: NativeCodec, fb: FrameBatch, passes, **kw) -> tuple[int, tuple[bytes, np.ndarray]] | None:
    """(crf, (payload, decoded)) at the largest CRF of the codec's level range whose decoded frames
    ``passes``, by binary search (about five encodes; quality falls as CRF rises); None if none does.
    ``kw``: further encode options (reference, preset)."""
    best_crf, worst_crf = codec.crf_range

    def code(i: int):
        crf = worst_crf - i
        return crf, codec.encode_reconstruct(fb.frames, fb.width, fb.height, fb.fps, crf=crf, **kw)

    return _first_passing(0, worst_crf - best_crf, code, lambda coded: passes(coded[1][1]))


def _for(codec: Codec, ref: dict | None) -> dict:
    """The reference and preset options ``codec`` takes: all of them if it chains, else none (a
    closed-GOP codec behind a chained one starts its batch with a key frame, decodable alone)."""
    return dict(ref or {}) if getattr(codec, "chains", False) else {}


def _first_passing(lo: int, hi: int, code, passes):
    """Binary search over a rate knob: the coding at the smallest ``x`` in ``lo..hi`` for which
    ``passes(code(x))`` holds, given that it holds from some ``x`` on; None if it never does."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        coded = code(mid)
        if passes(coded):
            best, hi = coded, mid - 1
        else:
            lo = mid + 1
    return best


def _rate_options(payload: bytes) -> dict:
    """How to code the next batches at this payload's rate: its level, else its CRF."""
    params = read_header(payload)[0].params
    return {"level": params["level"]} if params.get("level") is not None else {"crf": params["crf"]}


def _level(payload: bytes) -> int | None:
    params = read_header(payload)[0].params
    return params.get("level")
