"""The learned codec's colour path: yuv420p in, float RGB to the model, the same yuv420p back."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.neural.colour import rgb_to_yuv420, yuv420_to_rgb  # noqa: E402
from shared.pixfmt import frame_size, to_rgb  # noqa: E402


@pytest.mark.parametrize("w,h", [(64, 48), (33, 17), (1, 1), (2, 3)])
def test_frames_come_back_bit_for_bit_when_nothing_is_coded(w, h):
    frames = np.random.default_rng(w * h).integers(0, 256, (3, frame_size(w, h)), dtype=np.uint8)
    rgb = yuv420_to_rgb(frames, w, h)
    assert rgb.shape == (3, 3, h, w)
    assert np.array_equal(rgb_to_yuv420(rgb), frames)


def test_a_frame_converts_to_the_same_bits_alone_or_in_a_batch():
    frames = np.random.default_rng(1).integers(0, 256, (4, frame_size(40, 30)), dtype=np.uint8)
    rgb = yuv420_to_rgb(frames, 40, 30) + 0.003  # off the exact grid, as a model's output is
    together = rgb_to_yuv420(rgb)
    alone = np.concatenate([rgb_to_yuv420(rgb[i : i + 1]) for i in range(4)])
    assert np.array_equal(together, alone)


def test_rgb_matches_the_pipelines_bt601_limited_range_conversion():
    # Flat colour (no chroma interpolation to differ on): the RGB swscale gives, within its fixed-point
    # rounding (a wrong matrix or range would be off by tens).
    w = h = 16
    frame = np.empty(frame_size(w, h), np.uint8)
    frame[: w * h], frame[w * h : w * h + 64], frame[w * h + 64 :] = 120, 90, 200
    ours = yuv420_to_rgb(frame[None], w, h)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - to_rgb(frame, w, h)).max() <= 2.0


def test_out_of_gamut_colour_is_kept_not_clipped():
    w = h = 4
    frame = np.full(frame_size(w, h), 16, np.uint8)  # black luma with extreme chroma
    frame[w * h :] = 255
    rgb = yuv420_to_rgb(frame[None], w, h)
    assert rgb.min() < 0 and rgb.max() > 1
    assert np.array_equal(rgb_to_yuv420(rgb)[0], frame)


def test_a_wrong_frame_size_is_a_clear_error():
    with pytest.raises(ValueError, match="yuv420p"):
        yuv420_to_rgb(np.zeros((1, 100), np.uint8), 16, 16)
