"""The paper's result tables, rebuilt from run folders (notebook ``04_tables``, ``dimkit tables``).

The runs come from :mod:`dimkit.runs`. The tables, as DataFrames, are those of the paper (original
datasets, enhanced ones, ablations), each under DIM's candidate protocol and, in a separate table,
the whole-KB protocol, plus one for the bundled sample whose caption says its numbers are not paper
numbers. Beside each dimkit number stand the value of ``dimkit/data/reference_results.csv`` (n/a where the
paper's number could not be obtained) and the difference. H@k and MRR are shown in percent, the
differences in percentage points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import pandas as pd

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .runs import (PICKS, STALE, LaunchReport, RunKey, check_kb, choose, collect, find, finished, launch, left_out,
                   matches, metric, plan)
from .stage import Config, Result, setting

#: Metrics shown per protocol (the released code's top-k; MIMIC-style whole-KB metrics).
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {"dim": ("H@1", "H@5", "H@10", "H@20"),
                                                "kb": ("H@1", "H@3", "H@5", "MRR")}
PROTOCOL_TITLES = {"dim": "DIM candidate protocol", "kb": "whole-KB protocol"}
PROTOCOL_CAPTIONS = {
    "dim": ("DIM candidate protocol: rank of the gold among its mention's candidate list plus the gold "
            "(gold guaranteed), cosine scores; H@k in %."),
    "kb": ("Whole-KB protocol (MIMIC and later): rank of the gold among all KB entities, cosine scores; "
           "H@k and MRR in %. Not comparable with candidate-protocol numbers."),
}
#: Every dimkit row is shown under both rank rules (strict = the released rule, ties favour the gold).
RULE_LABELS = {"strict": "strict (released)", "pessimistic": "pessimistic"}
TEXT_COLUMNS = ("dataset", "method", "rank rule", "run")

ORIGINAL = ("wikimel", "richpediamel", "wikidiverse")
ENHANCED = ("wikimel+", "richpediamel+", "wikidiverse+")
SAMPLES = ("sample", "sample+")
DISPLAY_NAMES = {
    "wikimel": "WikiMEL", "richpediamel": "RichpediaMEL", "wikidiverse": "WikiDiverse",
    "wikimel+": "Wiki+", "richpediamel+": "Rich+", "wikidiverse+": "Diverse+",
    "sample": "sample (synthetic)", "sample+": "sample+ (synthetic)",
}
#: Ablation rows in the order of the ablation table, with their labels.
ABLATION_LABELS = {
    "none": "DIM (full)",
    "no_cue": "w/o expert cue",
    "no_image": "w/o image",
    "no_attention": "w/o attention fusion",
    "original_descriptions": "original descriptions (no LLM)",
    "text_only": "text only",
}
VARIANT_LABELS = {"paper": "DIM (dimkit, paper variant)", "released": "DIM (dimkit, released code)"}

REFERENCE_FILE = paths.reference_file()
REFERENCE_COLUMNS = ("dataset", "protocol", "method", "ablation", "metric", "value", "source", "note")
#: What one reference value is for; two rows of the file may not share it.
REFERENCE_KEY = ["dataset", "protocol", "method", "ablation", "metric"]
NA = "n/a"
SAMPLE_WARNING = "Synthetic sample: these numbers are not paper numbers."


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """``dimkit/data/reference_results.csv`` checked: known columns, numeric values, a source for every value."""
    path = Path(path) if path is not None else REFERENCE_FILE
    if not path.exists():
        raise DataError("reference file not found", file=path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in REFERENCE_COLUMNS:
        if col not in df.columns:
            raise DataError("missing column", file=path, field=col)
    df = df[list(REFERENCE_COLUMNS)].apply(lambda column: column.str.strip())
    values = pd.Series(math.nan, index=df.index)  # an empty value (or n/a) is unknown
    for i, row in df.iterrows():
        where = {"file": path, "record": f"line {i + 2}"}  # the header is line 1
        try:
            df.at[i, "dataset"] = datasets.canonical_name(row["dataset"])
        except DimkitError:
            raise DataError(f"invalid dataset name {row['dataset']!r}", **where, field="dataset") from None
        if row["protocol"] not in PROTOCOL_METRICS:
            raise DataError(f"protocol {row['protocol']!r} is not one of {', '.join(PROTOCOL_METRICS)}", **where,
                            field="protocol")
        for name in ("method", "metric"):
            if not row[name]:
                raise DataError(f"empty {name}", **where, field=name)
        df.at[i, "ablation"] = row["ablation"] or "none"
        if row["value"].lower() in ("", NA):
            continue
        try:
            value = float(row["value"])
        except ValueError:
            raise DataError(f"value {row['value']!r} is not a number (leave it empty when unknown)", **where,
                            field="value") from None
        if not math.isfinite(value):
            raise DataError(f"value {row['value']!r} is not finite", **where, field="value")
        if not row["source"]:
            raise DataError("a reference value without a source: say where the number comes from", **where,
                            field="source")
        values.at[i] = value
    df["value"] = values
    dup = df[df.duplicated(REFERENCE_KEY, keep=False)]
    if len(dup):
        raise DataError(f"two rows for {dict(dup.iloc[0][REFERENCE_KEY])}", file=path,
                        record=f"line {dup.index[1] + 2}", field="metric")
    return df


# ---------------------------------------------------------------------------------------------
# table specs


@dataclass(frozen=True)
class RowSpec:
    """One row kind of a table: a dimkit run (variant + ablation) or a reference-only method."""

    label: str
    method: str = "DIM"  # the reference file's method this row is compared with
    variant: str | None = "paper"  # None: reference-only row (a published number, no dimkit run)
    ablation: str = "none"


@dataclass(frozen=True)
class TableSpec:
    """Which datasets, rows, protocol and split a table shows."""

    name: str
    title: str
    datasets: tuple[str, ...]
    protocol: str
    rows: tuple[RowSpec, ...]
    split: str = "test"
    reference_methods: bool = True  # add a row per other method the reference file has numbers for
    keep_empty_rows: bool = True  # False: drop rows with neither a run nor a reference value
    sample: bool = False  # the sample's table: always warns that its numbers are not paper numbers

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_METRICS:
            raise ConfigError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOL_METRICS)}")
        if self.split not in ("dev", "test"):
            raise ConfigError(f"split {self.split!r} is not dev or test")

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric columns of the protocol."""
        return PROTOCOL_METRICS[self.protocol]


