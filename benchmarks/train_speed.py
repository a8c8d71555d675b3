"""Seconds per training step of the learned codec, float32 against ``--precision bf16``, side by side.

    python -m benchmarks.train_speed [--steps 20] [--threads 2] [--device cpu]

The same model, batch and crops as ``aic train``'s defaults (8 crops of
192×192, every level); each precision is timed in alternation, after a
warm-up, so a noisy machine shifts both alike.  bfloat16 pays on CPUs with AMX
or AVX512-BF16 and on GPUs; elsewhere it may be slower than float32.
"""

from __future__ import annotations

import argparse
import time

import torch

from shared.neural.models import MeanScaleHyperprior
from shared.neural.training import DEFAULT_LAMBDAS, TrainConfig, rd_loss


def _cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags) or "none of note"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per precision and round (default 20)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    cfg = TrainConfig(data="-")
    net = MeanScaleHyperprior(cfg.n, cfg.m, len(DEFAULT_LAMBDAS)).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-6)
    x = torch.rand(cfg.batch_size, 3, cfg.crop, cfg.crop, device=device).contiguous(memory_format=torch.channels_last)
    lambdas = torch.tensor(DEFAULT_LAMBDAS, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(precision: str, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            level = torch.randint(len(DEFAULT_LAMBDAS), (cfg.batch_size,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(x, level)
            loss, _, _ = rd_loss(out, x, lambdas[level])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return (time.perf_counter() - t0) / steps

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in times:
        run(precision, 2)  # warm-up (allocator, oneDNN kernels)
    for _ in range(a.rounds):
        for precision in times:
            times[precision].append(run(precision, a.steps))
    fp32, bf16 = (min(times[k]) for k in ("fp32", "bf16"))
    print(f"{a.device}, {a.threads} threads, CPU flags: {_cpu_flags()}; batch {cfg.batch_size} x {cfg.crop}^2")
    print(f"  fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step (best of {a.rounds} rounds of {a.steps}): "
          f"bf16 is {fp32 / bf16:.2f}x as fast")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
