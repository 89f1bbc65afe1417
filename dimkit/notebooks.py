"""Run the numbered notebooks headless with papermill (``make demo``, the notebook tests)."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from . import datasets, paths
from .datasets import canonical_name
from .errors import ConfigError, DimkitError, option


def numbered_notebooks(folder: str | Path | None = None) -> list[Path]:
    """``NN_*.ipynb`` in reading order (default: the checkout's ``notebooks/``)."""
    return sorted(Path(folder or paths.notebooks_dir()).glob("[0-9][0-9]_*.ipynb"))


def dataset_for(notebook: str | Path, dataset: str) -> str | None:
    """The dataset value to pass to a notebook, or None if it takes no ``dataset`` parameter.

    Notebooks whose default dataset is an augmented one (``sample+``: 02, 03, 05, 06) get the
    augmented form of the requested dataset, the others (00, 01, 04) get it as is: ``sample`` gives
    00, 01 and 04 ``sample`` and 02, 03, 05, 06 ``sample+``. Only the dataset is passed, so a run
    suits the sample alone (notebook 01's default model, ``sample-oracle``, refuses every other
    dataset); a real dataset goes through ``make reproduce``, or papermill with each notebook's own
    parameters (``-p dataset wikimel -p model gpt-4o-mini -p replay False`` for 01).
    """
    import papermill

    params = papermill.inspect_notebook(str(notebook))
    if "dataset" not in params:
        return None
    default = str(params["dataset"].get("default", "")).strip("\"'")
    name = canonical_name(dataset)
    if default.endswith("+") and not name.endswith("+"):
        return name + "+"
    return name


def check_dataset(dataset: str) -> str:
    """The canonical name of ``dataset`` when the notebooks can run on it -- a bundled dataset (built on
    first use) or one prepared here -- else a ConfigError saying how to prepare it, before any kernel
    starts (a notebook would otherwise fail in its second cell, deep in papermill's traceback)."""
    flag = option("dataset", "--dataset")
    try:
        name = canonical_name(dataset)
    except DimkitError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    root = datasets.dataset_dir(name)
    if name in datasets.BUILDERS or (root / "meta.json").exists():
        return name
    bundled = ", ".join(datasets.BUILDERS) or "sample"
    raise ConfigError(f"{flag}: dataset {name!r} is not prepared here ({root / 'meta.json'} is missing) and is not "
                      f"a bundled one ({bundled}). {datasets.how_to_prepare(name)}, or run the notebooks on the sample")


@dataclass
class NotebookRun:
    notebook: str
    output: str
    parameters: dict
    seconds: float


def run_notebooks(dataset: str = "sample", out_dir: str | Path | None = None,
                  only: list[str] | None = None, parameters: dict | None = None) -> list[NotebookRun]:
    """Execute every numbered notebook in order (``only``: those whose name starts with one of these
    prefixes; None: all); the first failing cell raises (papermill's error). The dataset and ``only``
    are checked before any kernel starts."""
    dataset = check_dataset(dataset)
    notebooks = numbered_notebooks()
    if only is not None:
        flag = option("only", "--only")
        known = ", ".join(nb.name[:2] for nb in notebooks)
        if not only:
            raise ConfigError(f"{flag}: name the notebooks to run by number ({known}), or leave it out to run all")
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in only)]
        if not notebooks:
            raise ConfigError(f"{flag}: no notebook matches {' '.join(only)} (the notebooks: {known})")
    import papermill

    out_dir = Path(out_dir) if out_dir is not None else paths.runs_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for nb in notebooks:
        params = dict(parameters or {})
        ds = dataset_for(nb, dataset)
        if ds is not None:
            params["dataset"] = ds
        declared = papermill.inspect_notebook(str(nb))
        params = {k: v for k, v in params.items() if k in declared}
        out = out_dir / nb.name
        print(f"== {nb.name} {params}", flush=True)
        t0 = time.perf_counter()
        papermill.execute_notebook(str(nb), str(out), parameters=params, kernel_name="python3",
                                   cwd=str(nb.parent), progress_bar=False)
        runs.append(NotebookRun(nb.name, str(out), params, time.perf_counter() - t0))
        print(f"   done in {runs[-1].seconds:.1f} s -> {out}", flush=True)
    return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dimkit notebooks``."""
    parser.add_argument("--dataset", default="sample", help="dataset for 00, 01 and 04 (02, 03, 05 and 06 get its '+' form)")
    parser.add_argument("--out", default=None, help="folder for executed notebooks (default runs/notebooks)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="notebook number prefixes to run, e.g. 00 03 "
                                                                  "(default: all)")


def run_cli(args: argparse.Namespace) -> int:
    """``dimkit notebooks``: execute the numbered notebooks."""
    runs = run_notebooks(args.dataset, args.out, args.only)
    total = sum(r.seconds for r in runs)
    print(f"{len(runs)} notebooks executed in {total:.0f} s")
    return 0
