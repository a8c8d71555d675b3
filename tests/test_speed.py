"""The preset governor: each stream gets the slowest preset whose measured encode time the batch's
duration affords, and moves when the machine gets busier or quieter."""

from services.compressor.speed import FAST_SHARE, LADDERS, SLOW_SHARE, START, PresetGovernor


def test_a_stream_starts_at_the_start_preset_and_slows_down_while_coding_is_cheap():
    g = PresetGovernor("x264-psnr")
    assert g.preset("s") == START["x264-psnr"]
    for _ in range(10):
        g.observe("s", encode_s=0.01, duration_s=0.267)
    assert g.preset("s") == LADDERS["x264-psnr"][0]  # medium: the most bytes saved


def test_a_batch_that_took_too_much_of_its_duration_moves_the_stream_to_a_faster_preset():
    g = PresetGovernor("x264-psnr")
    ladder = LADDERS["x264-psnr"]
    for _ in range(3):
        g.observe("s", encode_s=0.01, duration_s=0.267)  # climbs from the fastest start
    before = ladder.index(g.preset("s"))
    assert before == len(ladder) - 4
    g.observe("s", encode_s=0.01, duration_s=0.267, lag_s=0.5)  # cheap, but it came late: the worker is behind
    assert ladder.index(g.preset("s")) == before + 1
    g.observe("s", encode_s=0.01, duration_s=0.267)
    assert ladder.index(g.preset("s")) == before
    g.observe("s", encode_s=(SLOW_SHARE + 0.1) * 0.267, duration_s=0.267)
    assert ladder.index(g.preset("s")) == before + 1
    for _ in range(10):
        g.observe("s", encode_s=1.0, duration_s=0.267)
    assert g.preset("s") == ladder[-1]  # and no further
    g.observe("s", encode_s=(FAST_SHARE + SLOW_SHARE) / 2 * 0.267, duration_s=0.267)
    assert g.preset("s") == ladder[-1]  # in between: stays


def test_streams_are_governed_apart_and_a_fixed_preset_is_left_alone():
    g = PresetGovernor("x264")
    g.observe("quiet", encode_s=0.01, duration_s=0.267)
    assert g.preset("quiet") != g.preset("other")
    fixed = PresetGovernor("x264", fixed="slow")
    fixed.observe("s", encode_s=5.0, duration_s=0.267)
    assert fixed.preset("s") == "slow"
    assert PresetGovernor("vp9").preset("s") is None  # no ladder: the codec's own preset


def test_a_recorded_file_at_full_speed_has_no_deadline_and_gets_the_fewest_bytes_preset():
    g = PresetGovernor("x264-psnr")
    g.observe("file", encode_s=5.0, duration_s=0.267, live=False)  # slow, but nobody waits live
    assert g.preset("file", live=False) == LADDERS["x264-psnr"][0]
    assert g.preset("file") == START["x264-psnr"]  # its live state untouched


def test_the_gateway_marks_paced_and_network_sources_live_and_files_at_full_speed_not():
    from services.ingest.gateway import LIVE_SCHEMES
    from shared.schemas import FrameBatch, unpack_frame_batch
    import numpy as np

    fb = FrameBatch("s", 0, 16, 16, 25, 1, 0, 0.0, np.zeros((1, 384), np.uint8), live=False)
    assert unpack_frame_batch(fb.pack()).live is False
    legacy = FrameBatch("s", 0, 16, 16, 25, 1, 0, 0.0, np.zeros((1, 384), np.uint8))
    assert unpack_frame_batch(legacy.pack()).live is True
    assert "rtsp" in LIVE_SCHEMES and "file" not in LIVE_SCHEMES


def test_what_a_worker_remembers_per_stream_is_bounded():
    from services.compressor import speed
    from services.compressor.controls import MAX_KEYFRAME_REQUESTS, StreamControls

    g = PresetGovernor("x264")
    for i in range(speed.MAX_STREAMS + 10):
        g.observe(f"s{i}", encode_s=0.01, duration_s=0.267)
    assert len(g._index) == speed.MAX_STREAMS
    controls = StreamControls()
    for i in range(MAX_KEYFRAME_REQUESTS + 10):
        controls.request_keyframe(f"s{i}", b'{"from_batch": 1}')
    assert len(controls._keyframes) == MAX_KEYFRAME_REQUESTS
    assert controls.take_keyframe_request(f"s{MAX_KEYFRAME_REQUESTS + 9}", 1)
