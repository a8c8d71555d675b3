"""The reference hand-off on the bus: each stream's latest decoded frame, for the next batch's worker.

After a worker delivers batch k of a chained stream, it publishes the frame a
receiver now holds (batch k's last decoded frame) on ``aic.refs.<stream>.<part>``
(stream ``AIC_REFS``: one message per subject, so only the latest is kept, and
parts so that a 4K frame fits a stock ``max_payload``).  The worker that gets
batch k+1 uses it only if it is exactly batch k's: the parts name the batch,
the frame size and a digest of the pixels.  Its own copy serves first when it
coded batch k itself; the bus copy serves failover and several workers.

A stream that is not live (a recorded file published at full speed) is cut
into segments at its real key frames that need no reference (periodic ones,
and every ``segment_batches`` batches), so that several workers code its
backlog at once: each segment is its own chain, its references kept under
``aic.refs.<stream>.c<first batch>.<part>``, and removed once the segment's
last batch is delivered.

A worker waits a bounded time for batch k's reference (batch k may still be
coding on another worker), then codes a real key frame and says why
(``timeout``, ``no_reference``).  All of it is soft state: losing a reference
costs a key frame, never a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from nats.js.errors import NotFoundError

from shared import bus as busmod
from shared.codecs.reference import Reference, frame_digest
from shared.logs import get_logger
from shared.pixfmt import frame_size
from shared.schemas import subject_key

log = get_logger("compressor")

BATCH_HEADER = "Aic-Ref-Batch"
SIZE_HEADER = "Aic-Ref-Size"
PARTS_HEADER = "Aic-Ref-Parts"
DIGEST_HEADER = "Aic-Ref-Digest"
CODEC_HEADER = "Aic-Ref-Codec"
SINCE_HEADER = "Aic-Ref-Since"  # the batch whose key frame began this chain
#: How often a waiting worker looks at the bus for the reference it needs.
POLL_S = 0.02
#: Streams whose latest reference a worker keeps in memory, and the bytes they may take (a 1080p
#: frame is 3 MB, a 4K one 12 MB); past either, the oldest go (their next batch reads the bus copy).
LOCAL_STREAMS = 64
LOCAL_BYTES = 256 << 20


def refs_subject(chain: str, part: int) -> str:
    return f"{busmod.REFS_PREFIX}.{subject_key(chain)}.{part}"


def chain_key(stream_id: str, start: int | None = None) -> str:
    """The key a chain's references are kept under: its stream (``<stream>``: one chain), or, for a
    stream that is not live, the chain that starts at batch ``start`` (``<stream>~c<start>``), since
    several segments of one stream are coded at once and each has its own latest reference.  (``~``,
    which no stream id holds: with a dot, tenant ``a``'s stream ``c4`` and the default tenant's
    stream ``a`` from batch 4 would share a key.)"""
    return stream_id if start is None else f"{stream_id}~c{start}"


def stream_of(chain: str) -> str:
    return chain.partition("~")[0]


@dataclass(frozen=True)
class Handed:
    """What a batch gets from the hand-off: the reference to chain to, or why there is none."""

    reference: Reference | None
    reason: str | None  # a KEYFRAME_REASONS value when reference is None


class ReferenceStore:
    """Publishes and finds each stream's latest reference: this worker's copy first, then the bus."""

    def __init__(self, bus, wait_s: float, max_wait_s: float = 600.0):
        self.bus, self.wait_s, self.max_wait_s = bus, wait_s, max_wait_s
        # Batches this worker holds (waiting or coding): the batch after one of them waits for it as
        # long as it takes (up to max_wait_s), since it is sure to hand a reference on or fail.
        self._inflight: set[tuple[str, int]] = set()
        self._published: dict[str, int] = {}  # stream -> the latest batch whose reference this worker published
        self._locks: dict[str, asyncio.Lock] = {}
        # stream -> (ref, codec, batch, when): this worker's own hand-offs, which expire as the bus's do
        self._local: OrderedDict[str, tuple[Reference | None, str, int, float]] = OrderedDict()

    async def publish(self, chain: str, batch: int, width: int, height: int, frame: np.ndarray | None,
                      codec: str, since: int | None = None) -> None:
        """Hand batch ``batch``'s last decoded frame on (``frame`` None: the batch went out with a
        codec whose output is not a reference, which the next batch learns at once)."""
        ref = self.remember(chain, batch, width, height, frame, codec, since)
        lock = self._locks.setdefault(chain, asyncio.Lock())
        async with lock:  # one writer per stream at a time, so parts of two batches never mix
            if batch < self._published.get(chain, -1):
                return  # a later batch of the stream (coded meanwhile) is on the bus: latest only, never older
            self._published[chain] = batch
            await self._write(chain, batch, width, height, ref, codec)
        if not lock.locked() and len(self._locks) > 4 * LOCAL_STREAMS:
            self._locks.pop(chain, None)

    async def _write(self, chain: str, batch: int, width: int, height: int, ref: Reference | None,
                     codec: str) -> None:
        data = b"" if ref is None else ref.frame.tobytes()
        chunk = self.bus.max_inline
        parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
        headers = {BATCH_HEADER: str(batch), SIZE_HEADER: f"{width}x{height}", PARTS_HEADER: str(len(parts)),
                   DIGEST_HEADER: "" if ref is None else ref.digest, CODEC_HEADER: codec}
        if ref is not None and ref.since is not None:
            headers[SINCE_HEADER] = str(ref.since)
        # Part 0 last: a reader that sees the new part 0 finds every other part of the same batch.
        for i in (*range(1, len(parts)), 0):
            await self.bus.js.publish(refs_subject(chain, i), parts[i], headers=headers)

    def remember(self, chain: str, batch: int, width: int, height: int, frame: np.ndarray | None,
                 codec: str, since: int | None = None) -> Reference | None:
        """Keep batch ``batch``'s reference for this worker's next batch of the stream, which may then
        start coding while this one is still measured and published (call on the event loop)."""
        held = self._local.get(chain)
        if held is not None and held[2] == batch and held[1] == codec and (held[0] is None) == (frame is None):
            return held[0]  # kept when the batch was coded; publishing it needs no second copy
        ref = None if frame is None else Reference(batch, width, height, np.array(frame, copy=True), since)
        if held is not None and held[2] > batch:
            return ref  # batches finished out of order: the later one's stays
        self._local[chain] = (ref, codec, batch, time.monotonic())
        self._local.move_to_end(chain)
        while len(self._local) > LOCAL_STREAMS or (
                len(self._local) > 1 and sum(r.frame.nbytes for r, *_ in self._local.values() if r) > LOCAL_BYTES):
            self._local.popitem(last=False)
        while len(self._published) > 16 * LOCAL_STREAMS:
            self._published.pop(next(iter(self._published)))
        return ref

    def begin(self, stream_id: str, batch: int) -> None:
        self._inflight.add((stream_id, batch))

    def end(self, stream_id: str, batch: int) -> None:
        self._inflight.discard((stream_id, batch))

    def drop(self, chain: str, batch: int) -> None:
        """Forget this worker's copy of batch ``batch``'s reference: its delivery failed, and the
        coding that receivers get (after a redelivery) may be another."""
        held = self._local.get(chain)
        if held is not None and held[2] == batch:
            del self._local[chain]

    async def end_chain(self, chain: str) -> None:
        """A segment is complete (its last batch is delivered): its reference will never be needed
        again, so it leaves the bus and this worker's memory now rather than at its expiry."""
        self._local.pop(chain, None)
        self._published.pop(chain, None)
        await self.bus.js.purge_stream(busmod.REFS_STREAM, subject=f"{busmod.REFS_PREFIX}.{subject_key(chain)}.*")  # its parts only, not a longer id

    async def for_batch(self, chain: str, batch: int, wait_s: float | None = None) -> Handed:
        """Batch ``batch - 1``'s reference in ``chain`` (:func:`chain_key`), waiting up to ``wait_s``
        (default: the store's) for it to appear, or as long as this worker is still coding batch
        ``batch - 1`` (up to ``max_wait_s``)."""
        if batch == 0:
            return Handed(None, "first")
        wait_s = self.wait_s if wait_s is None else wait_s
        start = time.monotonic()
        deadline = start + wait_s
        seen = None
        while True:
            here = (stream_of(chain), batch - 1) in self._inflight  # this worker is still on it
            if here:
                deadline = max(deadline, min(time.monotonic() + wait_s, start + self.max_wait_s))
            local = self._local.get(chain)
            if local is not None and local[2] == batch - 1 and time.monotonic() - local[3] < busmod.REFS_MAX_AGE_S:
                found = local[:3]
            elif here:
                found = None  # it will be this worker's own copy: no need to read the bus meanwhile
            else:
                found = await self._fetch(chain, batch - 1)
            if found is not None:
                ref, codec, got = found
                seen = got
                if got == batch - 1:
                    # No frame: the batch went out with a learned codec (codec_change), or the bus kept
                    # another coding of it than the one this frame came from (no codec named).
                    return Handed(ref, None) if ref is not None else Handed(None, "codec_change" if codec else "no_reference")
            if time.monotonic() >= deadline:
                return Handed(None, "no_reference" if seen is None else "timeout")
            await asyncio.sleep(POLL_S)

    async def _fetch(self, chain: str, want: int | None = None) -> tuple[Reference | None, str, int] | None:
        """The bus's latest reference of a stream, or None (none, expired, or caught mid-update).
        When it is not batch ``want``, only its header is read (the caller just learns which it is)."""
        try:
            head = await self.bus.js.get_last_msg(busmod.REFS_STREAM, refs_subject(chain, 0), direct=True)
        except NotFoundError:
            return None
        except Exception as exc:  # the bus in trouble: a key frame after the wait, not a failure
            log.debug("reference_unavailable", chain=chain, error=f"{type(exc).__name__}: {exc}")
            return None
        h = head.headers or {}
        try:
            batch, parts = int(h[BATCH_HEADER]), int(h[PARTS_HEADER])
            width, height = (int(x) for x in h[SIZE_HEADER].split("x"))
            digest, codec = h[DIGEST_HEADER], h.get(CODEC_HEADER, "")
            since = int(h[SINCE_HEADER]) if h.get(SINCE_HEADER) else None
        except (KeyError, ValueError):
            return None
        if not digest or (want is not None and batch != want):
            return None, codec, batch
        data = [head.data or b""]
        for i in range(1, parts):
            try:
                part = await self.bus.js.get_last_msg(busmod.REFS_STREAM, refs_subject(chain, i), direct=True)
            except Exception:
                return None
            if (part.headers or {}).get(DIGEST_HEADER) != digest:
                return None  # a newer reference is being written: look again
            data.append(part.data or b"")
        raw = b"".join(data)
        if len(raw) != frame_size(width, height):
            return None
        frame = np.frombuffer(raw, np.uint8)
        if frame_digest(frame) != digest:
            return None
        return Reference(batch, width, height, frame, since), codec, batch
