"""Where dimkit reads and writes: data, caches, runs and figures, and what ships inside the package.

Every folder comes from an environment variable. Without one, a checkout (``make demo``, an
editable install) keeps everything beside the repository, as its README shows; an installed copy
(``pip install .``, a wheel) follows the usual places: prepared data and caches under
``$XDG_DATA_HOME/dimkit`` and ``$XDG_CACHE_HOME/dimkit``, runs and figures in the working folder.
Nobody edits a file before the first run.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
#: What ships inside the package, found the same way from a checkout or an installed wheel: the
#: bundled synthetic sample, its small CLIP and the reference results.
PACKAGE_DATA = PACKAGE_DIR / "data"
#: The repository checkout this copy runs from, or None for an installed copy.
REPO_ROOT: Path | None = (PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file()
                          and (PACKAGE_DIR.parent / "notebooks").is_dir() else None)


def _installed_default(var: str) -> Path:
    home = Path.home()
    if var == "DIMKIT_DATA":
        return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "dimkit" / "data"
    if var == "DIMKIT_CACHE":
        return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "dimkit"
    return Path.cwd() / {"DIMKIT_RUNS": "runs", "DIMKIT_FIGURES": "figures"}[var]


_CHECKOUT_DEFAULTS = {"DIMKIT_DATA": "data", "DIMKIT_CACHE": ".cache", "DIMKIT_RUNS": "runs",
                      "DIMKIT_FIGURES": "figures"}


def _folder(var: str) -> Path:
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser().resolve()
    if REPO_ROOT is not None:
        return REPO_ROOT / _CHECKOUT_DEFAULTS[var]
    return _installed_default(var)


def data_dir() -> Path:
    """Prepared datasets live in ``$DIMKIT_DATA/<name>``."""
    return _folder("DIMKIT_DATA")


def cache_dir() -> Path:
    """Stores of LLM answers, expert cues and features."""
    return _folder("DIMKIT_CACHE")


def runs_dir() -> Path:
    """Training runs and executed notebooks."""
    return _folder("DIMKIT_RUNS")


def figures_dir() -> Path:
    """Figures and tables rebuilt by code."""
    return _folder("DIMKIT_FIGURES")


def sample_source_dir() -> Path:
    """The bundled synthetic sample in the DIM release layout (shipped in the package)."""
    return PACKAGE_DATA / "sample" / "source"


def sample_clip_dir() -> Path:
    """The small CLIP trained on the bundled sample (shipped in the package)."""
    return PACKAGE_DATA / "sample" / "clip"


def reference_file() -> Path:
    """Reference results, each with its source (shipped in the package)."""
    return PACKAGE_DATA / "reference_results.csv"


def notebooks_dir() -> Path:
    """The numbered notebooks: they live in the repository, not in an installed copy."""
    from .errors import DimkitError

    if REPO_ROOT is None:
        raise DimkitError("the notebooks live in the dimkit repository, not in an installed copy: clone it "
                          "and run them from there (`make demo`)")
    return REPO_ROOT / "notebooks"


def check_name(value: str, label: str, hint: str = "") -> str:
    """``value`` when it is a plain file or folder name, as a run name must be: not empty, no '/', not
    starting with '.' (so nothing is written outside the folder it is meant for); else ConfigError
    naming the setting (``label``: its flag on the command line) and saying ``hint``."""
    if not isinstance(value, str) or not value or "/" in value or "\0" in value or value.startswith("."):
        raise ConfigError(f"{label} must be a plain file or folder name (no '/', not starting with '.'), "
                          f"got {value!r}" + (f"; {hint}" if hint else ""))
    return value