def standard_tables(split: str = "test", include_sample: bool = True) -> list[TableSpec]:
    """The paper's tables (original, enhanced, ablations) under both protocols, plus the sample's."""
    main = tuple(RowSpec(label, variant=v) for v, label in VARIANT_LABELS.items())
    ablations = tuple(RowSpec(label, ablation=a) for a, label in ABLATION_LABELS.items())
    specs = []
    for proto, t in PROTOCOL_TITLES.items():
        specs += [
            TableSpec(f"original_{proto}", f"Results on the original datasets ({t})", ORIGINAL, proto, main, split),
            TableSpec(f"enhanced_{proto}", f"Results on the enhanced datasets ({t})", ENHANCED, proto, main, split),
            TableSpec(f"ablations_{proto}", f"Ablations on the enhanced datasets ({t})", ENHANCED, proto, ablations,
                      split, reference_methods=False),
        ]
        if include_sample:
            specs.append(TableSpec(f"sample_{proto}", f"The bundled synthetic sample ({t})", SAMPLES, proto,
                                   main + ablations[1:], split, reference_methods=False, keep_empty_rows=False,
                                   sample=True))
    return specs


# ---------------------------------------------------------------------------------------------
# building


@dataclass
class Table:
    """A built table: the numbers (``frame``), its caption, and which run fills each row."""

    spec: TableSpec
    frame: pd.DataFrame  # dataset, method, rank rule, then per metric: value, "<m> ref", "Δ <m>"; runs matched, run
    caption: str
    warnings: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # runs of its cells left out: the knowledge base changed since
    off_preset: list[str] = field(default_factory=list)  # cells filled by a run not trained with the preset

    @property
    def name(self) -> str:
        """File stem of the written table."""
        return self.spec.name

    def display(self, na: str = NA, digits: int = 2, runs: bool = True) -> pd.DataFrame:
        """Every cell as text: paper dataset names, rounded numbers (differences signed), ``na`` when
        missing; ``runs=False`` leaves out which run fills each row."""
        df = self.frame if runs else self.frame.drop(columns=["runs matched", "run"])
        df = df.assign(dataset=[DISPLAY_NAMES.get(d, d) for d in df["dataset"]])
        for c in df.columns:
            if c in TEXT_COLUMNS:
                df[c] = df[c].fillna(na).astype(str)
            elif c == "runs matched":
                df[c] = df[c].astype(str)
            else:
                sign = "+" if c.startswith("Δ ") else ""
                df[c] = [na if pd.isna(v) else f"{v:{sign}.{digits}f}" for v in df[c]]
        return df

    def to_markdown(self, digits: int = 2) -> str:
        """Title, caption and a pipe table (missing values as n/a)."""
        df = self.display(digits=digits)
        lines = [f"**{self.spec.title}** (`{self.name}`)", "", self.caption, ""]
        if not len(df):
            lines.append("_No finished run and no reference value for this table yet._")
        else:
            lines.append(_md_row(df.columns))
            lines.append("|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in df.columns) + "|")
            lines += [_md_row(row) for row in df.itertuples(index=False)]
        return "\n".join(lines) + "\n"

    def to_latex(self, digits: int = 2) -> str:
        """A booktabs ``table`` environment with the caption (the run column is left to the CSV)."""
        df = self.display(digits=digits, runs=False)
        align = "".join("l" if c in TEXT_COLUMNS else "r" for c in df.columns)
        out = ["\\begin{table}[t]", "\\centering", "\\small",
               f"\\caption{{{(self.spec.title + '. ' + self.caption).translate(_TEX)}}}",
               f"\\label{{tab:{self.name}}}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
               " & ".join(c.translate(_TEX) for c in df.columns) + " \\\\", "\\midrule"]
        if not len(df):
            out.append(f"\\multicolumn{{{len(df.columns)}}}{{c}}{{no finished run yet}} \\\\")
        rows = df.values.tolist()
        for i, row in enumerate(rows):
            if i and row[0] != rows[i - 1][0]:  # a rule between datasets
                out.append("\\midrule")
            out.append(" & ".join(str(v).translate(_TEX) for v in row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """Machine-readable: canonical dataset names, 4 decimals, n/a for missing values."""
        return self.frame.round(4).to_csv(index=False, na_rep=NA)

    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write ``<name>.csv``, ``.md`` and ``.tex`` (atomically) into ``folder`` (default figures/tables)."""
        folder = Path(folder) if folder is not None else tables_dir()
        return [atomic.write_text(text, folder / f"{self.name}.{ext}")
                for ext, text in (("csv", self.to_csv()), ("md", self.to_markdown()), ("tex", self.to_latex()))]


def tables_dir() -> Path:
    """Where tables are written: ``$DIMKIT_FIGURES/tables``."""
    return paths.figures_dir() / "tables"


def _md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_TEX = str.maketrans({"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                      "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
                      "Δ": "$\\Delta$", "−": "-"})


def _checked(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the runs whose dataset's knowledge base changed since marked stale (:func:`check_kb`),
    once."""
    return runs if runs.attrs.get("kb_checked") else check_kb(runs)


def preset_differences(run: pd.Series | dict) -> dict[str, list]:
    """``{setting: [the run's value, the preset's]}`` as the run's ``metrics.json`` records it
    (:func:`dimkit.train.off_preset`); empty for a preset run, and for an older run that does not say."""
    value = run.get("off_preset")
    return value if isinstance(value, dict) else {}


def _describe(differences: dict[str, list]) -> str:
    return ", ".join(f"{k}={mine!r} (preset {want!r})" for k, (mine, want) in sorted(differences.items()))


def build_table(table: TableSpec, runs: pd.DataFrame, reference: pd.DataFrame, *, pick: str = "latest",
                filters: dict | None = None) -> Table:
    """Fill one table from the collected runs and the reference values (missing -> NaN, shown n/a).

    Among the runs of a cell, those trained with their dataset's preset settings (:func:`preset_differences`)
    are preferred and ``pick`` chooses among them; only a cell without one is filled by another run, and
    the caption names that run and the settings that differ. A run trained before its dataset's
    knowledge base changed fills no cell; the caption names it."""
    if pick not in PICKS:
        raise ConfigError(f"pick={pick!r} is not one of {', '.join(PICKS)}")
    runs = _checked(runs)
    done = finished(runs)
    old = runs[runs["status"] == STALE]
    refs = {tuple(key): (value, source) for key, value, source in
            zip(reference[REFERENCE_KEY].values.tolist(), reference["value"], reference["source"])}
    rows: list[dict] = []
    used: list[pd.Series] = []
    stale: list[str] = []
    off_preset: list[str] = []
    multi = 0
    ref_sources: set[str] = set()
    for ds in table.datasets:
        row_specs = list(table.rows)
        if table.reference_methods:
            r = reference[(reference["dataset"] == ds) & (reference["protocol"] == table.protocol)
                          & (reference["method"] != "DIM") & reference["value"].notna()]
            row_specs += [RowSpec(f"{m} (published)", method=m, variant=None) for m in sorted(set(r["method"]))]
        for rs in row_specs:
            chosen, n_match = None, 0
            if rs.variant is not None:  # the runs of this cell that hold the table's numbers
                cand = find(ds, rs.variant, rs.ablation, filters=filters, runs=done)
                cand = cand.loc[[not math.isnan(metric(r, table.split, table.protocol, "H@1"))
                                 for _, r in cand.iterrows()]]
                n_match = len(cand)
                fits = [not preset_differences(r) for _, r in cand.iterrows()]
                chosen = choose(cand[fits] if any(fits) else cand, pick, table.protocol)
                if chosen is not None and not any(fits):
                    off_preset.append(f"{ds} / {rs.label}: {chosen['run_name']} "
                                      f"({_describe(preset_differences(chosen))})")
                stale += [n for n in find(ds, rs.variant, rs.ablation, filters=filters,
                                          runs=old.assign(status="completed"))["run_name"] if n not in stale]
            multi += n_match > 1
            if chosen is not None:
                used.append(chosen)
            # a run fills one row per rank rule, side by side; a published number is one row
            for rule in (RULE_LABELS if chosen is not None else [None]):
                row = {"dataset": ds, "method": rs.label, "rank rule": RULE_LABELS.get(rule, "")}
                for m in table.metrics:  # all H@k or MRR: in percent
                    v = 100 * metric(chosen, table.split, table.protocol, m, rule) if chosen is not None else math.nan
                    ref, source = refs.get((ds, table.protocol, rs.method, rs.ablation, m), (math.nan, ""))
                    if not math.isnan(ref):
                        ref_sources.add(f"{rs.method}: {source}")
                    row.update({m: v, f"{m} ref": ref, f"Δ {m}": v - ref})
                row.update({"runs matched": n_match, "run": chosen["run_name"] if chosen is not None else None})
                empty = all(math.isnan(row[c]) for m in table.metrics for c in (m, f"{m} ref"))
                if table.keep_empty_rows or not empty:
                    rows.append(row)
    numbers = [c for m in table.metrics for c in (m, f"{m} ref", f"Δ {m}")]
    frame = pd.DataFrame(rows, columns=["dataset", "method", "rank rule", *numbers, "runs matched", "run"])
    frame = frame.astype({**{c: float for c in numbers}, "runs matched": int})
    warnings = _warnings(table, used)
    caption = _caption(table, used, warnings, pick, multi, ref_sources, filters, sorted(stale), off_preset)
    return Table(frame=frame, spec=table, caption=caption, warnings=warnings, stale=sorted(stale),
                 off_preset=off_preset)


def _warnings(table: TableSpec, used: Sequence[pd.Series]) -> list[str]:
    out = []
    if table.sample or any(datasets.base_name(r["dataset"]) == "sample" for r in used):
        out.append(SAMPLE_WARNING)
    # pandas hands back numpy booleans; anything but a true value (missing included) warns
    fake = sorted({str(r["feature_model"]) for r in used if r["weights_real"] not in (True,)})
    if fake:
        out.append(f"Features from CLIP without real pretrained weights ({', '.join(fake)}): "
                   "not comparable to the paper.")
    if not out:  # the runs' own notes say what the warnings above say: shown only when nothing else warns
        notes = sorted({str(r["note"]) for r in used if r["note"]})
        out += [f"Run note: {n[0].upper()}{n[1:]}{'' if n.endswith('.') else '.'}" for n in notes]
    return out


def _caption(table: TableSpec, used: Sequence[pd.Series], warnings: list[str], pick: str, multi: int,
             ref_sources: set[str], filters: dict | None, stale: Sequence[str] = (),
             off_preset: Sequence[str] = ()) -> str:
    parts = [*warnings, PROTOCOL_CAPTIONS[table.protocol]]
    parts.append(f"dimkit: {table.split} split of the model selected on dev, one row per rank rule: "
                 "strict (released: ties and NaN favour the gold) and pessimistic (ties count against it).")
    if not used:
        parts.append("No finished dimkit run matched this table yet.")
    if stale:
        parts.append(f"Left out (trained before the knowledge base of the dataset changed; retrain to fill the "
                     f"cell): {', '.join(stale)}.")
    if off_preset:
        parts.append("Not trained with the dataset's preset settings (no run with them was found; the settings "
                     f"that differ): {'; '.join(off_preset)}.")
    rule = ("the latest finished run (newest metrics.json)" if pick == "latest"
            else f"the run with the best dev H@1 ({table.protocol} protocol)")
    rule += " among those trained with the dataset's preset settings (any run where none was)"
    if multi:
        parts.append(f"{multi} row(s) matched several runs: each shows {rule}; 'run' names it.")
    else:
        parts.append(f"Run choice when several match: {rule}.")
    if filters:
        parts.append("Runs restricted to " + ", ".join(f"{k}={v!r}" for k, v in sorted(filters.items())) + ".")
    parts.append("ref: dimkit/data/reference_results.csv"
                 + (f" ({'; '.join(sorted(ref_sources))})" if ref_sources else "")
                 + "; the DIM paper's own numbers are not filled in (fill them from the PDF). "
                 "Δ = dimkit − ref in percentage points; n/a = no run or no reference value.")
    return " ".join(parts)


def build_tables(specs: Iterable[TableSpec] | None = None, *, runs: pd.DataFrame | None = None,
                 runs_dir: str | Path | None = None, reference: pd.DataFrame | str | Path | None = None,
                 pick: str = "latest", filters: dict | None = None) -> dict[str, Table]:
    """Build every table of ``specs`` (default :func:`standard_tables`) from the runs folder."""
    specs = list(specs) if specs is not None else standard_tables()
    runs = _checked(collect(runs_dir) if runs is None else runs)
    if reference is None or isinstance(reference, (str, Path)):
        reference = load_reference(reference)
    return {s.name: build_table(s, runs, reference, pick=pick, filters=filters) for s in specs}


def write_tables(tables: dict[str, Table] | Iterable[Table], folder: str | Path | None = None,
                 left: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """Write every table as CSV, Markdown and LaTeX, plus ``index.md`` holding all Markdown tables and
    the runs ``left`` out of them (:func:`dimkit.runs.left_out`: name, why)."""
    tables = list(tables.values()) if isinstance(tables, dict) else list(tables)
    folder = Path(folder) if folder is not None else tables_dir()
    out = [p for t in tables for p in t.save(folder)]
    index = ["# dimkit result tables", "",
             "Rebuilt by `dimkit.tables` (notebook `04_tables`) from `runs/*/metrics.json` and "
             "`dimkit/data/reference_results.csv`.", ""]
    for t in tables:
        index += [t.to_markdown(), ""]
    if left:
        index += ["## Runs left out", "", *(f"- `{name}`: {why}" for name, why in left), ""]
    return out + [atomic.write_text("\n".join(index), folder / "index.md")]


def missing_runs(specs: Iterable[TableSpec], runs: pd.DataFrame, *, only: Iterable[str] | None = None,
                 filters: dict | None = None) -> list[RunKey]:
    """Cells of ``specs`` (restricted to datasets in ``only``) that no finished run fills (a run trained
    before its dataset's knowledge base changed fills none)."""
    only_set = {datasets.canonical_name(d) for d in only} if only is not None else None
    have = {RunKey(r["dataset"], r["variant"], r["ablation"]) for _, r in finished(_checked(runs)).iterrows()
            if matches(r, filters)}
    out: list[RunKey] = []
    for s in specs:
        for ds in s.datasets:
            if only_set is not None and ds not in only_set:
                continue
            for rs in s.rows:
                if rs.variant is not None:  # plan() knows which cells a dataset cannot have
                    out += [k for k in plan([ds], [rs.variant], [rs.ablation]) if k not in have and k not in out]
    return out


# ---------------------------------------------------------------------------------------------
# the stage: dimkit tables


@dataclass
class TablesConfig(Config):
    """Which tables to build and show, how a cell picks its run, and which missing runs to train first."""

    STAGE: ClassVar[str] = "tables"

    dataset: str = setting("sample", "dataset family shown first, and trained for with launch_missing (with its "
                                     "+ form): sample, wikimel, richpediamel, wikidiverse, or a prepared dataset "
                                     "of your own (it gets tables of its own)")
    split: str = setting("test", "the split shown (the model is always selected on dev)", choices=("test", "dev"))
    pick: str = setting("latest", "which run fills a cell when several match: latest or best_dev", choices=PICKS)
    launch_missing: bool = setting(False, "first train the runs the tables lack, for launch_datasets x variants x "
                                          "ablations")
    launch_datasets: list[str] = setting(help="datasets to train for (empty: dataset and its + form)", factory=list)
    variants: list[str] = setting(help=f"variants to train: {', '.join(VARIANT_LABELS)} (default: paper)",
                                  factory=lambda: ["paper"])
    ablations: list[str] = setting(help=f"ablations to train: {', '.join(ABLATION_LABELS)} (default: none)",
                                   factory=lambda: ["none"])
    num_epochs: int | None = setting(None, "epochs of the runs trained here (None: the dataset preset)", above=0,
                                     cli="--epochs")
    clip: str = setting("auto", "feature model of the runs trained here: auto (the sample CLIP on the sample, "
                                "ViT-B-32 elsewhere), default, ARCH:random")
    out: str | None = setting(None, "where the tables are written (default $DIMKIT_FIGURES/tables)")

    def check(self) -> None:
        """Canonical dataset names; known variants and ablations."""
        self.dataset = datasets.canonical_name(self.dataset)
        self.launch_datasets = [datasets.canonical_name(d) for d in self.launch_datasets]
        for name, given, known in (("variants", self.variants, VARIANT_LABELS),
                                   ("ablations", self.ablations, ABLATION_LABELS)):
            bad = [v for v in given if v not in known]
            if bad or not given:
                raise ConfigError(f"{option(name, '--' + name)}: {bad[0] if bad else 'none given'!r} is not "
                                  f"one of {', '.join(known)}")

    @property
    def launch_names(self) -> list[str]:
        """The datasets runs are trained for: ``launch_datasets``, else the family and its + form."""
        family = datasets.base_name(self.dataset)
        return list(self.launch_datasets) or [family, family + "+"]

    @property
    def is_sample(self) -> bool:
        """True for the bundled synthetic sample (its numbers are not paper numbers)."""
        return datasets.base_name(self.dataset) == "sample"

    @property
    def own(self) -> bool:
        """True for a dataset of the user's own (not a paper dataset nor the sample): it gets its own table."""
        return datasets.base_name(self.dataset) not in ORIGINAL + SAMPLES

    def specs(self) -> list[TableSpec]:
        """Every table of :func:`standard_tables` for the chosen split, plus one for the user's own dataset."""
        specs = standard_tables(split=self.split)
        if self.own:
            family = datasets.base_name(self.dataset)
            main = tuple(RowSpec(label, variant=v) for v, label in VARIANT_LABELS.items())
            ablations = tuple(RowSpec(label, ablation=a) for a, label in ABLATION_LABELS.items())
            specs += [TableSpec(f"{family}_{proto}", f"Results on {family} and {family}+ ({t})", (family, family + "+"),
                                proto, main + ablations[1:], self.split, reference_methods=False,
                                keep_empty_rows=False)
                      for proto, t in PROTOCOL_TITLES.items()]
        return specs

    def shown(self) -> list[str]:
        """The tables of the dataset family: the sample's, the user's own, or the original, enhanced and
        ablation ones."""
        if self.is_sample:
            return ["sample_dim", "sample_kb"]
        if self.own:
            return [f"{datasets.base_name(self.dataset)}_{p}" for p in PROTOCOL_METRICS]
        return [f"{t}_{p}" for p in PROTOCOL_METRICS for t in ("original", "enhanced", "ablations")]

    def plan(self) -> list[RunKey]:
        """The runs ``launch_missing`` trains when a table lacks them."""
        return plan(self.launch_names, self.variants, self.ablations)


@dataclass
class TablesResult(Result):
    """What ``dimkit tables`` built: the tables, the files, the cells still without a run."""

    config: TablesConfig
    tables: dict[str, Table]
    files: list[Path]
    missing: list[RunKey]
    runs_used: int
    launch: LaunchReport | None = None
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (run name, why): runs no cell may use
    notes: list[str] = field(default_factory=list)  # what the family's tables lack and why (see run)

    @property
    def off_preset(self) -> list[str]:
        """The cells of the family's tables filled by a run not trained with its dataset's preset
        settings (each once): the run and the settings that differ."""
        out: list[str] = []
        for n in self.config.shown():
            out += [c for c in (self.tables[n].off_preset if n in self.tables else []) if c not in out]
        return out

    def summary(self) -> str:
        """The launch report if any, the family's tables as Markdown, the cells filled by a run with
        other settings than the preset, the runs left out (and why), and what was written."""
        lines = [self.launch.summary(), ""] if self.launch is not None else []
        lines += [self.tables[n].to_markdown() for n in self.config.shown() if n in self.tables]
        if self.off_preset:
            lines.append(f"{len(self.off_preset)} cell(s) filled by a run not trained with the dataset's preset "
                         "settings (none with them was found):")
            lines += [f"  {c}" for c in self.off_preset]
        if self.left_out:
            lines.append(f"{len(self.left_out)} run(s) left out of the tables:")
            lines += [f"  {name}: {why}" for name, why in self.left_out]
        lines += self.notes
        lines.append(f"{len(self.missing)} cell(s) of {', '.join(self.config.launch_names)} without a finished run"
                     + ("" if self.config.launch_missing or not self.missing
                        else f" ({option('launch_missing=True', '--launch-missing')} trains them)"))
        lines.append(f"built {len(self.tables)} tables from {self.runs_used} finished run(s) "
                     f"(run choice {self.config.pick!r}, {self.config.split} split); wrote {len(self.files)} files to "
                     f"{self.files[0].parent if self.files else '(nowhere)'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Settings, files, the cells without a run, the runs left out, the launch report and each
        table's caption."""
        return {"config": self.config.to_dict(), "files": [str(p) for p in self.files],
                "missing": [str(k) for k in self.missing], "runs_used": self.runs_used,
                "left_out": {name: why for name, why in self.left_out}, "off_preset": self.off_preset,
                "notes": self.notes,
                "launch": self.launch.to_dict() if self.launch is not None else None,
                "tables": {n: {"title": t.spec.title, "caption": t.caption, "rows": len(t.frame),
                               "off_preset": t.off_preset}
                           for n, t in self.tables.items()}}

    @property
    def exit_code(self) -> int:
        return self.launch.exit_code if self.launch is not None else 0


def run(cfg: TablesConfig) -> TablesResult:
    """Collect the runs, train the missing ones if asked, then build and write every table.

    A run that cannot be used -- its ``metrics.json`` unreadable, or trained before its dataset's
    knowledge base changed -- fills no cell and is named, with what to do, in the summary and in
    ``index.md``."""
    found = check_kb(collect())
    report = None
    if cfg.launch_missing:
        report = launch(cfg.plan(), reuse="key", runs=found, num_epochs=cfg.num_epochs, clip=cfg.clip)
        found = check_kb(collect())
    specs = cfg.specs()
    built = build_tables(specs, runs=found, pick=cfg.pick)
    left = left_out(found)
    files = write_tables(built, cfg.out, left)
    return TablesResult(config=cfg, tables=built, files=files, runs_used=len(finished(found)),
                        missing=missing_runs(specs, found, only=cfg.launch_names), launch=report, left_out=left,
                        notes=_no_run_notes(cfg, found))


def _no_run_notes(cfg: TablesConfig, runs: pd.DataFrame) -> list[str]:
    """For a dataset of one's own without any run: that none was found, and whether (and how) each
    dataset of the family is prepared here -- its tables are otherwise written empty without a word."""
    if not cfg.own:
        return []
    names = [datasets.base_name(cfg.dataset), datasets.base_name(cfg.dataset) + "+"]
    if runs["dataset"].isin(names).any():
        return []
    lines = [f"No run of {'/'.join(names)} was found in {paths.runs_dir()}: its tables are empty."]
    for name in names:
        root = datasets.dataset_dir(name)
        if (root / "meta.json").exists():
            lines.append(f"  {name} is prepared ({root}); train it with `dimkit train {name}`.")
        else:
            lines.append(f"  {name} is not prepared here ({root / 'meta.json'} missing). "
                         f"{datasets.how_to_prepare(name)}.")
    return lines


#: The command line: ``dimkit tables`` takes the flags of :class:`TablesConfig` and runs :func:`run`.
CONFIG = TablesConfig

