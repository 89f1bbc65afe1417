"""Where dimkit reads and writes: data, caches, runs and figures.

Every folder comes from an environment variable with a repo-relative default, so nothing in the
kit names a machine path and nobody edits a file before the first run.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The checkout dimkit was installed from (editable install) -- the parent of the package folder.
REPO_ROOT = Path(__file__).resolve().parents[1]

_DEFAULTS = {
    "DIMKIT_DATA": "data",
    "DIMKIT_CACHE": ".cache",
    "DIMKIT_RUNS": "runs",
    "DIMKIT_FIGURES": "figures",
}


def _folder(var: str) -> Path:
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser().resolve()
    return REPO_ROOT / _DEFAULTS[var]


def data_dir() -> Path:
    """Prepared datasets live in ``$DIMKIT_DATA/<name>`` (default ``data/``)."""
    return _folder("DIMKIT_DATA")


def cache_dir() -> Path:
    """Stores of LLM answers, expert cues and features (default ``.cache/``)."""
    return _folder("DIMKIT_CACHE")


def runs_dir() -> Path:
    """Training runs and executed notebooks (default ``runs/``)."""
    return _folder("DIMKIT_RUNS")


def figures_dir() -> Path:
    """Figures and tables rebuilt by code (default ``figures/``)."""
    return _folder("DIMKIT_FIGURES")


def sample_source_dir() -> Path:
    """The bundled synthetic sample in the DIM release layout (committed, under ``data/sample/source``)."""
    return REPO_ROOT / "data" / "sample" / "source"
