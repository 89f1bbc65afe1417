"""The bundled synthetic sample, built the first time it is asked for.

``sample`` is prepared from the source shipped in the package (``dimkit/data/sample/source``) and
``sample+`` from its stored oracle answers, so every notebook and command runs on a fresh clone or
install with nothing to download and no LLM to call. :mod:`dimkit.datasets` only knows the builders
registered here, never the stages they use.
"""
from __future__ import annotations

from pathlib import Path

from . import augment, datasets, paths, prepare


def build_sample(data_dir: Path | None = None) -> Path:
    """Prepare ``sample`` from the shipped source (again, replacing it, when the checkout or install it
    links its images from has moved)."""
    moved = datasets._images_link_broken(datasets.dataset_dir("sample", data_dir))
    return prepare.run(prepare.PrepareConfig(src=paths.sample_source_dir(), dataset="sample",
                                             data_dir=data_dir, force=moved)).root


def build_sample_plus(data_dir: Path | None = None) -> Path:
    """Build ``sample+`` from the sample's stored oracle answers (no request is sent)."""
    report = augment.augment("sample", model=augment.SAMPLE_ORACLE, replay=True, progress=False,
                             data_dir=data_dir)
    return Path(report.out_path)


datasets.BUILDERS.update({"sample": build_sample, "sample+": build_sample_plus})
