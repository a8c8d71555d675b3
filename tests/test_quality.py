"""Quality metrics behave as their definitions say."""

import math

import numpy as np

from shared.pixfmt import frame_size, from_video_frame, split_planes, to_rgb, to_video_frame
from shared.quality import PSNR_CAP, measure_batch, ms_ssim, psnr, sample_indices


def test_psnr_matches_its_definition():
    a = np.zeros((10, 10), np.uint8)
    b = a.copy()
    b[0, 0] = 10  # mse = 100 / 100 = 1
    assert math.isclose(psnr(a, b), 10 * math.log10(255**2), rel_tol=1e-9)
    assert psnr(a, a) == PSNR_CAP


def test_ms_ssim_is_one_for_identical_and_drops_with_noise():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    assert math.isclose(ms_ssim(img, img), 1.0, rel_tol=1e-6)
    small = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    big = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert 1.0 > ms_ssim(img, small) > ms_ssim(img, big) > 0


def reference_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM written the plain way (Wang et al. 2003): float64, a full 2-D 11x11 window, whole planes."""
    x1 = np.arange(11) - 5.0
    g = np.exp(-(x1**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(img):
        h, w = img.shape
        return sum(window[i, j] * img[i : h - 10 + i, j : w - 10 + j] for i in range(11) for j in range(11))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    x, y, result = a.astype(np.float64), b.astype(np.float64), 1.0
    for scale in range(5):
        mx, my = filt(x), filt(y)
        sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        if scale < 4:
            result *= max(cs.mean(), 0.0) ** weights[scale]
            h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
            x = (x[0:h:2, 0:w:2] + x[1:h:2, 0:w:2] + x[0:h:2, 1:w:2] + x[1:h:2, 1:w:2]) / 4
            y = (y[0:h:2, 0:w:2] + y[1:h:2, 0:w:2] + y[0:h:2, 1:w:2] + y[1:h:2, 1:w:2]) / 4
        else:
            result *= max((((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs).mean(), 0.0) ** weights[scale]
    return result


def test_ms_ssim_matches_the_plain_definition_on_odd_sizes_and_many_strips():
    rng = np.random.default_rng(7)
    for h, w in ((200, 181), (333, 190)):  # strips of 64 rows: a ragged last strip at every scale
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        b = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        assert math.isclose(ms_ssim(a, b), reference_ms_ssim(a, b), rel_tol=1e-5)


def test_sample_indices_spread_over_the_batch():
    assert sample_indices(8, 1) == [7]
    assert sample_indices(8, 2) == [0, 7]
    assert sample_indices(8, 0) == []
    assert sample_indices(8, -1) == list(range(8))


def test_yuv_packing_round_trips_through_pyav_for_odd_sizes():
    w, h = 37, 21
    frame = np.random.default_rng(2).integers(0, 256, frame_size(w, h), dtype=np.uint8)
    assert np.array_equal(from_video_frame(to_video_frame(frame, w, h)), frame)
    assert to_rgb(frame, w, h).shape == (h, w, 3)
    assert [p.shape for p in split_planes(frame, w, h)] == [(21, 37), (11, 19), (11, 19)]


def test_measure_batch_covers_every_frame_for_psnr_y():
    w, h = 64, 48
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (4, frame_size(w, h)), dtype=np.uint8)
    dec = src.copy()
    dec[2, :10] ^= 1
    q = measure_batch(src, dec, w, h, sample=1)
    expected = np.mean([PSNR_CAP, PSNR_CAP, psnr(src[2][: w * h], dec[2][: w * h]), PSNR_CAP])
    assert math.isclose(q.psnr_y, expected)
    assert q.ms_ssim_frames == 1


def test_quality_sample_zero_measures_psnr_y_only():
    w, h = 64, 48
    src = np.random.default_rng(4).integers(0, 256, (2, frame_size(w, h)), dtype=np.uint8)
    q = measure_batch(src, src, w, h, sample=0)
    assert (q.psnr_y, q.psnr_rgb, q.ms_ssim, q.ms_ssim_frames) == (PSNR_CAP, None, None, 0)


def test_frames_too_small_for_one_ssim_window_have_psnr_but_no_ms_ssim():
    """The schema takes frames from 2x2; MS-SSIM needs 11 px a side (one window)."""
    rng = np.random.default_rng(5)
    for w, h in ((8, 8), (300, 10), (10, 300)):
        src = rng.integers(0, 256, (2, frame_size(w, h)), dtype=np.uint8)
        q = measure_batch(src, src ^ 1, w, h, sample=-1)
        assert q.ms_ssim is None and q.ms_ssim_frames == 0
        assert math.isfinite(q.psnr_y) and math.isfinite(q.psnr_rgb)
    assert ms_ssim(np.zeros((12, 40), np.uint8), np.zeros((12, 40), np.uint8)) == 1.0  # one scale fits
