"""Export a training checkpoint as inference weights with a model card.

The exported file freezes everything the entropy coder needs (integer
hyper-synthesis, scale table, the hyper-latent's probability tables), so two
machines with the same file code identically.  Its sha256 names the model in
every payload.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from pathlib import Path

import numpy as np
import torch

from shared.neural.coder import ImageCoder, pad_to
from shared.neural.data import list_sources, load_frames
from shared.neural.entropy import scale_table, scale_thresholds
from shared.neural.intnet import IntegerHyperSynthesis, integer_context
from shared.neural.models import ARCHS

WEIGHTS = "weights.pt"
VAL_MAX_SIDE = 1024


def export_weights(ckpt: Path, out_dir: Path) -> Path:
    """Write ``out_dir/weights.pt`` from a checkpoint; returns its path."""
    state = torch.load(ckpt, map_location="cpu")
    cfg = state["config"]
    arch = cfg.get("arch", "hyperprior")
    net = ARCHS[arch](cfg["n"], cfg["m"], len(cfg["lambdas"]))
    net.load_state_dict(state["model"])
    net.eval()
    IntegerHyperSynthesis.from_float(net.h_s, scale_thresholds(), net.m)  # fails early if not exact
    if arch == "checkerboard":
        integer_context(net.ctx)  # likewise
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS
    torch.save({
        "config": {"name": out_dir.name, "arch": arch, "n": cfg["n"], "m": cfg["m"], "lambdas": list(cfg["lambdas"])},
        "model": {k: v.contiguous() for k, v in net.state_dict().items()},
        # Tables computed with transcendental functions are frozen here: libm may differ between machines.
        "scale_table": torch.from_numpy(scale_table()),
        "scale_thresholds": torch.from_numpy(scale_thresholds()),
        "z_pmf": torch.from_numpy(net.z_density.pmf_table()),
    }, path)
    return path


def rgb_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div_(255.0)


@torch.no_grad()
def estimated_bits(coder: ImageCoder, x: torch.Tensor, level: int) -> float:
    """The training model's rate for x: -log2 likelihood of the rounded latents (not coded)."""
    net = coder.net
    x = pad_to(x, net.stride).to(coder.device).contiguous(memory_format=torch.channels_last)
    out = net.eval()(x, torch.tensor([level], device=coder.device))
    return float(-(out["y_likelihood"].log2().sum() + out["z_likelihood"].log2().sum()))


def evaluate(coder: ImageCoder, images: list[np.ndarray]) -> list[dict]:
    """Per level: real coded bpp, estimated bpp and PSNR-RGB, averaged over images."""
    rows = []
    for level in range(coder.levels):
        bits = est = ideal = no_ctx = px = 0.0
        psnrs = []
        for img in images:
            x = rgb_tensor(img)
            streams, rec = coder.encode(x, level)
            bits += 8 * sum(len(s) for s in streams)
            est += estimated_bits(coder, x, level)
            ideal += coder.ideal_bits(x, level)
            if coder.ctx is not None:
                no_ctx += coder.ideal_bits(x, level, context=False)
            px += img.shape[0] * img.shape[1]
            ref = x.mul(255).round()
            mse = float((rec.clamp(0, 1).mul(255).round() - ref).pow(2).mean())
            psnrs.append(10 * math.log10(255**2 / max(mse, 1e-10)))
        rows.append({"level": level, "lambda": coder.lambdas[level], "bpp": bits / px, "bpp_estimated": est / px, "bpp_ideal": ideal / px,
                     "psnr_rgb": float(np.mean(psnrs))})
        if coder.ctx is not None:
            rows[-1]["bpp_ideal_no_context"] = no_ctx / px
    return rows


def init_lineage(init: Path) -> dict:
    """What a run started from (``aic train --init``): the weights' path and sha256, and the steps and
    wall time of their own training when their model.json says (chained, so totals add up)."""
    import hashlib

    info = {"path": str(init), "sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest(),
            "steps": None, "wall_time_s": None}
    meta_path = Path(init).parent / "model.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        info["name"] = meta.get("name")
        info["steps"] = meta.get("total_steps", meta.get("steps"))
        info["wall_time_s"] = meta.get("total_wall_time_s", meta.get("wall_time_s"))
    return info


