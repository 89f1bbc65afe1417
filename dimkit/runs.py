"""Training runs: where they are, what they say, which one to use, and training the missing ones.

A run of :mod:`dimkit.train` is a folder ``$DIMKIT_RUNS/<run-name>/`` holding ``metrics.json`` and,
once finished, ``model.pt``, ``predictions.parquet`` and ``features.json``. The tables, the error
analysis, ``dimkit link`` and ``dimkit reproduce`` all read runs here. Only :func:`launch` imports
the training code (and torch), so reading runs stays light.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .stage import Result

#: The statuses of a run that finished; ``train`` writes ``diverged`` for one that stopped on a NaN.
FINISHED = ("completed", "early_stopped")
METRICS_FILE = "metrics.json"
#: What ``train`` records about the inputs of a run: the feature model, the expert, the knowledge base.
FEATURES_FILE = "features.json"
#: What a finished run folder needs besides ``metrics.json`` to be linked with (:mod:`dimkit.link`).
LINK_FILES = ("model.pt", FEATURES_FILE)
#: The status :func:`check_kb` gives a finished run whose dataset's knowledge base changed since.
STALE = "stale"
#: How :func:`choose` picks one run among several.
PICKS = ("latest", "best_dev")
#: When :func:`launch` takes a run as there already: ``config``, the run of exactly these settings
#: finished (its name carries their hash); ``key``, any finished run of the dataset, variant and
#: ablation that matches the ``filters`` given (all a table cell asks for).
REUSE = ("config", "key")
#: The columns of :func:`collect` before the per-metric ones.
COLUMNS = ("run_name", "status", "dataset", "variant", "ablation", "weights_real", "feature_model", "rank_rule",
           "seed", "note", "config", "off_preset", "metrics", "metrics_by_rule", "wall_time_s", "path", "run_dir",
           "linkable", "mtime_ns", "error")


@dataclass(frozen=True)
class RunKey:
    """What a run is for: a dataset, a variant and an ablation (a table cell, a run to analyse)."""

    dataset: str
    variant: str = "paper"
    ablation: str = "none"

    def __str__(self) -> str:
        return f"{self.dataset}/{self.variant}/{self.ablation}"


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class RunRecord:
    """One run folder as its ``metrics.json`` says (older files filled in, see :func:`read`)."""

    run_name: str
    run_dir: Path
    status: str  # completed | early_stopped | diverged | unreadable | unknown (| stale, see check_kb)
    dataset: str | None = None
    variant: str | None = None
    ablation: str = "none"
    config: dict = field(default_factory=dict)
    #: {setting: [its value, the preset's]} where it was not trained with its dataset's preset settings
    #: (:func:`dimkit.train.off_preset`); None for a run older than that record
    off_preset: dict | None = None
    metrics: dict = field(default_factory=dict)  # {"dev": {"dim": {...}, "kb": {...}}, "test": {...}}
    metrics_by_rule: dict = field(default_factory=dict)  # {"strict": <metrics>, "pessimistic": <metrics>}
    rank_rule: str | None = None
    best: dict = field(default_factory=dict)
    curve: dict = field(default_factory=lambda: {"train": [], "dev": []})
    feature_model: str | None = None
    weights_real: bool | None = None
    seed: int | None = None
    note: str = ""
    wall_time_s: float | None = None
    counts: dict = field(default_factory=dict)
    inputs_missing: dict = field(default_factory=dict)
    error: str = ""
    mtime_ns: int = 0

    @property
    def path(self) -> Path:
        """``<run_dir>/metrics.json``."""
        return self.run_dir / METRICS_FILE

    @property
    def finished(self) -> bool:
        """True for a completed or early-stopped run."""
        return self.status in FINISHED

    @property
    def linkable(self) -> bool:
        """True when the run finished and holds what :mod:`dimkit.link` loads."""
        return self.finished and all((self.run_dir / f).is_file() for f in LINK_FILES)

    @property
    def key(self) -> RunKey:
        """The run's dataset, variant and ablation."""
        return RunKey(str(self.dataset), str(self.variant), self.ablation)

    def metric(self, split: str, protocol: str, name: str, rule: str | None = None) -> float:
        """One number (a fraction, MR a rank) under the run's rank rule or ``rule``; NaN when missing."""
        return metric(self, split, protocol, name, rule)

    def require_finished(self) -> "RunRecord":
        """Self, or a DataError saying the run did not finish and how to finish it."""
        if not self.finished:
            why = f": {self.error}" if self.error else ""
            raise DataError(f"the run did not finish (status {self.status!r}{why}); train it with "
                            f"`dimkit train {self.dataset or 'DATASET'}` (run again, it continues an interrupted run)",
                            file=self.path)
        return self

    def row(self) -> dict:
        """The record as one :func:`collect` row, plus a column per ``"<split> <protocol> <metric>"``."""
        out = {c: getattr(self, c) for c in COLUMNS}
        out.update(path=str(self.path), run_dir=str(self.run_dir))
        for split, protos in self.metrics.items():
            for proto, values in _dict(protos).items():
                out.update({f"{split} {proto} {k}": v for k, v in _dict(values).items()})
        return out


