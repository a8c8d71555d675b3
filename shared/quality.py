"""Quality metrics on what a receiver decodes: PSNR (Y, RGB) and MS-SSIM (Y).

PSNR is computed per frame and averaged over the batch (identical frames are
capped at 100 dB).  MS-SSIM follows Wang et al. 2003 (5 scales, 11-tap Gaussian
with sigma 1.5, standard exponents) on the luma plane.  Even computed in
cache-sized strips it costs about what x264 spends encoding a whole 8-frame
720p batch on two cores (``benchmarks/pipeline.py`` times it), so the compressor measures
PSNR-RGB and MS-SSIM on a configurable sample of each batch (PSNR-Y always on
every frame); the row says how many frames the sample covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.pixfmt import split_planes, to_rgb

PSNR_CAP = 100.0
_MS_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of equal shape."""
    diff = a.astype(np.int16) - b.astype(np.int16)
    mse = float(np.mean(np.square(diff, dtype=np.int32), dtype=np.float64))
    if mse == 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def _gauss_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).astype(np.float32)


_KERNEL = _gauss_kernel()


_TAPS = len(_KERNEL)
_HALF = _TAPS // 2
#: Rows of SSIM maps computed at a time: the five filtered maps of a strip stay in cache, which
#: is faster than filtering whole planes (numpy here is bound by memory, not arithmetic).
_STRIP_ROWS = 64


def _filter_valid(img: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter, 'valid' region only (as the reference implementation).

    The kernel is symmetric: taps i and n-1-i share one multiply."""
    k, n, c = _KERNEL, _TAPS, _HALF
    h, w = img.shape
    oh, ow = h - n + 1, w - n + 1
    rows = img[c : c + oh] * k[c]
    for i in range(c):
        t = img[i : i + oh] + img[n - 1 - i : n - 1 - i + oh]
        t *= k[i]
        rows += t
    out = rows[:, c : c + ow] * k[c]
    for i in range(c):
        t = rows[:, i : i + ow] + rows[:, n - 1 - i : n - 1 - i + ow]
        t *= k[i]
        out += t
    return out


def _ssim_maps(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Means of the SSIM and contrast-structure maps of one scale, a strip of rows at a time."""
    oh, ow = x.shape[0] - _TAPS + 1, x.shape[1] - _TAPS + 1
    ssim_sum = cs_sum = 0.0
    for r0 in range(0, oh, _STRIP_ROWS):
        r1 = min(oh, r0 + _STRIP_ROWS)
        xs, ys = x[r0 : r1 + _TAPS - 1], y[r0 : r1 + _TAPS - 1]
        mu_x, mu_y = _filter_valid(xs), _filter_valid(ys)
        mxx, myy, mxy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        sxx = _filter_valid(xs * xs) - mxx
        syy = _filter_valid(ys * ys) - myy
        sxy = _filter_valid(xs * ys) - mxy
        cs = (2 * sxy + _C2) / (sxx + syy + _C2)
        lum = (2 * mxy + _C1) / (mxx + myy + _C1)
        ssim_sum += float(np.sum(lum * cs, dtype=np.float64))
        cs_sum += float(np.sum(cs, dtype=np.float64))
    return ssim_sum / (oh * ow), cs_sum / (oh * ow)


MS_SSIM_MIN_SIDE = 11  # one 11-tap Gaussian window; smaller frames have no MS-SSIM


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two single-channel uint8 images (5 scales from 176 px a side, fewer below; None
    under 11 px, where not even one window fits)."""
    if min(a.shape) < MS_SSIM_MIN_SIDE:
        return None
    x, y = a.astype(np.float32), b.astype(np.float32)
    if min(x.shape) < 11 * 16:
        # Too small for five scales: fall back to as many as fit (documented deviation).
        scales = max(1, int(math.log2(min(x.shape) / 11)) + 1)
    else:
        scales = 5
    weights = _MS_WEIGHTS[:scales] / _MS_WEIGHTS[:scales].sum()
    mcs = []
    for s in range(scales):
        ssim_val, cs_val = _ssim_maps(x, y)
        if s < scales - 1:
            mcs.append(max(cs_val, 0.0))
            h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = 0.25 * (x[0:h:2, 0:w:2] + x[1:h:2, 0:w:2] + x[0:h:2, 1:w:2] + x[1:h:2, 1:w:2])
            y = 0.25 * (y[0:h:2, 0:w:2] + y[1:h:2, 0:w:2] + y[0:h:2, 1:w:2] + y[1:h:2, 1:w:2])
    vals = np.array(mcs + [max(ssim_val, 0.0)])
    return float(np.prod(vals**weights))


@dataclass(frozen=True)
class BatchQuality:
    psnr_y: float
    psnr_rgb: float | None
    ms_ssim: float | None
    ms_ssim_frames: int


def sample_indices(n: int, sample: int) -> list[int]:
    """Evenly spread frame indices for the expensive metrics: -1 = all, 0 = none, k = k frames.

    One frame means the last: in a closed GOP it is the farthest from the key frame."""
    if sample < 0 or sample >= n:
        return list(range(n))
    if sample == 0:
        return []
    if sample == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (sample - 1)) for i in range(sample)})


def measure_batch(src: np.ndarray, dec: np.ndarray, width: int, height: int, sample: int = 1) -> BatchQuality:
    """PSNR-Y on every frame; PSNR-RGB and MS-SSIM (Y) on ``sample`` frames (-1 = all, 0 = none)."""
    if src.shape != dec.shape:
        raise ValueError(f"shape mismatch {src.shape} vs {dec.shape}")
    n = src.shape[0]
    py = [psnr(split_planes(src[i], width, height)[0], split_planes(dec[i], width, height)[0]) for i in range(n)]
    idx = sample_indices(n, sample)
    if not idx:
        return BatchQuality(float(np.mean(py)), None, None, 0)
    prgb = [psnr(to_rgb(src[i], width, height), to_rgb(dec[i], width, height)) for i in idx]
    if min(width, height) < MS_SSIM_MIN_SIDE:
        return BatchQuality(float(np.mean(py)), float(np.mean(prgb)), None, 0)
    ms = [ms_ssim(split_planes(src[i], width, height)[0], split_planes(dec[i], width, height)[0]) for i in idx]
    return BatchQuality(float(np.mean(py)), float(np.mean(prgb)), float(np.mean(ms)), len(idx))