def add_lineage(meta: dict, init: Path) -> None:
    """Record in a model's metadata the weights it started from, and the totals across both runs."""
    meta["init"] = init_lineage(init)
    if meta["init"]["steps"] is not None and meta["init"]["wall_time_s"] is not None:
        meta["total_steps"] = meta["steps"] + meta["init"]["steps"]
        meta["total_wall_time_s"] = meta["wall_time_s"] + meta["init"]["wall_time_s"]


def export_model(ckpt: Path, out_dir: Path, val: str | None = None, init: Path | None = None) -> Path:
    """Export weights, evaluate on ``val`` and write MODEL_CARD.md and model.json; ``init`` is the
    weights the run started from (``aic train --init``), recorded in the card."""
    path = export_weights(ckpt, out_dir)
    state = torch.load(ckpt, map_location="cpu")
    cfg = state["config"]
    coder = ImageCoder(path)
    rows = []
    if val:
        images = [load_frames(p, VAL_MAX_SIDE)[0] for p in list_sources(val)]
        rows = evaluate(coder, images)
    wall = training_wall_time(Path(ckpt).parent / "train_log.tsv")
    meta = {"name": out_dir.name, "sha256": coder.sha256, "steps": state["step"], "config": cfg,
            "wall_time_s": wall, "hardware": _hardware(cfg), "exported": dt.date.today().isoformat(),
            "train_files": _count(cfg["data"]), "val_files": _count(val) if val else 0,
            "val": val, "rd": rows}
    init = init or cfg.get("init")
    if init is not None:
        add_lineage(meta, Path(init))
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(meta))
    return path


def training_wall_time(log: Path) -> float:
    """Seconds of training in a train_log.tsv; a resumed run whose clock restarted adds a segment."""
    if not log.exists():
        return float("nan")
    total = last = 0.0
    for line in log.read_text().splitlines():
        t = float(line.split("\t")[1])
        if t < last:
            total += last
        last = t
    return total + last


def _count(spec: str) -> int | None:
    try:
        return len(list_sources(spec))
    except (OSError, ValueError):
        return None


def _hardware(cfg: dict) -> str:
    if str(cfg["device"]).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    threads = cfg.get("threads") or torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}"


def _lineage(meta: dict) -> str:
    init = meta.get("init")
    if not init:
        return ""
    text = f"\n- started from `{init['path']}` (sha256 `{init['sha256'][:16]}…`"
    if init.get("steps") is not None:
        text += f", {init['steps']} steps and {init['wall_time_s'] / 3600:.2f} h of training before"
    text += ")"
    if "total_steps" in meta:
        text += f"; {meta['total_steps']} steps and {meta['total_wall_time_s'] / 3600:.2f} h in all"
    return text


def _init_flags(meta: dict, cfg: dict) -> str:
    init = meta.get("init")
    flags = f" --arch {cfg['arch']}" if cfg.get("arch", "hyperprior") != "hyperprior" else ""
    flags += f" --init {init['path']} --lr {cfg['lr']}" if init else ""
    return flags + (f" --precision {cfg['precision']}" if cfg.get("precision", "fp32") != "fp32" else "")


def _arch_note(cfg: dict) -> str:
    if cfg.get("arch", "hyperprior") == "checkerboard":
        return ("mean-scale hyperprior (Minnen et al., 2018) with a checkerboard spatial context\n"
                "(He et al., 2021; linear, depthwise 5×5 then pointwise, in exact integers)")
    return "mean-scale hyperprior (Minnen et al., 2018, without the\nautoregressive context)"


def _data_note(data: str) -> str:
    note = "the natural photographs listed by `../shared/datasets/get-photos.sh`"
    if Path(data).name == "train-plus.txt":
        note += " and the 15 more of `tools/get_extra_photos.sh`"
    return note + ", from Debian's wallpaper packages"


