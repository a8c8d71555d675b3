"""Per stream, the slowest encoder preset this worker can afford: fewer bytes where the CPU allows.

A slower x264 preset needs markedly fewer bytes for the same quality (docs/benchmarks.md,
"Chained batches": medium against veryfast), but a live stream must be coded as fast as it
arrives.  After each batch the worker compares the wall time its encoder took with the batch's
duration: above :data:`SLOW_SHARE` of it, or when the batch reached the encoder late (the worker is
behind), the stream's next batch uses the next faster preset; below :data:`FAST_SHARE`, the next
slower one.  Wall time, not CPU time, so that a loaded machine (more
streams, other processes) moves every stream to faster presets by itself.  The preset is named in
each payload's header, so a receiver needs no notice of a change.  Soft state: a new worker starts
each stream at :data:`START`.  Batches that are not live (a recorded file published at full speed,
``FrameBatch.live``) have no deadline and get the slowest preset of the ladder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Streams whose preset a worker remembers (the least recently coded go first; they restart at START).
MAX_STREAMS = 4096

#: Presets from most bytes saved to fastest, per native codec that has a ladder.
LADDERS = {
    "x264": ("medium", "fast", "faster", "veryfast", "superfast", "ultrafast"),
    "x264-psnr": ("medium", "fast", "faster", "veryfast", "superfast", "ultrafast"),
    "av1": ("8", "10", "12"),
}
#: Where a live stream starts: the fastest preset, climbing one step per batch while the measured
#: encode time affords it (five batches, 1.3 s at 30 fps, to medium).  Starting slower built a backlog
#: of seconds on a 2-core machine at 720p30 that took a minute to drain.
START = {"x264": "ultrafast", "x264-psnr": "ultrafast", "av1": "12"}
#: Encode wall time as a share of the batch's duration above which the next batch goes one step faster
#: (leaving the rest of the batch's time for the pipeline's other work and for other streams) ...
SLOW_SHARE = 0.6
#: ... and below which it goes one step slower, unless the batch was late.
FAST_SHARE = 0.3
#: A batch that reached its encoder more than this many batch durations after its capture was late: the
#: worker is behind (CPU taken by other streams, the bus, quality measurement), so the next goes faster.
LATE_BATCHES = 1.0


class PresetGovernor:
    """Chooses each stream's preset from its last batches' measured encode times."""

    def __init__(self, codec: str, fixed: str | None = None):
        self.ladder = LADDERS.get(codec, ())
        self.fixed = fixed  # --preset given: no adaptation
        self._start = START.get(codec)
        self._index: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def adaptive(self) -> bool:
        return bool(self.ladder) and self.fixed is None

    def preset(self, stream_id: str, live: bool = True) -> str | None:
        """The preset for the stream's next batch (None: the codec's own).  A batch that is not
        live (a recorded file at full speed) has no deadline: the slowest preset, fewest bytes."""
        if not self.adaptive:
            return self.fixed
        if not live:
            return self.ladder[0]
        with self._lock:
            i = self._index.setdefault(stream_id, self.ladder.index(self._start))
        return self.ladder[i]

    def observe(self, stream_id: str, encode_s: float, duration_s: float, live: bool = True,
                lag_s: float = 0.0) -> None:
        """After a batch: ``encode_s`` its encoder's wall time, ``lag_s`` how long after its capture
        it reached the encoder (queueing, transfer, waiting for the previous batch)."""
        if not self.adaptive or duration_s <= 0 or not live:
            return
        share = encode_s / duration_s
        late = lag_s > LATE_BATCHES * duration_s
        with self._lock:
            i = self._index.get(stream_id, self.ladder.index(self._start))
            if share > SLOW_SHARE or late:
                i = min(i + 1, len(self.ladder) - 1)
            elif share < FAST_SHARE:
                i = max(i - 1, 0)
            self._index[stream_id] = i
            self._index.move_to_end(stream_id)
            while len(self._index) > MAX_STREAMS:
                self._index.popitem(last=False)
