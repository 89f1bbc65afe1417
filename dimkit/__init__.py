"""dimkit: a notebook reproduction kit for DIM (Song et al., PRCV 2024, arXiv 2407.12019).

The package does the work; the numbered notebooks in ``notebooks/`` tell the story:
``00_data`` (:mod:`dimkit.datasets`, :mod:`dimkit.prepare`, :mod:`dimkit.images`,
:mod:`dimkit.candidates`), ``01_augment``, ``02_expert_cues``, ``03_train``, ``04_tables``,
``05_figure2``, ``06_errors`` (:mod:`dimkit.link`, :mod:`dimkit.analysis`). Training runs are
found, read, chosen and launched by :mod:`dimkit.runs`.
"""
__version__ = "0.1.0"

from .datasets import Dataset, load  # noqa: E402,F401
from .errors import DataError, DimkitError  # noqa: E402,F401
from .link import link  # noqa: E402,F401  (imports no torch until called)
from . import bundled  # noqa: E402,F401  (registers the bundled sample's builders)
