"""``aic train --arch restore``: train the hybrid codec's restoration network.

Each step codes a few synthetic camera-motion clips with x264 at random rate
levels (see :mod:`shared.neural.video_data`) and fits the network's correction
to the coding error: loss = the restored frame's MSE relative to x264's, per
frame (MSE over all yuv420p samples, luma and chroma in their true 4:1:1
proportion); clips that x264 already codes near-losslessly are skipped.
Checkpoints resume; ``--export`` writes ``weights.pt``, ``model.json`` and a
MODEL_CARD.md with the gain measured on clips made from the validation photos.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.neural.data import list_sources
from shared.neural.training import clock_start, prepare, start_state
from shared.neural.restoration import RestorationNet
from shared.neural.video_data import MotionClipSampler

WEIGHTS = "weights.pt"
TRAIN_SCALES = (1024, 1600, 2560)  # long side of the frames the pans run over
TRAIN_MAX_PSNR = 42.0
MSE_FLOOR = 1e-7  # ~70 dB: near-lossless frames must not dominate the relative loss


@dataclass
class RestoreConfig:
    data: str
    steps: int = 4000
    clips: int = 2  # clips per step; each gives ``gop`` frames
    gop: int = 8
    crop: int = 128
    lr: float = 5e-4
    channels: int = 32
    depth: int = 6
    levels: int = 8
    base: str = "x264-psnr"
    device: str = "cpu"
    threads: int = 0
    seed: int = 0
    init: str | None = None  # the weights the run started from (--init), kept for the model card


def lr_at(cfg: RestoreConfig, step: int) -> float:
    """Constant, then cosine decay to lr/20 over the last half."""
    start = cfg.steps // 2
    if step < start:
        return cfg.lr
    t = (step - start) / max(1, cfg.steps - start)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def psnr_of(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_restore(cfg: RestoreConfig, out_dir: Path, resume: Path | None = None, init: Path | None = None,
                  ckpt_every: int = 200) -> Path:
    """Train (or resume) and return the final checkpoint's path."""
    device = prepare(cfg, out_dir)
    net = RestorationNet(cfg.channels, cfg.depth, cfg.levels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step = start_state(net, opt, device, resume, init)
    sampler = MotionClipSampler(list_sources(cfg.data), cfg.crop, cfg.gop, cfg.levels, seed=cfg.seed + step,
                                base=cfg.base, scales=TRAIN_SCALES, max_psnr=TRAIN_MAX_PSNR)
    ckpt, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.tsv"
    t0 = clock_start(log_path, resume)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    avg_base = avg_out = None
    net.train()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        decoded, source, level = (t.to(device) for t in sampler.batch(cfg.clips))
        restored = decoded + net(decoded, level)
        # Error relative to x264's own, per frame: every level counts alike (BD-rate weighs them alike),
        # where plain MSE would let the coarsest levels' large errors drown the finest.
        mse_out = (restored - source).pow(2).mean(dim=(1, 2, 3))
        mse_base = (decoded - source).pow(2).mean(dim=(1, 2, 3))
        loss = ((mse_out + MSE_FLOOR) / (mse_base + MSE_FLOOR)).mean() - 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        base = psnr_of(float(mse_base.mean()))
        out = psnr_of(float(mse_out.detach().mean()))
        avg_base = base if avg_base is None else 0.98 * avg_base + 0.02 * base
        avg_out = out if avg_out is None else 0.98 * avg_out + 0.02 * out
        bar.update(1)
        bar.set_postfix(psnr=f"{avg_out:.2f}", gain=f"{avg_out - avg_base:+.3f}dB")
        if step % ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"arch": "restore", "model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "config": asdict(cfg)}, tmp)
            os.replace(tmp, ckpt)
            with open(log_path, "a") as log:
                log.write(f"{step}\t{time.time() - t0:.1f}\t{avg_base:.3f}\t{avg_out:.3f}\t{float(loss.detach()):.4f}\n")
    bar.close()
    return ckpt


def save_weights(net: RestorationNet, out_dir: Path, base: str = "x264-psnr") -> Path:
    """Write ``out_dir/weights.pt``: what :class:`shared.codecs.hybrid.HybridCodec` loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS
    torch.save({"arch": "restore",
                "config": {"name": out_dir.name, "channels": net.channels, "depth": net.depth,
                           "levels": net.levels, "base": base},
                "model": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}}, path)
    return path


def export_restore(ckpt: Path, out_dir: Path, val: str | None = None) -> Path:
    """Write inference weights, and with ``val`` measure the model and write its card."""
    from shared.neural.coder import file_sha256
    from shared.neural.export import _hardware, add_lineage, training_wall_time

    state = torch.load(ckpt, map_location="cpu")
    cfg = state["config"]
    net = RestorationNet(cfg["channels"], cfg["depth"], cfg["levels"])
    net.load_state_dict(state["model"])
    path = save_weights(net, out_dir, cfg["base"])
    rows = evaluate_on_clips(path, val) if val else []
    meta = {"name": out_dir.name, "arch": "restore", "sha256": file_sha256(path), "steps": state["step"],
            "data_note": data_note(cfg["data"]),
            "config": cfg, "wall_time_s": training_wall_time(Path(ckpt).parent / "train_log.tsv"),
            "hardware": _hardware(cfg), "exported": dt.date.today().isoformat(), "val": val, "rd": rows}
    if cfg.get("init"):
        add_lineage(meta, Path(cfg["init"]))
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(meta))
    return path


def data_note(data: str) -> str:
    """What the training list held, for the model card (the list itself is not kept in the repository)."""
    try:
        sources = list_sources(data)
    except (OSError, ValueError):
        return ""
    synthetic = [str(s) for s in sources if str(s).startswith("lavfi:")]
    note = f" = {len(sources) - len(synthetic)} photographs"
    if synthetic:
        note += f" and {len(synthetic)} synthetic FFmpeg sources (" + ", ".join(f"`{s}`" for s in synthetic) + ")"
    return note + "; models/README.md says how to write the list"


EVAL_CROP, EVAL_CLIPS_PER_FILE, EVAL_SEED = 256, 2, 1234


def evaluate_on_clips(weights: Path, val: str) -> list[dict]:
    """Per level: bpp and PSNR (RGB, Y) of the base codec alone and of the hybrid, on fixed pans over ``val``."""
    from shared.codecs import read_header
    from shared.codecs.hybrid import HybridCodec
    from shared.pixfmt import split_planes, to_rgb
    from shared.quality import psnr

    sampler = MotionClipSampler(list_sources(val), EVAL_CROP, 8, scales=(640,), seed=EVAL_SEED)
    clips = [sampler.clip() for _ in range(EVAL_CLIPS_PER_FILE * len(list_sources(val)))]
    codec = HybridCodec(weights=weights, device="cpu")
    w = h = EVAL_CROP
    rows = []
    for level in tqdm(range(codec.levels), desc="evaluating", unit="level", disable=None):
        bits = base_bits = 0
        q = {"rgb": [], "y": [], "rgb_base": [], "y_base": []}
        for frames in clips:
            base_payload, base_dec = codec.base.encode_reconstruct(frames, w, h, 25.0, level)
            payload, dec = codec.encode_reconstruct(frames, w, h, 25.0, level)
            base_bits += 8 * len(read_header(base_payload)[1])
            bits += 8 * len(read_header(payload)[1])
            for src, b, d in zip(frames, base_dec, dec):
                q["rgb_base"].append(psnr(to_rgb(src, w, h), to_rgb(b, w, h)))
                q["rgb"].append(psnr(to_rgb(src, w, h), to_rgb(d, w, h)))
                q["y_base"].append(psnr(split_planes(src, w, h)[0], split_planes(b, w, h)[0]))
                q["y"].append(psnr(split_planes(src, w, h)[0], split_planes(d, w, h)[0]))
        px = len(clips) * 8 * w * h
        rows.append({"level": level, "crf": codec.base_crf(level), "bpp": bits / px, "bpp_base": base_bits / px,
                     "side_bytes_pct": 100 * (bits - base_bits) / bits,
                     **{f"psnr_{k}": float(np.mean(v)) for k, v in q.items()}})
    return rows


def model_card(meta: dict) -> str:
    from shared.neural.export import _init_flags, _lineage

    cfg = meta["config"]
    table = "\n".join(
        f"| {r['level']} | {r['crf']} | {r['bpp']:.4f} | {r['psnr_rgb_base']:.2f} | {r['psnr_rgb']:.2f} | "
        f"{r['psnr_rgb'] - r['psnr_rgb_base']:+.3f} | {r['psnr_y'] - r['psnr_y_base']:+.3f} | {r['side_bytes_pct']:.2f} % |"
        for r in meta["rd"])
    stopped = (" (stopped early: the learning rate had not yet started its decay)"
               if meta["steps"] < cfg["steps"] // 2 else "")
    params = (6 * 9 + 1) * cfg["channels"] + (cfg["depth"] - 2) * (cfg["channels"] * 9 + 1) * cfg["channels"] \
        + (cfg["channels"] * 9 + 1) * 6 + cfg["levels"] * cfg["channels"]
    return f"""# {meta['name']}

The learned half of the `hybrid` codec: {cfg['base']} (veryfast, zerolatency, one closed
GOP per batch) carries the frames, and this network restores them at the receiver.

- architecture: residual CNN, {cfg['depth']} 3×3 convolutions of {cfg['channels']} channels with ReLU,
  on the yuv420p planes at chroma resolution (luma split into its four 2×2 phases, stacked
  with U and V), a learned bias per rate level; {params:,} parameters
- weights: `weights.pt`, sha256 `{meta['sha256']}`
- colour: works on yuv420p directly, as the pipeline carries it; no RGB conversion
- side information: per frame one byte, the luma and chroma weights (0..1.25 in
  1/12 steps) of the network's correction, chosen by the encoder by least squares
  against the source; weight 0 gives back the native decode exactly

## Training
- data: `{cfg['data']}`{meta.get('data_note', '')}; clips of {cfg['gop']} frames, {cfg['crop']}×{cfg['crop']}, panning over the
  photos (scaled to 1024, 1600 and 2560 pixels on the long side) at up to 6 px/frame in a
  random direction, converted to yuv420p and coded by {cfg['base']} at a random level
- recipe: Adam, lr {cfg['lr']} (cosine decay over the second half), {cfg['clips']} clips
  ({cfg['clips'] * cfg['gop']} frames) per step, loss = the mean over frames of restored over
  native MSE (yuv420p samples); clips that x264 codes above 42 dB PSNR are redrawn (flat sky and
  gradients teach nothing)
- steps: {meta['steps']} of {cfg['steps']} planned{stopped}; hardware: {meta['hardware']}; wall time:
  {meta['wall_time_s'] / 3600:.2f} h{_lineage(meta)}
- command: `aic train --arch restore --data {cfg['data']} --steps {cfg['steps']}{_init_flags(meta, cfg)} --export models/{meta['name']} --val {meta['val']}`

## Gain on clips made from the validation photos
`{meta['val']}`: the same synthetic pans (fixed seed), none of these photos seen in
training.  Same {cfg['base']} bitstream in both columns; "side" is the blend bytes
as a share of the payload.

| level | CRF | bpp | PSNR-RGB {cfg['base']} | PSNR-RGB hybrid | gain RGB dB | gain Y dB | side |
|---|---|---|---|---|---|---|---|
{table}

Exported {meta['exported']}.  Rate–distortion on real clips: docs/benchmarks.md.
"""
