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
    stream = SimpleNamespace(thread_type=None, guessed_rate=25, average_rate=25, frames=0)  # (length unknown)
    packets = []
    for i, f in enumerate(frames):
        packets.append(Packet(f))
        if i in corrupt_after:
            packets.append(Packet())

    @contextmanager
    def open_source(_):
        yield SimpleNamespace(streams=SimpleNamespace(video=[stream]), demux=lambda _s: iter(packets), duration=None)

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


def _clip(path, frames: int = 64) -> bytes:
    """A small real clip (x264 in Matroska, whose header declares its duration)."""
    import av

    with av.open(str(path), "w", format="matroska") as out:
        vs = out.add_stream("libx264", rate=30)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            img = np.full((48, 64, 3), (i * 4) % 256, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    return path.read_bytes()


def test_a_truncated_file_is_reported_not_passed_off_as_whole(tmp_path):
    whole = _clip(tmp_path / "whole.mkv")
    damage = gateway.SourceDamage()
    list(read_batches(str(tmp_path / "whole.mkv"), "s", damage=damage))
    assert damage.frames_read == 64 and not damage.truncated
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole[: len(whole) // 2])
    damage = gateway.SourceDamage()
    read = sum(b.frame_count for b in read_batches(str(cut), "s", damage=damage))
    assert damage.truncated and read == damage.frames_read < 48 and damage.frames_declared == 64


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_http_source_that_stalls_mid_file_is_a_clear_error(tmp_path):
    import http.server
    import threading
    import time

    data = _clip(tmp_path / "clip.mkv", frames=240)
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/x-matroska")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 3])
            self.wfile.flush()
            release.wait(60)  # and then nothing more: a server that stalls

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.mkv"
    t0 = time.monotonic()
    got = []
    try:
        with pytest.raises(gateway.SourceError, match="reading .* failed"):
            for b in read_batches(url, "s"):
                got.append(b.frame_count)
    finally:
        release.set()
        server.shutdown()
    assert sum(got) > 0 and time.monotonic() - t0 < 40  # what arrived was read; the stall ended it
