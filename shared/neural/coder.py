"""Real bitstreams for the learned image codec: transforms in torch, entropy
coding with ``constriction`` (an ANS coder), entropy parameters from the
integer hyper-synthesis and frozen tables, so decoding is bit-exact anywhere.

Per frame the bitstream is one ANS stream: the hyper-latent z (per channel, a
categorical table frozen at export) on top of the latent y (a quantized
Gaussian whose scale is one of a fixed table, chosen by an integer index).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import constriction
import numpy as np
import torch
from torch.nn import functional as F

from shared.neural.entropy import Y_RANGE, Z_RANGE, gaussian_likelihood
from shared.neural.intnet import ACT_BITS, ACT_MAX, IntegerHyperSynthesis, integer_context
from shared.neural.models import ARCHS, anchor_mask


ANALYSIS_PIXELS = 8 * 1280 * 720


class BitstreamError(ValueError):
    """A latent bitstream that does not decode."""


def full_precision(device: torch.device) -> None:
    """CUDA convolutions in full fp32: with TF32 (PyTorch's default for cuDNN) a GPU encoder's own
    reconstruction, which the compressor measures, drifts further from what a CPU receiver decodes."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageCoder:
    """An exported model, ready to code frames (float RGB tensors in [0, 1])."""

    def __init__(self, path: Path, device: str = "cpu"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = state["config"]
        self.name = str(cfg["name"])
        self.sha256 = file_sha256(path)
        self.lambdas = [float(v) for v in cfg["lambdas"]]
        self.levels = len(self.lambdas)
        self.device = torch.device(device)
        full_precision(self.device)
        # One batch at a time per model: the compressor's pool has several threads, and running
        # torch's intra-op pool from two of them at once buys nothing on CPU.
        self.lock = threading.Lock()
        self.arch = str(cfg.get("arch", "hyperprior"))
        if self.arch not in ARCHS:
            raise ValueError(f"{path}: unknown model architecture {self.arch!r}")
        self.net = ARCHS[self.arch](int(cfg["n"]), int(cfg["m"]), self.levels)
        self.net.load_state_dict(state["model"])
        # Converting float weights to integers (scaling by powers of two, rounding) is exact IEEE
        # arithmetic, so every machine derives the same integer network from the same file.
        self.hyper = IntegerHyperSynthesis.from_float(self.net.h_s, state["scale_thresholds"].numpy(), self.net.m)
        self.ctx = None
        if self.arch == "checkerboard":
            self.ctx = integer_context(self.net.ctx).to(self.device)
            if self.ctx.out_bits != self.hyper.out_bits:  # its output is added to the hyper-synthesis'
                raise ValueError(f"{path}: context and hyper-synthesis scales differ")
        self.net.eval().to(self.device).to(memory_format=torch.channels_last)
        self.hyper.to(self.device)
        self.m = self.net.m
        self.scales = state["scale_table"].numpy().astype(np.float64)
        self.z_pmf = state["z_pmf"].numpy().astype(np.float64)
        self.z_models = [constriction.stream.model.Categorical(p, perfect=False) for p in self.z_pmf]
        self.y_family = constriction.stream.model.QuantizedGaussian(-Y_RANGE, Y_RANGE)

    # -- transforms -------------------------------------------------------------------------------

    @torch.no_grad()
    def analyse(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3, H, W), H and W multiples of 64 → (gained y, integer z), both on the CPU."""
        lv = torch.full((x.shape[0],), level, dtype=torch.long, device=self.device)
        gain, _ = self.net.gains(lv)
        y = self.net.g_a(x.to(self.device).contiguous(memory_format=torch.channels_last)) * gain
        z = torch.round(self.net.h_a(y)).clamp_(-Z_RANGE, Z_RANGE)
        return y.float().cpu(), z.cpu()

    @torch.no_grad()
    def synthesise(self, y_hat: torch.Tensor, level: int) -> torch.Tensor:
        """Dequantized latents of ONE frame (1, M, h, w) → RGB (1, 3, H, W), on the CPU.

        Nominally in [0, 1] but not clipped: the colour path (:mod:`shared.neural.colour`) gives
        saturated chroma back from values a little outside it; RGB callers clip.  One frame at a
        time, so the reconstruction never depends on what else was in the batch.
        """
        lv = torch.full((1,), level, dtype=torch.long, device=self.device)
        _, inv_gain = self.net.gains(lv)
        x = self.net.g_s(y_hat.to(self.device).contiguous(memory_format=torch.channels_last) * inv_gain)
        return x.float().cpu()

    # -- entropy coding ---------------------------------------------------------------------------

    def _with_context(self, a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The raw entropy parameters ``a`` (hyper-synthesis output) with the checkerboard context of
        the anchors of ``q`` added on the other elements, all in exact integers."""
        h, w = q.shape[-2:]
        anchor = anchor_mask(h, w, device=a.device).double()
        shift = 2.0 ** (self.hyper.out_bits - ACT_BITS)
        # Decoded anchors in fixed point at 2**ACT_BITS: q * 2**ACT_BITS + the mean rounded there.
        mean_fix = torch.floor(a[:, : self.m] / shift + 0.5)
        anchors = ((q.to(a.device, torch.float64) * 2.0**ACT_BITS + mean_fix) * anchor).clamp_(-ACT_MAX, ACT_MAX - 1)
        return a + self.ctx.raw(anchors) * (1.0 - anchor)

    def _halves(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Flat boolean masks of a frame's latent elements (M, h, w): anchors, then the others."""
        first = np.broadcast_to(anchor_mask(*shape[-2:]).numpy().astype(bool)[0], shape[-3:]).ravel()
        return first, ~first

    def _quantize(self, y: torch.Tensor, z: torch.Tensor, context: bool = True):
        """Symbols q, means and scale indices of one frame's latents, as the decoder will derive them
        (``context=False``: with the hyperprior's parameters alone)."""
        a = self.hyper.raw(z)
        mean, index = self.hyper.params(a)
        q = torch.round(y - mean).clamp_(-Y_RANGE, Y_RANGE)
        if self.ctx is not None and context:
            # The anchors' symbols are the same under either parameters: the context only moves the others.
            mean, index = self.hyper.params(self._with_context(a, q))
            q = torch.round(y - mean).clamp_(-Y_RANGE, Y_RANGE)
        return q, mean, index

    def encode_latents(self, y: torch.Tensor, z: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """One frame's gained y (1, M, h, w) and integer z → (bitstream, dequantized y_hat)."""
        coder = constriction.stream.stack.AnsCoder()
        q, mean, index = self._quantize(y, z)
        stds, symbols = self.scales[index.numpy().ravel()], q.numpy().astype(np.int32).ravel()
        if self.ctx is None:
            coder.encode_reverse(symbols, self.y_family, np.zeros_like(stds), stds)
        else:
            for half in reversed(self._halves(q.shape)):  # a stack: the decoder pops the anchors first
                coder.encode_reverse(symbols[half], self.y_family, np.zeros(int(half.sum())), stds[half])
        zs = (z[0].numpy().astype(np.int32) + Z_RANGE).reshape(z.shape[1], -1)
        for c in range(zs.shape[0] - 1, -1, -1):  # a stack: the decoder pops channel 0 first
            coder.encode_reverse(zs[c], self.z_models[c])
        return coder.get_compressed().tobytes(), q + mean

    def decode_latents(self, data: bytes, z_shape: tuple[int, int, int, int]) -> torch.Tensor:
        """The inverse of :meth:`encode_latents`: bitstream → y_hat (1, M, h, w)."""
        if len(data) % 4 or not data:
            raise BitstreamError(f"latent stream of {len(data)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(data, np.uint32)
        try:
            coder = constriction.stream.stack.AnsCoder(words.copy())
            c, h, w = z_shape[1:]
            zs = np.stack([coder.decode(self.z_models[k], h * w) for k in range(c)])
            z = torch.from_numpy(zs.astype(np.float64) - Z_RANGE).view(1, c, h, w)
            a = self.hyper.raw(z)
            mean, index = self.hyper.params(a)
            stds = self.scales[index.numpy().ravel()]
            if self.ctx is None:
                q = coder.decode(self.y_family, np.zeros_like(stds), stds)
            else:
                first, second = self._halves(mean.shape)
                q = np.zeros(mean.numel(), np.int32)
                q[first] = coder.decode(self.y_family, np.zeros(int(first.sum())), stds[first])
                mean, index = self.hyper.params(self._with_context(a, torch.from_numpy(q).view(mean.shape)))
                stds = self.scales[index.numpy().ravel()]
                q[second] = coder.decode(self.y_family, np.zeros(int(second.sum())), stds[second])
            empty = coder.is_empty()
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise BitstreamError(f"latent stream does not decode: {exc}") from None
        if not empty:
            raise BitstreamError("latent stream has data left over after decoding (corrupt?)")
        return torch.from_numpy(q.astype(np.float32)).view(mean.shape) + mean

    @torch.no_grad()
    def ideal_bits(self, rgb: torch.Tensor, level: int, context: bool = True) -> float:
        """−log2 probability of one frame's latents under the coding tables the entropy coder uses.

        The coder's own overhead is its output size minus this; the training likelihood differs
        from it by the table quantization of scales and the renormalization of z's density over
        its coded range.  ``context=False`` prices a checkerboard model's latents with the
        hyperprior's parameters alone: what its context saves is the difference.
        """
        y, z = self.analyse(pad_to(rgb, self.net.stride), level)
        q, _, index = self._quantize(y, z, context)
        q = q.double()
        scale = torch.from_numpy(self.scales[index.numpy()])
        y_bits = -gaussian_likelihood(q, torch.zeros_like(q), scale).log2().sum()
        pmf = torch.from_numpy(self.z_pmf)
        zs = (z[0] + Z_RANGE).long().reshape(z.shape[1], -1)
        z_bits = -torch.gather(pmf, 1, zs).log2().sum()
        return float(y_bits + z_bits)

    # -- whole frames -----------------------------------------------------------------------------

    def z_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.net.stride
        return 1, self.net.n, -(-height // s), -(-width // s)

    def encode(self, rgb: torch.Tensor, level: int, reconstruct: bool = True) -> tuple[list[bytes], torch.Tensor | None]:
        """rgb (N, 3, H, W) nominally in [0, 1], any size → (one bitstream per frame, reconstruction (N, 3, H, W),
        not clipped: see :meth:`synthesise`).

        ``reconstruct=False`` skips the synthesis transform (a pure encoder) and returns None.
        """
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} out of range 0..{self.levels - 1}")
        n, _, h, w = rgb.shape
        x = pad_to(rgb, self.net.stride)
        # Batched analysis pays on a GPU; a pixel budget keeps activations of 4K batches in memory.
        per_call = max(1, ANALYSIS_PIXELS // (x.shape[2] * x.shape[3])) if self.device.type != "cpu" else 1
        parts = [self.analyse(x[i : i + per_call], level) for i in range(0, n, per_call)]
        y, z = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        streams, recon = [], []
        for i in range(n):
            data, y_hat = self.encode_latents(y[i : i + 1], z[i : i + 1])
            streams.append(data)
            if reconstruct:
                recon.append(self.synthesise(y_hat, level)[..., :h, :w])
        return streams, torch.cat(recon) if reconstruct else None

    def decode(self, streams: list[bytes], level: int, height: int, width: int) -> torch.Tensor:
        """Bitstreams of frames of one size → RGB (N, 3, height, width), nominally in [0, 1] and not clipped."""
        if not 0 <= level < self.levels:
            raise BitstreamError(f"level {level} out of range 0..{self.levels - 1}")
        shape = self.z_shape(height, width)
        return torch.cat([self.synthesise(self.decode_latents(s, shape), level)[..., :height, :width]
                          for s in streams])


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (N, C, H, W) on the right and bottom to multiples of ``multiple`` by edge replication."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x
