"""``aic train``: rate–distortion training of the variable-rate learned codec.

One model covers every level; each training sample draws a level and is
weighted by that level's lambda (loss = lambda * 255^2 * MSE + bpp).
Checkpoints hold everything needed to resume; ``--export`` writes the
inference weights and the model card (see :mod:`shared.neural.export`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from shared.neural.data import CropSampler, list_sources
from shared.neural.models import ARCHS

#: Rate–distortion trade-offs, one per level, fewest bits first.
DEFAULT_LAMBDAS = tuple(round(0.0009 * (100 ** (k / 7)), 5) for k in range(8))


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    data: str
    steps: int = 10000
    level: int | None = None  # None: every level; K: only level K (fine-tuning one point)
    batch_size: int = 8
    crop: int = 192
    lr: float = 3e-4
    n: int = 96
    m: int = 160
    lambdas: tuple[float, ...] = field(default=DEFAULT_LAMBDAS)
    device: str = "cpu"
    threads: int = 0
    seed: int = 0
    init: str | None = None  # the weights the run started from (--init), kept for the model card
    precision: str = "fp32"  # "bf16": wide transform convolutions in bfloat16 (see MeanScaleHyperprior.forward)
    arch: str = "hyperprior"  # a key of shared.neural.models.ARCHS

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, not {self.arch!r}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Constant, then a cosine decay over the last 30 % of the steps down to lr/10."""
    start = int(0.7 * cfg.steps)
    if step < start:
        return cfg.lr
    t = (step - start) / max(1, cfg.steps - start)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def rd_loss(out: dict, x: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, bpp per sample, mse per sample)."""
    pixels = x.shape[2] * x.shape[3]
    bits = -(out["y_likelihood"].log2().sum(dim=(1, 2, 3)) + out["z_likelihood"].log2().sum(dim=(1, 2, 3)))
    bpp = bits / pixels
    mse = (out["x_hat"] - x).pow(2).mean(dim=(1, 2, 3))
    return (lam * 255.0**2 * mse + bpp).mean(), bpp.detach(), mse.detach()


def save_checkpoint(path: Path, net, opt, step: int, cfg: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def prepare(cfg, out_dir: Path) -> torch.device:
    """Threads, seed and output folder for a training run; returns its device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    return torch.device(cfg.device)


def start_state(net: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, resume: Path | None,
                init: Path | None) -> int:
    """Load a checkpoint to resume (weights, optimizer, step) or initial weights; returns the step."""
    if resume:
        state = torch.load(resume, map_location=device)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return int(state["step"])
    if init:
        # A checkerboard model may start from hyperprior weights: its context starts at zero.
        missing, unexpected = net.load_state_dict(torch.load(init, map_location=device)["model"], strict=False)
        if unexpected or any(not k.startswith("ctx.") for k in missing):
            raise ValueError(f"{init}: weights do not fit this model (missing {missing}, unexpected {unexpected})")
    return 0


def clock_start(log_path: Path, resume: Path | None) -> float:
    """The ``time.time()`` the training clock counts from: a resumed run's log continues, so the
    log's last line is always the whole training time."""
    done_s = float(log_path.read_text().splitlines()[-1].split("\t")[1]) if resume and log_path.exists() else 0.0
    return time.time() - done_s


