"""Where learned models live: ``$AIC_MODELS_DIR``, else the repository's ``models/``.

Each model is a folder ``<name>/`` holding ``weights.pt``, ``model.json`` and
``MODEL_CARD.md``.  No torch here: services ask whether weights exist before
deciding to import it.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS = "weights.pt"
#: The model each learned codec uses unless told otherwise.
DEFAULT_MODELS = {"neural": "checkerboard-v1", "hybrid": "restore-v2"}


def models_dir() -> Path:
    """``$AIC_MODELS_DIR``, else the repository's ``models/``."""
    env = os.environ.get("AIC_MODELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "models"


def model_path(name: str) -> Path:
    """The weights file of the model called ``name`` (which may not exist)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}")
    return models_dir() / name / WEIGHTS