def _precision(cfg: dict) -> str:
    if cfg.get("precision", "fp32") == "bf16":
        return ("; the transforms' wide convolutions in bfloat16 (autocast); the layers next to the latents, "
                "the hyperprior, the context, the likelihoods and the loss in float32 (inference runs in float32)")
    return "; float32"


def model_card(meta: dict) -> str:
    cfg = meta["config"]
    ctx = bool(meta["rd"]) and "bpp_ideal_no_context" in meta["rd"][0]
    table = "\n".join(
        f"| {r['level']} | {r['lambda']:.5f} | {r['bpp']:.4f} | {r['bpp_ideal']:.4f} | "
        f"{100 * (r['bpp'] / r['bpp_ideal'] - 1):+.2f} % | {r['bpp_estimated']:.4f} | "
        f"{100 * (r['bpp'] / r['bpp_estimated'] - 1):+.2f} % | {r['psnr_rgb']:.2f} |"
        + (f" {100 * (r['bpp_ideal'] / r['bpp_ideal_no_context'] - 1):+.2f} % |" if ctx else "") for r in meta["rd"])
    ctx_head, ctx_rule = (" context |", "---|") if ctx else ("", "")
    ctx_note = ("\n\"context\" is what the checkerboard context changes in the tables' bits of the same latents,\n"
                "against pricing them with the hyperprior's parameters alone.") if ctx else ""
    return f"""# {meta['name']}

A learned image codec: {_arch_note(cfg)} with simplified GDN, N={cfg['n']}, M={cfg['m']}, one
variable-rate model with {len(cfg['lambdas'])} levels (per-level channel gains).

- weights: `weights.pt`, sha256 `{meta['sha256']}`
- entropy coding: constriction ANS; y as quantized Gaussians (scale from a
  {96}-entry log table picked by an integer hyper-synthesis), z with per-channel
  categorical tables frozen in the weights file.
- colour: the model codes RGB, nominally in [0, 1]; in the pipeline (codec version 2) yuv420p
  frames become float RGB (BT.601 limited range, chroma replicated 2x2, nothing
  clipped) before the analysis transform, and the synthesis output goes back the
  exact inverse way (chroma averaged 2x2): the conversion itself loses nothing.

## Training
- data: `{cfg['data']}` ({meta['train_files']} files; {_data_note(cfg['data'])}, 1080p to 5K); random
  {cfg['crop']}×{cfg['crop']} crops from each scaled to 768, 1280 and 2048 pixels on the long side, random flips
- recipe: Adam, lr {cfg['lr']} (cosine decay over the last 30 %), batch {cfg['batch_size']},
  loss λ·255²·MSE + bpp with λ drawn per sample from {list(cfg['lambdas'])}, mixed quantization
  (noise for the rate, straight-through rounding for the synthesis){_precision(cfg)}
- steps: {meta['steps']}; hardware: {meta['hardware']}; wall time: {meta['wall_time_s'] / 3600:.2f} h{_lineage(meta)}
- command: `aic train --data {cfg['data']} --steps {cfg['steps']}{_init_flags(meta, cfg)} --export models/{meta['name']} --val {meta['val']}`

## Rate–distortion on the validation photos
`{meta['val']}` ({meta['val_files']} photos, none of them in the training list; see models/README.md
on one near-twin), each scaled to {VAL_MAX_SIDE}
pixels on the long side, RGB in and out (no yuv420p round trip: the codec alone).
"coded" counts the bytes the entropy coder wrote.  "tables" is the −log2
probability of the same latents under the coding tables (the 96-entry scale
table and the frozen z tables): coded vs tables is the entropy coder's own
overhead.  "model" is the model's estimated rate, −log2 likelihood of the
rounded latents with continuous scales.  Likelihoods are floored at 2^-24, the
smallest probability the coder assigns (with the common 1e-9 floor the model
would charge ~30 bits for tail symbols the coder codes in 24, and overstate
the rate by 2–3 %).{ctx_note}

| level | λ | bpp coded | bpp tables | coded vs tables | bpp model | coded vs model | PSNR-RGB dB |{ctx_head}
|---|---|---|---|---|---|---|---|{ctx_rule}
{table}

Exported {meta['exported']}.
"""
