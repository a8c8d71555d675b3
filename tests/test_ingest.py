"""The gateway's batching: closed groups of frames, in order, as the source decodes them."""

from contextlib import contextmanager
from types import SimpleNamespace

import re

import av
import numpy as np
import pytest

from services.ingest import gateway, read_batches
from shared.pixfmt import from_video_frame


def frames_of(sizes):
    rng = np.random.default_rng(3)
    return [av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            for w, h in sizes]


class Packet:
    def __init__(self, frame=None):
        self.frame, self.pts = frame, 0

    def decode(self):
        if self.frame is None:  # what the decoder says of a packet it cannot read
            raise av.InvalidDataError(1094995529, "Invalid data found when processing input")
        return [self.frame]


def fake_source(monkeypatch, frames, corrupt_after=()):
    stream = SimpleNamespace(thread_type=None, guessed_rate=25, average_rate=25)
    packets = []
    for i, f in enumerate(frames):
        packets.append(Packet(f))
        if i in corrupt_after:
            packets.append(Packet())

    @contextmanager
    def open_source(_):
        yield SimpleNamespace(streams=SimpleNamespace(video=[stream]), demux=lambda _s: iter(packets))

    monkeypatch.setattr(gateway, "open_source", open_source)


def test_frames_are_grouped_in_order_and_the_last_batch_may_be_shorter(monkeypatch):
    frames = frames_of([(32, 16)] * 11)
    fake_source(monkeypatch, frames)
    batches = list(read_batches("fake", "s", batch_frames=4))
    assert [b.frame_count for b in batches] == [4, 4, 3]
    assert [b.first_pts for b in batches] == [0, 4, 8] and [b.batch_seq for b in batches] == [0, 1, 2]
    got = np.concatenate([b.frames for b in batches])
    assert np.array_equal(got, np.stack([from_video_frame(f) for f in frames]))
    assert batches[-1].raw_bytes == 3 * got.shape[1]


def test_a_resolution_change_mid_batch_starts_a_new_batch_at_the_new_size(monkeypatch):
    frames = frames_of([(32, 16)] * 3 + [(48, 20)] * 5)
    fake_source(monkeypatch, frames)
    batches = list(read_batches("fake", "s", batch_frames=4))
    assert [(b.width, b.height, b.frame_count, b.first_pts) for b in batches] == [
        (32, 16, 3, 0), (48, 20, 4, 3), (48, 20, 1, 7)]
    assert np.array_equal(batches[1].frames[0], from_video_frame(frames[3]))


def test_max_frames_stops_the_source(monkeypatch):
    fake_source(monkeypatch, frames_of([(16, 16)] * 10))
    assert sum(b.frame_count for b in read_batches("fake", "s", batch_frames=4, max_frames=6)) == 6


def test_a_corrupt_packet_is_skipped_and_counted_not_the_end_of_the_source(monkeypatch):
    fake_source(monkeypatch, frames_of([(16, 16)] * 10), corrupt_after={2, 6})
    damage = gateway.SourceDamage()
    batches = list(read_batches("fake", "s", batch_frames=4, damage=damage))
    assert sum(b.frame_count for b in batches) == 10 and damage.corrupt_packets == 2


@pytest.mark.parametrize("kw, says", [
    ({"stream_id": "a b"}, "stream id 'a b'"),
    ({"max_frames": 0}, "--frames 0"),
    ({"max_frames": -5}, "--frames -5"),
    ({"batch_frames": 300}, "--batch-frames 300: must be 1..256"),
    ({"batch_frames": 0}, "--batch-frames 0"),
])
def test_a_request_the_workers_would_refuse_is_a_clear_error_before_anything_is_read(kw, says):
    args = {"stream_id": "s", "batch_frames": 8, "max_frames": None, **kw}
    with pytest.raises(ValueError, match=re.escape(says)):
        gateway.check_request(**args)
