"""Per stream, which chained native codec codes it: the worker's own, or a challenger that needed
fewer bytes for the same quality on the stream's last trial batch (``--try-codec``).

Which codec needs fewer bytes depends on the content and the rate: at the
pipeline's default operating point chained x264 beats chained SVT-AV1 on every
clip measured, while at low rates on camera content SVT-AV1 needs fewer
(docs/benchmarks.md, "Codec choice").  So the worker measures it per stream:
on a trial batch (``batch_seq % every == 1``, if it is chained) of a stream
that is not live it codes the batch with its own codec as usual and with the
challenger at the
largest CRF whose PSNR-Y reaches the same (binary search, as the learned
policy matches quality), and sends the smaller.  Until the next trial the
stream's batches go out with the winner, the challenger at the CRF it won
with.  Both chain to the same reference: a reference is the frame a receiver
holds, whatever codec made it, so a switch costs no key frame.  Live streams
are not tried: the search costs several encodes, which a live deadline does
not afford on the machines measured.  Soft state: a worker that never saw
the stream codes with its own codec until the next trial.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from services.compressor.policy import cheapest_crf
from shared.codecs import NativeCodec
from shared.quality import measure_batch

#: Streams whose winner a worker remembers (the least recently coded go first).
MAX_STREAMS = 4096


@dataclass(frozen=True)
class Tried:
    """A batch as the choice coded it: the payload that goes out and what it was compared with."""

    payload: bytes
    decoded: object  # np.ndarray
    codec: str
    detail: str | None = None
    baseline_bytes: int | None = None  # on trial batches: the other codec's payload at matched quality


def parse_try_codec(spec: str) -> tuple[str, str | None]:
    """``av1:6`` → ("av1", "6"); ``av1`` → ("av1", None)."""
    name, _, preset = spec.partition(":")
    return name, preset or None


class CodecChoice:
    """Chooses, per stream that is not live, between ``own`` and ``challenger`` on measured bytes."""

    def __init__(self, challenger: NativeCodec, every: int = 16, chained_only: bool = True):
        if not challenger.chains:
            raise ValueError(f"--try-codec {challenger.name}: only codecs that chain can be tried")
        if every < 1:
            raise ValueError("the trial interval must be >= 1 batch")
        self.challenger, self.every = challenger, every
        self.chained_only = chained_only  # False: a worker coding closed GOPs (--no-chain) tries them
        self._won: OrderedDict[str, tuple[int, int]] = OrderedDict()  # stream -> (challenger CRF, trial batch)
        self._lock = threading.Lock()

    def code(self, fb, own: NativeCodec, level: int | None, ref: dict) -> Tried:
        """Code a batch of a stream that is not live (``ref``: its reference and preset options)."""
        w, h = fb.width, fb.height
        with self._lock:
            won = self._won.get(fb.stream_id)
        reference = {"reference": ref["reference"]} if "reference" in ref else {}
        # A trial compares chained batches: on a key frame SVT-AV1's better intra coding would win a
        # trial that the chained batches after it then lose.  A trial slot that falls on a key frame
        # is skipped (the winner's time runs out, and the stream's own codec codes until the next).
        trial = fb.batch_seq % self.every == 1 % self.every and (bool(reference) or not self.chained_only)
        if won is not None and not trial and 0 < fb.batch_seq - won[1] < self.every:
            payload, decoded = self.challenger.encode_reconstruct(fb.frames, w, h, fb.fps, crf=won[0], **reference)
            return Tried(payload, decoded, self.challenger.name,
                         f"{self.challenger.name} was smaller at matched PSNR-Y on trial batch {won[1]}")
        payload, decoded = own.encode_reconstruct(fb.frames, w, h, fb.fps, level, **ref)
        if not trial:
            return Tried(payload, decoded, own.name)
        quality = measure_batch(fb.frames, decoded, w, h, 0).psnr_y
        # The challenger's fewest bytes whose PSNR-Y reaches own's.
        best = cheapest_crf(self.challenger, fb, lambda got: measure_batch(fb.frames, got, w, h, 0).psnr_y >= quality,
                            **reference)
        with self._lock:
            if best is not None and len(best[1][0]) < len(payload):
                self._won[fb.stream_id] = (best[0], fb.batch_seq)
                self._won.move_to_end(fb.stream_id)
                while len(self._won) > MAX_STREAMS:
                    self._won.popitem(last=False)
            else:
                self._won.pop(fb.stream_id, None)
                return Tried(payload, decoded, own.name, None if best is None else
                             f"{own.name} {len(payload)} B <= {self.challenger.name} {len(best[1][0])} B "
                             f"at PSNR-Y >= {quality:.2f}", None if best is None else len(best[1][0]))
        crf, (alt_payload, alt_decoded) = best
        return Tried(alt_payload, alt_decoded, self.challenger.name,
                     f"{self.challenger.name} CRF {crf} {len(alt_payload)} B < {own.name} "
                     f"{len(payload)} B at PSNR-Y >= {quality:.2f}", len(payload))
