"""BD-rate between two exported models, from the RD tables their exports measured.

    python -m benchmarks.model_bd OLD/model.json NEW/model.json

Both tables must come from the same validation list (the export's ``--val``);
negative = the new model needs fewer bits for the same PSNR-RGB.  A model that
left the tree is read from history, e.g.
``git show dec09b7:models/hyperprior-v3/model.json > /tmp/v3.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks.rd import bd_rate


def rd_points(path: Path) -> tuple[str, list]:
    meta = json.loads(Path(path).read_text())
    return meta.get("val"), [SimpleNamespace(bpp=r["bpp"], psnr_rgb=r["psnr_rgb"]) for r in meta["rd"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    a = ap.parse_args(argv)
    (val_old, old), (val_new, new) = rd_points(a.old), rd_points(a.new)
    if val_old != val_new:
        raise SystemExit(f"the tables come from different validation lists: {val_old} vs {val_new}")
    bd = bd_rate(old, new, "psnr_rgb")
    print("curves do not overlap" if bd is None else f"BD-rate (PSNR-RGB) of {a.new} against {a.old}: {bd:+.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
