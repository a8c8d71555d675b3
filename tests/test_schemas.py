"""Every field of every message is validated; bad input raises SchemaError with a clear code."""

import msgpack
import numpy as np
import pytest

from shared.pixfmt import frame_size
from shared.schemas import (
    BatchMetrics,
    CompressedBatch,
    FrameBatch,
    Limits,
    SchemaError,
    peek_ids,
    unpack_batch_metrics,
    unpack_compressed_batch,
    unpack_frame_batch,
)


def make_batch(w=32, h=16, n=3, seq=0) -> FrameBatch:
    frames = np.random.default_rng(seq).integers(0, 256, (n, frame_size(w, h)), dtype=np.uint8)
    return FrameBatch("cam-1", seq, w, h, 30, 1, 0, 1.7e9, frames)


def mutate(**changes) -> bytes:
    obj = msgpack.unpackb(make_batch().pack(), raw=False)
    obj.update(changes)
    return msgpack.packb({k: v for k, v in obj.items() if v is not ...}, use_bin_type=True)


def test_frame_batch_round_trips():
    fb = make_batch(w=33, h=17)
    back = unpack_frame_batch(fb.pack())
    assert (back.stream_id, back.batch_seq, back.width, back.height) == ("cam-1", 0, 33, 17)
    assert np.array_equal(back.frames, fb.frames)
    assert back.msg_id == "cam-1:0"


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\xc1not msgpack", "not_msgpack"),
        (msgpack.packb([1, 2, 3]), "bad_message"),
        (mutate(v=99), "unknown_version"),
        (mutate(kind="compressed_batch"), "wrong_kind"),
        (mutate(width=-32), "bad_field"),
        (mutate(height=0), "bad_field"),
        (mutate(width=100_000, height=100_000), "too_large"),
        (mutate(width=True), "bad_field"),
        (mutate(width=34), "bad_frame_size"),
        (mutate(frame_count=4), "truncated"),
        (mutate(stream_id="a.b>"), "bad_field"),
        (mutate(stream_id=...), "missing_field"),
        (mutate(pix_fmt="rgb24"), "bad_field"),
        (mutate(fps_num=0), "bad_field"),
        (mutate(captured_at=float("nan")), "bad_field"),
        (make_batch().pack()[:-100], "not_msgpack"),
    ],
)
def test_bad_frame_batches_are_rejected_with_a_code(data, code):
    with pytest.raises(SchemaError) as err:
        unpack_frame_batch(data)
    assert err.value.code == code
    assert err.value.reason


def test_oversized_batch_is_rejected_before_decoding():
    with pytest.raises(SchemaError) as err:
        unpack_frame_batch(make_batch(w=64, h=64, n=8).pack(), Limits(max_batch_bytes=10_000))
    assert err.value.code == "too_large"


def test_peek_ids_reads_ids_of_invalid_messages_when_present():
    assert peek_ids(mutate(width=34)) == ("cam-1", 0)
    assert peek_ids(b"garbage") == (None, None)


def test_compressed_batch_and_metrics_round_trip():
    cb = CompressedBatch("s", 4, "x264", 32, 16, 3, 30, 1, 24, 1.0, 2.0, "w", b"payload")
    assert unpack_compressed_batch(cb.pack()) == cb
    m = BatchMetrics("s:4", "s", "ok", "w", 2.0, batch_seq=4, psnr_y=40.0, frames=3, extra={"a": 1})
    assert unpack_batch_metrics(m.pack()) == m


def test_metrics_status_must_be_known():
    m = BatchMetrics("s:4", "s", "weird", "w", 2.0)
    with pytest.raises(SchemaError):
        unpack_batch_metrics(m.pack())


@pytest.mark.parametrize("change, field", [
    ({"captured_at": 1.7e12}, "captured_at"),  # milliseconds, not seconds
    ({"completed_at": 1e20}, "completed_at"),
    ({"frames": 2**40}, "frames"),  # an integer column
    ({"extra": {"blob": b"\x00\x01"}}, "extra"),  # not JSON
])  # fmt: skip
def test_metrics_values_no_row_could_hold_are_refused(change, field):
    """Every record that passes validation must fit its row, or one record would stop the writer."""
    m = BatchMetrics("s:4", "s", "ok", "w", 2.0)
    obj = msgpack.unpackb(m.pack())
    obj.update(change)
    with pytest.raises(SchemaError, match=field):
        unpack_batch_metrics(msgpack.packb(obj, use_bin_type=True))