def train(cfg: TrainConfig, out_dir: Path, resume: Path | None = None, init: Path | None = None,
          ckpt_every: int = 200) -> Path:
    """Train (or resume) and return the path of the final checkpoint."""
    device = prepare(cfg, out_dir)
    net = ARCHS[cfg.arch](cfg.n, cfg.m, len(cfg.lambdas)).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step = start_state(net, opt, device, resume, init)
    lambdas = torch.tensor(cfg.lambdas, device=device)
    sampler = CropSampler(list_sources(cfg.data), cfg.crop, seed=cfg.seed + step)
    ckpt = out_dir / "checkpoint.pt"
    net.train()
    bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, disable=None)
    avg_bpp = avg_psnr = None
    log_path = out_dir / "train_log.tsv"
    t0 = clock_start(log_path, resume)
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x = sampler.batch(cfg.batch_size).to(device).contiguous(memory_format=torch.channels_last)
        if cfg.level is None:
            level = torch.randint(len(cfg.lambdas), (cfg.batch_size,), device=device)
        else:
            level = torch.full((cfg.batch_size,), cfg.level, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = net(x, level)
        loss, bpp, mse = rd_loss(out, x, lambdas[level])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
        avg_bpp = bpp.mean().item() if avg_bpp is None else 0.98 * avg_bpp + 0.02 * bpp.mean().item()
        avg_psnr = psnr if avg_psnr is None else 0.98 * avg_psnr + 0.02 * psnr
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", bpp=f"{avg_bpp:.3f}", psnr=f"{avg_psnr:.2f}")
        if step % ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, net, opt, step, cfg)
            with open(log_path, "a") as log:
                log.write(f"{step}\t{time.time() - t0:.1f}\t{avg_bpp:.4f}\t{avg_psnr:.3f}\t{loss.item():.4f}\n")
    bar.close()
    return ckpt


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="aic train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("hyperprior", "checkerboard", "restore"), default="hyperprior",
                   help="hyperprior: the learned image codec (default); checkerboard: the same with a "
                        "checkerboard spatial context (--init from hyperprior weights starts it at zero); "
                        "restore: the hybrid codec's restoration network, trained on x264-coded synthetic "
                        "camera motion")
    p.add_argument("--data", help="list file (one path per line), folder, or file of images/videos")
    p.add_argument("--level", default="all",
                   help="'all' trains every rate level (default); K trains only level K (fine-tuning)")
    p.add_argument("--steps", type=int,
                   help=f"total optimizer steps (default {TrainConfig.steps}; restore 4000); with --resume, the new total")
    p.add_argument("--batch-size", type=int,
                   help=f"crops per step (hyperprior, default {TrainConfig.batch_size}) or clips per step (restore, default 2)")
    p.add_argument("--crop", type=int,
                   help=f"crop side in pixels: multiple of 64 for hyperprior (default {TrainConfig.crop}), even for restore (default 128)")
    from shared.neural.restore_training import RestoreConfig  # here: that module builds on this one

    p.add_argument("--lr", type=float, help=f"learning rate (default {TrainConfig.lr}; restore {RestoreConfig.lr})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default), or bf16: the transforms' wide convolutions in bfloat16, the layers "
                        "next to the latents, the hyperprior, likelihoods and loss in float32; 2.4x as fast on a "
                        "2-core Xeon with AMX (benchmarks/train_speed.py), no gain without AMX or AVX512-BF16 "
                        "(lscpu flags amx_bf16, avx512_bf16). Inference always runs in float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("data/train"), help="checkpoint folder (default %(default)s)")
    p.add_argument("--resume", type=Path, help="checkpoint to resume from (its config wins)")
    p.add_argument("--init", type=Path, help="start from these weights with a fresh optimizer")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--export", type=Path, help="after training, export inference weights and MODEL_CARD.md here")
    p.add_argument("--val", help="validation images for the model card's RD table (list file or folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    saved = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise SystemExit(f"aic train: --resume {args.resume}: no such checkpoint")
        saved = torch.load(args.resume, map_location="cpu", mmap=True)["config"]  # mmap: only the config is read here
        if "channels" in saved:
            args.arch = "restore"  # the checkpoint knows what it trains; --arch need not be repeated
    if args.arch == "restore":
        return _main_restore(args, saved)
    args.steps = args.steps or (None if args.resume else TrainConfig.steps)
    args.batch_size = args.batch_size or TrainConfig.batch_size
    args.crop = args.crop or TrainConfig.crop
    args.lr = args.lr or TrainConfig.lr
    if saved is not None:
        saved["lambdas"] = tuple(saved["lambdas"])
        cfg = TrainConfig(**{**saved, "steps": args.steps or saved["steps"], "device": args.device, "threads": args.threads,
                             "precision": args.precision or saved.get("precision", "fp32")})
    else:
        if not args.data:
            raise SystemExit("aic train: --data is required (unless --resume)")
        if args.crop % 64:
            raise SystemExit("aic train: --crop must be a multiple of 64")
        level = None if args.level == "all" else int(args.level)
        if level is not None and not 0 <= level < len(DEFAULT_LAMBDAS):
            raise SystemExit(f"aic train: --level must be 'all' or 0..{len(DEFAULT_LAMBDAS) - 1}")
        cfg = TrainConfig(data=args.data, steps=args.steps, level=level, batch_size=args.batch_size, crop=args.crop,
                          lr=args.lr, device=args.device, threads=args.threads,
                          init=str(args.init) if args.init else None, precision=args.precision or "fp32",
                          arch=args.arch)
    ckpt = train(cfg, args.out, resume=args.resume, init=args.init, ckpt_every=args.ckpt_every)
    if args.export:
        from shared.neural.export import export_model

        export_model(ckpt, args.export, val=args.val)
    return 0


def _main_restore(args: argparse.Namespace, saved: dict | None) -> int:
    from shared.neural.restore_training import RestoreConfig, export_restore, train_restore

    if args.precision not in (None, "fp32"):
        raise SystemExit("aic train: --precision bf16 is for the hyperprior codec only")
    if saved is not None:
        cfg = RestoreConfig(**{**saved, "steps": args.steps or saved["steps"], "device": args.device, "threads": args.threads})
    else:
        if not args.data:
            raise SystemExit("aic train: --data is required (unless --resume)")
        crop = args.crop or RestoreConfig.crop
        if crop % 2 or crop < 32:
            raise SystemExit("aic train: --crop must be even and at least 32 for --arch restore")
        cfg = RestoreConfig(data=args.data, steps=args.steps or RestoreConfig.steps, clips=args.batch_size or RestoreConfig.clips, crop=crop,
                            lr=args.lr or RestoreConfig.lr, device=args.device, threads=args.threads,
                            init=str(args.init) if args.init else None)
    ckpt = train_restore(cfg, args.out, resume=args.resume, init=args.init, ckpt_every=args.ckpt_every)
    if args.export:
        export_restore(ckpt, args.export, val=args.val)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
