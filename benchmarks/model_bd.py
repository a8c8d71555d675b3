"""BD-rate between two exported models, from the RD tables their exports measured.

    python -m benchmarks.model_bd OLD/model.json NEW/model.json

Both tables must come from the same validation list (the export's ``--val``);
negative = the new model needs fewer bits for the same PSNR-RGB.  For a
restoration model (the hybrid codec), ``--vs-base MODEL/model.json`` gives what
its learned part buys: the hybrid against its own base layer, same bitstreams.  A model that
left the tree is read from history, e.g.
``git show dec09b7:models/hyperprior-v3/model.json > /tmp/v3.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks.rd import bd_rate


def rd_points(path: Path, suffix: str = "") -> tuple[str, list]:
    """(validation list, RD points) of a model card; ``suffix="_base"``: a restoration model's base layer."""
    meta = json.loads(Path(path).read_text())
    return meta.get("val"), [SimpleNamespace(bpp=r["bpp" + suffix], psnr_rgb=r["psnr_rgb" + suffix]) for r in meta["rd"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", nargs="?")
    ap.add_argument("new", nargs="?")
    ap.add_argument("--vs-base", type=Path, metavar="MODEL_JSON",
                    help="a restoration model's card: the hybrid against its base layer alone")
    a = ap.parse_args(argv)
    if a.vs_base:
        _, base = rd_points(a.vs_base, "_base")
        _, hybrid = rd_points(a.vs_base)
        bd = bd_rate(base, hybrid, "psnr_rgb")
        print("curves do not overlap" if bd is None else f"BD-rate (PSNR-RGB) of {a.vs_base} against its base layer: {bd:+.2f} %")
        return 0
    if not (a.old and a.new):
        ap.error("give OLD and NEW model.json, or --vs-base MODEL_JSON")
    (val_old, old), (val_new, new) = rd_points(a.old), rd_points(a.new)
    if val_old != val_new:
        raise SystemExit(f"the tables come from different validation lists: {val_old} vs {val_new}")
    bd = bd_rate(old, new, "psnr_rgb")
    print("curves do not overlap" if bd is None else f"BD-rate (PSNR-RGB) of {a.new} against {a.old}: {bd:+.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