def damaged_advice(dataset: str | None) -> str:
    """What to do about a run file that cannot be read."""
    return (f"the run's files are damaged: train it again with `dimkit train {dataset or 'DATASET'}` "
            "(same settings) or delete the run folder")


def _dataset_of(run_dir: Path) -> str | None:
    """The run's dataset as its ``features.json`` records it: advice when ``metrics.json`` is damaged."""
    try:
        return str(json.loads((run_dir / "features.json").read_text(encoding="utf-8"))["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _get(run: RunRecord | pd.Series | dict, key: str) -> Any:
    """A field of a run record or of a :func:`collect` row."""
    return getattr(run, key, None) if isinstance(run, RunRecord) else run.get(key)


def read(path: str | Path, *, fix: str | None = None) -> RunRecord:
    """One run's ``metrics.json`` (``path``: the file or its run folder) as a :class:`RunRecord`.

    Older files are read too (one rank rule, no ablation, the variant only in the config). A damaged
    file raises DataError saying ``fix`` (default: train again or delete the folder).
    """
    path = Path(path)
    if path.name != METRICS_FILE:
        path = path / METRICS_FILE
    run_dir = path.parent
    d = datasets.read_json_file(path, what=f"the run's {METRICS_FILE}", fix=fix or damaged_advice(_dataset_of(run_dir)))
    config = _dict(d.get("config"))
    metrics = _dict(d.get("metrics"))
    rank_rule = d.get("rank_rule") or config.get("rank_rule")
    by_rule = _dict(d.get("metrics_by_rule"))
    if not by_rule and metrics:  # written before both rank rules were kept
        by_rule = {rank_rule or "pessimistic": metrics}
    status = d.get("status")
    rec = RunRecord(
        run_name=str(d.get("run_name") or run_dir.name), run_dir=run_dir,
        status=status if isinstance(status, str) else "unknown",
        variant=d.get("variant") or config.get("variant"),
        ablation=d.get("ablation") or config.get("ablation") or "none", config=config,
        off_preset=d["off_preset"] if isinstance(d.get("off_preset"), dict) else None, metrics=metrics,
        metrics_by_rule=by_rule, rank_rule=rank_rule, best=_dict(d.get("best")),
        curve=_dict(d.get("curve")) or {"train": [], "dev": []}, feature_model=d.get("feature_model"),
        weights_real=d.get("weights_real"), seed=d.get("seed", config.get("seed")), note=str(d.get("note") or ""),
        wall_time_s=d.get("wall_time_s"), counts=_dict(d.get("counts")),
        inputs_missing=_dict(d.get("inputs_missing")), error=str(d.get("error") or ""),
        mtime_ns=path.stat().st_mtime_ns)
    ds = d.get("dataset") or config.get("dataset")
    if rec.finished:
        for name, value in (("variant", rec.variant), ("ablation", rec.ablation), ("dataset", ds)):
            if not isinstance(value, str):
                raise DataError("missing or not a string in a finished run", file=path, field=name)
        if not metrics:
            raise DataError("a finished run without metrics", file=path, field="metrics")
    if isinstance(ds, str):
        try:
            rec.dataset = datasets.canonical_name(ds)
        except DimkitError:  # a dataset name this kit does not know is still shown as written
            rec.dataset = ds
    return rec


def metric(run: RunRecord | pd.Series | dict, split: str, protocol: str, name: str, rule: str | None = None) -> float:
    """One number of a run (a record or a :func:`collect` row) under its own rank rule, or under
    ``rule``; NaN when the run lacks it."""
    m = _get(run, "metrics") if rule is None else _dict(_get(run, "metrics_by_rule")).get(rule)
    value = _dict(_dict(_dict(m).get(split)).get(protocol)).get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def resolve(model: Any) -> Path:
    """A run folder from a path, a run name under ``$DIMKIT_RUNS``, or anything with a ``run_dir``."""
    if model is None:
        raise ConfigError(f"name the trained run: {option('model=RUN_DIR', 'RUN_DIR')} (a folder under "
                          f"{paths.runs_dir()} or its name)")
    p = Path(getattr(model, "run_dir", model)).expanduser()
    if not p.exists() and not p.is_absolute() and len(p.parts) == 1:
        p = paths.runs_dir() / p
    if not p.is_dir():
        raise ConfigError(f"run folder not found: {p} (train one with `dimkit train DATASET`)")
    return p.resolve()


# ---------------------------------------------------------------------------------------------
# many runs


def collect(runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Every ``<runs_dir>/*/metrics.json`` (default ``$DIMKIT_RUNS``) as a :meth:`RunRecord.row`; an
    unreadable one is a row with status ``unreadable`` and the reason in ``error``, so one broken run
    never hides the others."""
    root = Path(runs_dir) if runs_dir is not None else paths.runs_dir()
    rows = []
    for p in sorted(root.glob(f"*/{METRICS_FILE}")):
        try:
            rows.append(read(p).row())
        except DataError as exc:
            rows.append(RunRecord(run_name=p.parent.name, run_dir=p.parent, status="unreadable", error=str(exc),
                                  mtime_ns=p.stat().st_mtime_ns).row())
    metric_columns = sorted({c for row in rows for c in row} - set(COLUMNS))
    return pd.DataFrame(rows, columns=[*COLUMNS, *metric_columns])


#: (entities.parquet, its inode, size, mtime, text column) -> its hashes: checking many runs reads it once.
_KB_HASHES: dict[tuple, tuple[dict[str, str], int]] = {}


def kb_fingerprint(dataset: str, data_dir: str | Path | None = None,
                   column: str = "description") -> tuple[dict[str, str], int, Path] | None:
    """What ``train`` records of a dataset's knowledge base (:func:`dimkit.datasets.kb_hashes`, in a
    run's ``features.json``), the number of entities and the file; None when the dataset is not
    prepared here or its entity table cannot be read."""
    try:
        path = datasets.dataset_dir(dataset, data_dir) / "entities.parquet"
        st = path.stat()
    except (DimkitError, OSError):
        return None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, column)
    if key not in _KB_HASHES:
        try:
            ents = pd.read_parquet(path)
            _KB_HASHES[key] = (datasets.kb_hashes(ents, column), len(ents))
        except Exception:  # a damaged table is reported by whatever loads the dataset
            return None
    return (*_KB_HASHES[key], path)


def kb_change(run: RunRecord | pd.Series | dict, data_dir: str | Path | None = None) -> DataError | None:
    """Why a finished run no longer fits its dataset: its entities, or their descriptions, changed since
    it was trained (the check :class:`dimkit.link.Linker` makes before linking), as the error that
    names the entity table; None when it fits, or when that cannot be told (an older run that does not
    record its knowledge base, a dataset not prepared here)."""
    run_dir = Path(_get(run, "run_dir"))
    try:
        f = json.loads((run_dir / FEATURES_FILE).read_text(encoding="utf-8"))
        dataset = f.get("dataset") or _get(run, "dataset")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    recorded = {k: f.get(k) for k in ("entity_qids_sha256", "entity_texts_sha256") if isinstance(f.get(k), str)}
    if not recorded or not isinstance(dataset, str):
        return None
    now = kb_fingerprint(dataset, data_dir, str(f.get("entity_column") or "description"))
    if now is None:
        return None
    hashes, n, path = now
    changed = [k for k, v in recorded.items() if hashes[k] != v]
    if not changed:
        return None
    then = f.get("entities")
    name = _get(run, "run_name")
    what = "knowledge base" if "entity_qids_sha256" in changed else "entity descriptions"
    return DataError(f"the {what} changed since run {name} was trained ({n} entities now"
                     + (f", {then} then" if isinstance(then, int) else "")
                     + f"): retrain it with `dimkit train {datasets.canonical_name(dataset)}` and the run's settings, "
                     "or delete the run folder", file=path,
                     field="qid" if "entity_qids_sha256" in changed else str(f.get("entity_column") or "description"))


def check_kb(runs: pd.DataFrame, data_dir: str | Path | None = None) -> pd.DataFrame:
    """``runs`` (from :func:`collect`) with every finished run whose dataset's knowledge base changed
    since it was trained marked ``stale``, the reason in ``error``: its numbers are not those of the
    dataset prepared now, so :func:`finished` and :func:`find` leave it out."""
    out = runs.copy()
    for i, row in out[out["status"].isin(FINISHED)].iterrows():
        change = kb_change(row, data_dir)
        if change is not None:
            out.at[i, "status"], out.at[i, "error"] = STALE, str(change)
    out.attrs["kb_checked"] = True
    return out


def left_out(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(run name, why) of every run of ``runs`` that looks like a result but cannot be used: a
    ``metrics.json`` that cannot be read, or a run ``stale`` after :func:`check_kb`."""
    bad = runs[runs["status"].isin(("unreadable", STALE))]
    return sorted(zip(bad["run_name"].astype(str), bad["error"].astype(str)))


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the rows of runs that finished (completed or early-stopped)."""
    return runs[runs["status"].isin(FINISHED)].reset_index(drop=True)


def matches(run: RunRecord | pd.Series | dict, filters: dict | None) -> bool:
    """True when each ``key: value`` of ``filters`` equals the run's setting (its config, else its field)."""
    config = _dict(_get(run, "config"))
    return all(config.get(k, _get(run, k)) == v for k, v in (filters or {}).items())


def _newest_first(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.sort_values(["mtime_ns", "run_name"], ascending=[False, False], kind="mergesort").reset_index(drop=True)


def find(dataset: str | None = None, variant: str | None = None, ablation: str | None = None, *,
         filters: dict | None = None, linkable: bool = False, runs: pd.DataFrame | None = None,
         runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The finished runs (of ``runs``, else of :func:`collect`) matching what is given, newest first;
    ``filters`` narrows by settings (``{"lr": 5e-5}``), ``linkable`` to runs :mod:`dimkit.link` can load."""
    df = finished(collect(runs_dir) if runs is None else runs)
    keep = pd.Series(True, index=df.index)
    for column, want in (("dataset", datasets.canonical_name(dataset) if dataset else None), ("variant", variant),
                         ("ablation", ablation)):
        if want is not None:
            keep &= df[column] == want
    if filters:
        keep &= pd.Series([matches(r, filters) for _, r in df.iterrows()], index=df.index, dtype=bool)
    if linkable:
        keep &= df["linkable"].fillna(False).astype(bool)
    return _newest_first(df[keep])


def choose(candidates: pd.DataFrame, pick: str = "latest", protocol: str = "dim") -> pd.Series | None:
    """The one run of ``candidates`` that ``pick`` takes; None when there is none.

    ``latest``: the newest ``metrics.json`` (equal times: the larger run name); ``best_dev``: the best
    dev H@1 under ``protocol`` (a run without it counts as -1; equal scores: the smaller run name).
    """
    if pick not in PICKS:
        raise ConfigError(f"{option(f'pick={pick!r}', f'--pick {pick}')} is not one of {', '.join(PICKS)}")
    if not len(candidates):
        return None
    if pick == "latest":
        return _newest_first(candidates).iloc[0]
    c = candidates.assign(_dev=[metric(r, "dev", protocol, "H@1") for _, r in candidates.iterrows()])
    c["_dev"] = c["_dev"].fillna(-1.0)
    return c.sort_values(["_dev", "run_name"], ascending=[False, True], kind="mergesort").iloc[0].drop("_dev")


def latest(dataset: str, variant: str = "paper", ablation: str = "none", *, linkable: bool = True,
           runs_dir: str | Path | None = None) -> Path | None:
    """The folder of the newest finished run of ``dataset``, ``variant`` and ``ablation`` (linkable
    ones only, unless ``linkable=False``), or None."""
    hit = choose(find(dataset, variant, ablation, linkable=linkable, runs_dir=runs_dir), "latest")
    return Path(hit["run_dir"]) if hit is not None else None


def overview(runs: pd.DataFrame) -> pd.DataFrame:
    """A short view of collected runs (one row each, newest first): names, status, test H@1."""
    return _newest_first(runs).reindex(columns=["run_name", "status", "dataset", "variant", "ablation", "weights_real",
                                                "feature_model", "test dim H@1", "test kb H@1", "linkable", "error"])


# ---------------------------------------------------------------------------------------------
# training the missing ones


def plan(names: Iterable[str], variants: Iterable[str] = ("paper",), ablations: Iterable[str] = ("none",)
         ) -> list[RunKey]:
    """Every (dataset, variant, ablation) asked for, each once; ``original_descriptions`` only for the
    '+' datasets, the only ones that hold original descriptions."""
    out: list[RunKey] = []
    for d, v, a in itertools.product(names, variants, ablations):
        key = RunKey(datasets.canonical_name(d), v, a)
        if key not in out and ("original_descriptions" not in a or datasets.is_augmented(key.dataset)):
            out.append(key)
    return out


@dataclass
class LaunchReport(Result):
    """What :func:`launch` trained, what it left alone (and why), what failed, and each key's run."""

    launched: list[str] = field(default_factory=list)  # run names trained now
    skipped: list[tuple[RunKey, str]] = field(default_factory=list)
    failed: list[tuple[RunKey, str]] = field(default_factory=list)
    run_dirs: dict[str, Path] = field(default_factory=dict)  # str(key) -> its finished run, now or before

    def run_dir(self, key: RunKey) -> Path | None:
        """The finished run folder of ``key`` (trained now or found), or None."""
        return self.run_dirs.get(str(key))

    def summary(self) -> str:
        """One count line, then a line per run trained, left alone or failed."""
        lines = [f"launched {len(self.launched)} run(s), skipped {len(self.skipped)}, failed {len(self.failed)}"]
        lines += [f"  ran     {n}" for n in self.launched]
        lines += [f"  skipped {k.dataset} {k.variant} {k.ablation}: {why}" for k, why in self.skipped]
        lines += [f"  FAILED  {k.dataset} {k.variant} {k.ablation}: {why}" for k, why in self.failed]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def launch(keys: Iterable[RunKey], *, reuse: str = "config", runs: pd.DataFrame | None = None,
           filters: dict | None = None, num_epochs: int | None = None, clip: str = "auto",
           device: str | None = None, overrides: dict | None = None, resume: bool = True,
           progress: bool = False, data_dir: str | Path | None = None) -> LaunchReport:
    """Train each of ``keys`` that has no finished run yet (see :data:`REUSE`), with its dataset's preset.

    ``runs``: what :func:`collect` returned (collected now when None); a run whose dataset's knowledge
    base changed since it was trained (:func:`check_kb`) counts as missing. Datasets not prepared are skipped;
    a run that fails is reported and the others still run; an interrupted one continues (``resume``).
    The other settings go to ``TrainConfig``.
    """
    if reuse not in REUSE:
        raise ConfigError(f"reuse={reuse!r} is not one of {', '.join(REUSE)}")
    keys = list(keys)
    report = LaunchReport()
    if not keys:
        return report
    from . import train  # torch-heavy: imported only when something may be trained

    # a run whose knowledge base changed since is trained again, as if missing
    done = finished(check_kb(collect() if runs is None else runs, data_dir))
    folders = done["run_dir"].map(lambda p: Path(p).name).astype(str)
    for k in keys:
        if reuse == "key":
            hit = choose(find(k.dataset, k.variant, k.ablation, filters=filters, runs=done), "latest")
            if hit is not None:
                report.skipped.append((k, "a finished run exists"))
                report.run_dirs[str(k)] = Path(hit["run_dir"])
                continue
        root = datasets.dataset_dir(k.dataset, data_dir)
        if not (root / "meta.json").exists() and k.dataset != "sample":  # the sample is prepared on first use
            report.skipped.append((k, f"dataset not prepared ({root / 'meta.json'} missing)"))
            continue
        try:
            cfg = train.TrainConfig.for_dataset(k.dataset, variant=k.variant, ablation=k.ablation, clip=clip,
                                                num_epochs=num_epochs, device=device, resume=resume,
                                                **(overrides or {}))
            if reuse == "config":  # the run of these settings; one trained with inputs missing has a suffix
                name = cfg.name()
                hit = choose(done[(folders == name) | folders.str.startswith(name + "-missing-")], "latest")
                if hit is not None:
                    report.skipped.append((k, f"{hit['run_name']} finished before with the same settings"))
                    report.run_dirs[str(k)] = Path(hit["run_dir"])
                    if progress:
                        print(f"   {hit['run_name']}: finished before, not trained again", flush=True)
                    continue
            result = train.run(cfg, progress=progress)
            report.launched.append(result.run_name)
            report.run_dirs[str(k)] = Path(result.run_dir)
        except Exception as exc:  # one bad run must not stop the others; it is reported
            report.failed.append((k, f"{type(exc).__name__}: {exc}"))
    return report


def ensure(dataset: str, variant: str = "paper", ablation: str = "none", *, run: str = "",
           quick_epochs: int = 5, progress: bool = False) -> Path:
    """``run`` if named, else the newest linkable run of the key, else a short one trained now
    (``quick_epochs`` epochs, resumed if it was interrupted)."""
    if run:
        return resolve(run)
    found = latest(dataset, variant, ablation)
    if found is not None:
        return found
    key = RunKey(datasets.canonical_name(dataset), variant, ablation)
    print(f"no finished {variant}/{ablation} run of {key.dataset} in {paths.runs_dir()}: training a quick one "
          f"({quick_epochs} epochs; notebook 03 trains the full schedule)", flush=True)
    report = launch([key], num_epochs=quick_epochs, resume=True, progress=progress)
    where = report.run_dir(key)
    if where is None:
        why = (report.failed or report.skipped)[0][1]
        raise DimkitError(f"no {key} run to use and none could be trained ({why}); train one with "
                          f"`dimkit train {key.dataset} --variant {variant} --ablation {ablation}`, or name one "
                          "with run=RUN_DIR")
    return where

