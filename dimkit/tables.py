"""The paper's result tables, rebuilt from run folders (notebook ``04_tables``).

Every training run leaves ``runs/<run-name>/metrics.json`` (:mod:`dimkit.train`); this module reads
those files directly (plain JSON, no torch) and builds, as pandas DataFrames:

1. results on the original datasets (WikiMEL, RichpediaMEL, WikiDiverse),
2. results on the enhanced ones (Wiki+, Rich+, Diverse+),
3. the ablations (no cue, no image, no attention, original vs LLM descriptions, text only),

each under DIM's candidate protocol (H@1/5/10/20) and, in a separate table, under the whole-KB
protocol (H@1/3/5/MRR) -- the two are never mixed in one column. The bundled sample gets
a table too, so ``make demo`` shows one; its caption says sample numbers are not paper numbers.

Beside each dimkit number stand the reference value from ``data/reference_results.csv`` and the
difference. The DIM paper's own numbers could not be obtained when the kit was written, so those
cells of the file are empty and show as ``n/a`` until a user fills them from the PDF; the file
carries a ``source`` for every number it does hold.

Choosing a run for a cell: among the finished runs (status ``completed`` or ``early_stopped``) of
the cell's dataset, variant and ablation -- optionally narrowed by ``filters`` on config keys --
``pick="latest"`` takes the most recently written ``metrics.json`` (ties: the larger run name),
``pick="best_dev"`` the best dev H@1 under the table's protocol (ties: the smaller run name). The
table says which rule it used, how many runs matched each row and which run it took.

Percent everywhere in the tables: H@k and MRR are multiplied by 100, MR stays a rank; the
difference is in percentage points.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from . import atomic, datasets, paths
from .errors import ConfigError, DataError

#: Metrics shown per protocol (the released code's top-k; MIMIC-style whole-KB metrics).
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "dim": ("H@1", "H@5", "H@10", "H@20"),
    "kb": ("H@1", "H@3", "H@5", "MRR"),
}
PROTOCOL_TITLES = {
    "dim": "DIM candidate protocol",
    "kb": "whole-KB protocol",
}
PROTOCOL_CAPTIONS = {
    "dim": ("DIM candidate protocol: rank of the gold among its mention's candidate list plus the gold "
            "(gold guaranteed), cosine scores; H@k in %."),
    "kb": ("Whole-KB protocol (MIMIC and later): rank of the gold among all KB entities, cosine scores; "
           "H@k and MRR in %. Not comparable with candidate-protocol numbers."),
}
FINISHED = ("completed", "early_stopped")
#: Every dimkit row is shown under both rank rules (strict = the released rule, ties favour the gold).
TABLE_RULES = ("strict", "pessimistic")
RULE_LABELS = {"strict": "strict (released)", "pessimistic": "pessimistic"}
TEXT_COLUMNS = ("dataset", "method", "rank rule", "run")
PICKS = ("latest", "best_dev")

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
NA = "n/a"
SAMPLE_WARNING = "Synthetic sample: these numbers are not paper numbers."


# ---------------------------------------------------------------------------------------------
# runs


def _is_percent(metric: str) -> bool:
    return metric.startswith("H@") or metric == "MRR"


def _as_float(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_metrics(path: str | Path) -> dict:
    """One ``metrics.json`` as a flat record (name, status, dataset, variant, ablation, metrics ...)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable metrics file ({exc})", file=path) from None
    if not isinstance(d, dict):
        raise DataError("expected a JSON object", file=path)
    status = d.get("status")
    rec = {
        "run_name": d.get("run_name") or path.parent.name,
        "status": status if isinstance(status, str) else "unknown",
        "dataset": None, "variant": d.get("variant"), "ablation": d.get("ablation") or "none",
        "weights_real": d.get("weights_real"), "feature_model": d.get("feature_model"),
        "rank_rule": d.get("rank_rule"), "seed": d.get("seed"), "note": d.get("note") or "",
        "config": d.get("config") if isinstance(d.get("config"), dict) else {},
        "metrics": d.get("metrics") if isinstance(d.get("metrics"), dict) else {},
        "metrics_by_rule": d.get("metrics_by_rule") if isinstance(d.get("metrics_by_rule"), dict) else {},
        "wall_time_s": d.get("wall_time_s"), "path": str(path),
        "mtime_ns": path.stat().st_mtime_ns, "error": d.get("error") or "",
    }
    if not rec["metrics_by_rule"] and rec["metrics"]:  # written before both rules were kept
        rec["metrics_by_rule"] = {rec["rank_rule"] or "pessimistic": rec["metrics"]}
    ds = d.get("dataset") or rec["config"].get("dataset")
    if rec["status"] in FINISHED:
        for key in ("variant", "ablation"):
            if not isinstance(rec[key], str):
                raise DataError("missing or non-string value in a finished run", file=path, field=key)
        if not isinstance(ds, str):
            raise DataError("missing dataset name in a finished run", file=path, field="dataset")
        if not rec["metrics"]:
            raise DataError("a finished run without metrics", file=path, field="metrics")
    if isinstance(ds, str):
        try:
            rec["dataset"] = datasets.canonical_name(ds)
        except Exception:
            rec["dataset"] = ds
    return rec


def collect_runs(runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Every ``<runs_dir>/*/metrics.json`` as one row (unreadable files become rows with status 'unreadable').

    Columns: run_name, status, dataset, variant, ablation, weights_real, feature_model, rank_rule,
    seed, note, config (dict), metrics (dict), wall_time_s, path, mtime_ns, error, plus one column
    per ``"<split> <protocol> <metric>"`` (fractions, as in the file).
    """
    root = Path(runs_dir) if runs_dir is not None else paths.runs_dir()
    rows = []
    for p in sorted(root.glob("*/metrics.json")):
        try:
            rec = read_metrics(p)
        except DataError as exc:
            # One broken file must not hide every other run; it is listed with its reason.
            rec = {"run_name": p.parent.name, "status": "unreadable", "path": str(p), "error": str(exc),
                   "metrics": {}, "metrics_by_rule": {}, "config": {}, "mtime_ns": p.stat().st_mtime_ns}
        for split, protos in (rec.get("metrics") or {}).items():
            if not isinstance(protos, dict):
                continue
            for proto, ms in protos.items():
                if isinstance(ms, dict):
                    for k, v in ms.items():
                        rec[f"{split} {proto} {k}"] = v
        rows.append(rec)
    base = ["run_name", "status", "dataset", "variant", "ablation", "weights_real", "feature_model",
            "rank_rule", "seed", "note", "config", "metrics", "metrics_by_rule", "wall_time_s", "path",
            "mtime_ns", "error"]
    df = pd.DataFrame(rows)
    for c in base:
        if c not in df.columns:
            df[c] = pd.Series([None] * len(df), dtype=object)
    extra = sorted(c for c in df.columns if c not in base)
    return df[base + extra].reset_index(drop=True)


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the runs that finished (completed or early-stopped)."""
    return runs[runs["status"].isin(FINISHED)].reset_index(drop=True)


def _metric(rec: dict | pd.Series, split: str, protocol: str, metric: str, rule: str | None = None) -> float:
    """One number of a run: under its own rank rule, or under ``rule`` (NaN when the run lacks it)."""
    if rule is None:
        m = rec["metrics"] if isinstance(rec["metrics"], dict) else {}
    else:
        by_rule = rec.get("metrics_by_rule") if isinstance(rec.get("metrics_by_rule"), dict) else {}
        m = by_rule.get(rule) or {}
    return _as_float(((m.get(split) or {}).get(protocol) or {}).get(metric))


def pick_run(candidates: pd.DataFrame, pick: str, protocol: str) -> pd.Series | None:
    """The one run a table cell shows, by ``pick`` ('latest' or 'best_dev'); None when there is none."""
    if pick not in PICKS:
        raise ConfigError(f"pick={pick!r} is not one of {', '.join(PICKS)}")
    if not len(candidates):
        return None
    c = candidates.copy()
    if pick == "latest":
        c = c.sort_values(["mtime_ns", "run_name"], ascending=[False, False], kind="mergesort")
    else:
        c["_dev"] = [_metric(r, "dev", protocol, "H@1") for _, r in c.iterrows()]
        c["_dev"] = c["_dev"].fillna(-1.0)
        c = c.sort_values(["_dev", "run_name"], ascending=[False, True], kind="mergesort")
    return c.iloc[0]


def _matches_filters(rec: pd.Series, filters: dict | None) -> bool:
    for k, v in (filters or {}).items():
        cfg = rec["config"] if isinstance(rec["config"], dict) else {}
        have = cfg.get(k, rec.get(k) if k in rec.index else None)
        if have != v:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# reference values


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """``data/reference_results.csv`` checked: known columns, numeric values, a source for every value."""
    path = Path(path) if path is not None else REFERENCE_FILE
    if not path.exists():
        raise DataError("reference file not found", file=path)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in REFERENCE_COLUMNS:
        if col not in df.columns:
            raise DataError("missing column", file=path, field=col)
    df = df[list(REFERENCE_COLUMNS)].copy()
    for c in REFERENCE_COLUMNS:
        df[c] = df[c].str.strip()
    values = []
    for i, row in df.iterrows():
        rec = i + 2  # the CSV line (header is line 1)
        try:
            ds = datasets.canonical_name(row["dataset"])
        except Exception:
            raise DataError(f"invalid dataset name {row['dataset']!r}", file=path, record=f"line {rec}",
                            field="dataset") from None
        df.at[i, "dataset"] = ds
        if row["protocol"] not in PROTOCOL_METRICS:
            raise DataError(f"protocol {row['protocol']!r} is not one of {', '.join(PROTOCOL_METRICS)}",
                            file=path, record=f"line {rec}", field="protocol")
        if not row["method"]:
            raise DataError("empty method", file=path, record=f"line {rec}", field="method")
        if not row["metric"]:
            raise DataError("empty metric", file=path, record=f"line {rec}", field="metric")
        df.at[i, "ablation"] = row["ablation"] or "none"
        text = row["value"]
        if text == "" or text.lower() == NA:
            values.append(math.nan)
            continue
        try:
            v = float(text)
        except ValueError:
            raise DataError(f"value {text!r} is not a number (leave it empty when unknown)", file=path,
                            record=f"line {rec}", field="value") from None
        if not math.isfinite(v):
            raise DataError(f"value {text!r} is not finite", file=path, record=f"line {rec}", field="value")
        if not row["source"]:
            raise DataError("a reference value without a source: say where the number comes from",
                            file=path, record=f"line {rec}", field="source")
        values.append(v)
    df["value"] = pd.Series(values, index=df.index, dtype=float)
    key = ["dataset", "protocol", "method", "ablation", "metric"]
    dup = df[df.duplicated(key, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise DataError(f"two rows for {dict(first[key])}", file=path, record=f"line {dup.index[1] + 2}",
                        field="metric")
    return df.reset_index(drop=True)


def reference_value(reference: pd.DataFrame, dataset: str, protocol: str, method: str, ablation: str,
                    metric: str) -> tuple[float, str]:
    """(value, source) of one reference cell; (nan, '') when the file has no such row."""
    r = reference[(reference["dataset"] == dataset) & (reference["protocol"] == protocol)
                  & (reference["method"] == method) & (reference["ablation"] == ablation)
                  & (reference["metric"] == metric)]
    if not len(r):
        return math.nan, ""
    return float(r.iloc[0]["value"]), str(r.iloc[0]["source"])


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


def _main_rows() -> tuple[RowSpec, ...]:
    return tuple(RowSpec(VARIANT_LABELS[v], variant=v) for v in ("paper", "released"))


def _ablation_rows() -> tuple[RowSpec, ...]:
    return tuple(RowSpec(label, variant="paper", ablation=a) for a, label in ABLATION_LABELS.items())


def standard_tables(split: str = "test", include_sample: bool = True) -> list[TableSpec]:
    """The paper's tables (original, enhanced, ablations) under both protocols, plus the sample's."""
    specs = []
    for proto in PROTOCOL_METRICS:
        t = PROTOCOL_TITLES[proto]
        specs += [
            TableSpec(f"original_{proto}", f"Results on the original datasets ({t})", ORIGINAL, proto,
                      _main_rows(), split),
            TableSpec(f"enhanced_{proto}", f"Results on the enhanced datasets ({t})", ENHANCED, proto,
                      _main_rows(), split),
            TableSpec(f"ablations_{proto}", f"Ablations on the enhanced datasets ({t})", ENHANCED, proto,
                      _ablation_rows(), split, reference_methods=False),
        ]
        if include_sample:
            specs.append(TableSpec(f"sample_{proto}", f"The bundled synthetic sample ({t})", SAMPLES, proto,
                                   _main_rows() + _ablation_rows()[1:], split, reference_methods=False,
                                   keep_empty_rows=False, sample=True))
    return specs


# ---------------------------------------------------------------------------------------------
# building


@dataclass
class Table:
    """A built table: the numbers (``frame``), its caption, and which run fills each row."""

    spec: TableSpec
    frame: pd.DataFrame  # dataset, method, then per metric: value, "<m> ref", "Δ <m>"; then runs matched, run
    caption: str
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """File stem of the written table."""
        return self.spec.name

    def display(self, na: str = NA, digits: int = 2) -> pd.DataFrame:
        """The frame with paper dataset names, rounded numbers and ``n/a`` for missing values."""
        return _formatted(self.frame, self.spec, na, digits, keep_runs=True)

    def to_markdown(self, digits: int = 2) -> str:
        """Title, caption and a pipe table (missing values as n/a)."""
        df = self.display(digits=digits)
        lines = [f"**{self.spec.title}** (`{self.name}`)", "", self.caption, ""]
        if not len(df):
            lines.append("_No finished run and no reference value for this table yet._")
            return "\n".join(lines) + "\n"
        lines.append("| " + " | ".join(_md_escape(c) for c in df.columns) + " |")
        lines.append("|" + "|".join("---" if c in TEXT_COLUMNS else "---:"
                                    for c in df.columns) + "|")
        for _, row in df.iterrows():
            lines.append("| " + " | ".join(_md_escape(str(v)) for v in row.tolist()) + " |")
        return "\n".join(lines) + "\n"

    def to_latex(self, digits: int = 2) -> str:
        """A booktabs ``table`` environment with the caption (the run column is left to the CSV)."""
        df = _formatted(self.frame, self.spec, "n/a", digits, keep_runs=False)
        cols = list(df.columns)
        align = "".join("l" if c in TEXT_COLUMNS else "r" for c in cols)
        out = ["\\begin{table}[t]", "\\centering", "\\small",
               f"\\caption{{{_tex_escape(self.spec.title + '. ' + self.caption)}}}",
               f"\\label{{tab:{self.name}}}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
               " & ".join(_tex_escape(c) for c in cols) + " \\\\", "\\midrule"]
        if not len(df):
            out.append(f"\\multicolumn{{{len(cols)}}}{{c}}{{no finished run yet}} \\\\")
        prev = None
        for _, row in df.iterrows():
            if prev is not None and row["dataset"] != prev:
                out.append("\\midrule")
            prev = row["dataset"]
            out.append(" & ".join(_tex_escape(str(v)) for v in row.tolist()) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """Machine-readable: canonical dataset names, 4 decimals, n/a for missing values."""
        return self.frame.round(4).to_csv(index=False, na_rep=NA)

    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write ``<name>.csv``, ``.md`` and ``.tex`` (atomically) into ``folder`` (default figures/tables)."""
        folder = Path(folder) if folder is not None else tables_dir()
        out = []
        for ext, text in (("csv", self.to_csv()), ("md", self.to_markdown()), ("tex", self.to_latex())):
            p = folder / f"{self.name}.{ext}"
            atomic.write_text(text, p)
            out.append(p)
        return out


def tables_dir() -> Path:
    """Where tables are written: ``$DIMKIT_FIGURES/tables``."""
    return paths.figures_dir() / "tables"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


_TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
        "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "Δ": "$\\Delta$",
        "−": "-"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def _formatted(frame: pd.DataFrame, table: TableSpec, na: str, digits: int, keep_runs: bool) -> pd.DataFrame:
    df = frame.copy()
    if not keep_runs:
        df = df.drop(columns=[c for c in ("runs matched", "run") if c in df.columns])
    df["dataset"] = [DISPLAY_NAMES.get(d, d) for d in df["dataset"]]
    for c in df.columns:
        if c in TEXT_COLUMNS:
            df[c] = df[c].fillna(na).astype(str)
        elif c == "runs matched":
            df[c] = [str(int(v)) for v in df[c]]
        else:
            delta = c.startswith("Δ ")
            df[c] = [na if (v is None or (isinstance(v, float) and math.isnan(v)))
                     else (f"{v:+.{digits}f}" if delta else f"{v:.{digits}f}") for v in df[c]]
    return df


def build_table(table: TableSpec, runs: pd.DataFrame, reference: pd.DataFrame, *, pick: str = "latest",
                filters: dict | None = None) -> Table:
    """Fill one table from the collected runs and the reference values (missing -> NaN, shown n/a)."""
    if pick not in PICKS:
        raise ConfigError(f"pick={pick!r} is not one of {', '.join(PICKS)}")
    done = finished(runs) if len(runs) else runs
    metrics = table.metrics
    rows: list[dict] = []
    used: list[pd.Series] = []
    multi = 0
    ref_sources: set[str] = set()
    for ds in table.datasets:
        row_specs = list(table.rows)
        if table.reference_methods and len(reference):
            r = reference[(reference["dataset"] == ds) & (reference["protocol"] == table.protocol)
                          & (reference["method"] != "DIM") & reference["value"].notna()]
            for method in sorted(set(r["method"])):
                row_specs.append(RowSpec(f"{method} (published)", method=method, variant=None))
        for rs in row_specs:
            base_row: dict[str, Any] = {"dataset": ds, "method": rs.label}
            chosen = None
            n_match = 0
            if rs.variant is not None and len(done):
                cand = done[(done["dataset"] == ds) & (done["variant"] == rs.variant)
                            & (done["ablation"] == rs.ablation)]
                keep = pd.Series([_matches_filters(r, filters) and not math.isnan(
                    _metric(r, table.split, table.protocol, "H@1")) for _, r in cand.iterrows()],
                    index=cand.index, dtype=bool)
                cand = cand.loc[keep]
                n_match = len(cand)
                chosen = pick_run(cand, pick, table.protocol)
            if n_match > 1:
                multi += 1
            if chosen is not None:
                used.append(chosen)
            # a run fills one row per rank rule, side by side; a published number is one row
            for rule in (TABLE_RULES if chosen is not None else (None,)):
                row = dict(base_row, **{"rank rule": RULE_LABELS.get(rule, "")})
                for m in metrics:
                    v = _metric(chosen, table.split, table.protocol, m, rule) if chosen is not None else math.nan
                    if _is_percent(m) and not math.isnan(v):
                        v = 100.0 * v
                    ref, src = reference_value(reference, ds, table.protocol, rs.method, rs.ablation, m) \
                        if len(reference) else (math.nan, "")
                    if not math.isnan(ref):
                        ref_sources.add(f"{rs.method}: {src}")
                    row[m] = v
                    row[f"{m} ref"] = ref
                    row[f"Δ {m}"] = v - ref if not (math.isnan(v) or math.isnan(ref)) else math.nan
                row["runs matched"] = n_match
                row["run"] = chosen["run_name"] if chosen is not None else None
                has_any = any(not math.isnan(row[c]) for m in metrics for c in (m, f"{m} ref"))
                if table.keep_empty_rows or has_any:
                    rows.append(row)
    cols = (["dataset", "method", "rank rule"] + [c for m in metrics for c in (m, f"{m} ref", f"Δ {m}")]
            + ["runs matched", "run"])
    frame = pd.DataFrame(rows, columns=cols)
    for c in cols[3:-2]:
        frame[c] = frame[c].astype(float)
    frame["runs matched"] = frame["runs matched"].astype(int)
    warnings = _warnings(table, used)
    caption = _caption(table, used, warnings, pick, multi, ref_sources, filters)
    return Table(frame=frame, spec=table, caption=caption, warnings=warnings)


def _warnings(table: TableSpec, used: Sequence[pd.Series]) -> list[str]:
    out = []
    on_sample = table.sample or any(datasets.base_name(r["dataset"]) == "sample" for r in used)
    if on_sample:
        out.append(SAMPLE_WARNING)
    # pandas hands back numpy booleans; anything but a true value (missing included) warns
    fake = sorted({str(r["feature_model"]) for r in used if r["weights_real"] not in (True,)})
    if fake:
        out.append(f"Features from CLIP without real pretrained weights ({', '.join(fake)}): "
                   "not comparable to the paper.")
    # The runs' own notes say the same as the two warnings above; shown only when nothing else warns.
    notes = sorted({str(r["note"]) for r in used if r["note"]}) if not out else []
    for n in notes:
        sentence = n[0].upper() + n[1:] + ("" if n.endswith(".") else ".")
        if sentence not in out:
            out.append(f"Run note: {sentence}")
    return out


def _caption(table: TableSpec, used: Sequence[pd.Series], warnings: list[str], pick: str, multi: int,
             ref_sources: set[str], filters: dict | None) -> str:
    parts = list(warnings)
    parts.append(PROTOCOL_CAPTIONS[table.protocol])
    parts.append(f"dimkit: {table.split} split of the model selected on dev, one row per rank rule: "
                 "strict (released: ties and NaN favour the gold) and pessimistic (ties count against it).")
    if not used:
        parts.append("No finished dimkit run matched this table yet.")
    rule = ("the latest finished run (newest metrics.json)" if pick == "latest"
            else f"the run with the best dev H@1 ({table.protocol} protocol)")
    if multi:
        parts.append(f"{multi} row(s) matched several runs: each shows {rule}; 'run' names it.")
    else:
        parts.append(f"Run choice when several match: {rule}.")
    if filters:
        parts.append("Runs restricted to " + ", ".join(f"{k}={v!r}" for k, v in sorted(filters.items())) + ".")
    parts.append("ref: data/reference_results.csv"
                 + (f" ({'; '.join(sorted(ref_sources))})" if ref_sources else "")
                 + "; the DIM paper's own numbers are not filled in (fill them from the PDF). "
                 "Δ = dimkit − ref in percentage points; n/a = no run or no reference value.")
    return " ".join(parts)


def build_tables(specs: Iterable[TableSpec] | None = None, *, runs: pd.DataFrame | None = None,
                 runs_dir: str | Path | None = None, reference: pd.DataFrame | str | Path | None = None,
                 pick: str = "latest", filters: dict | None = None) -> dict[str, Table]:
    """Build every table of ``specs`` (default :func:`standard_tables`) from the runs folder."""
    specs = list(specs) if specs is not None else standard_tables()
    if runs is None:
        runs = collect_runs(runs_dir)
    if reference is None or isinstance(reference, (str, Path)):
        reference = load_reference(reference)
    return {s.name: build_table(s, runs, reference, pick=pick, filters=filters) for s in specs}


def write_tables(tables: dict[str, Table] | Iterable[Table], folder: str | Path | None = None) -> list[Path]:
    """Write every table as CSV, Markdown and LaTeX, plus ``index.md`` holding all Markdown tables."""
    tables = list(tables.values()) if isinstance(tables, dict) else list(tables)
    folder = Path(folder) if folder is not None else tables_dir()
    out = []
    for t in tables:
        out += t.save(folder)
    index = ["# dimkit result tables", "",
             "Rebuilt by `dimkit.tables` (notebook `04_tables`) from `runs/*/metrics.json` and "
             "`data/reference_results.csv`.", ""]
    for t in tables:
        index += [t.to_markdown(), ""]
    p = folder / "index.md"
    atomic.write_text("\n".join(index), p)
    out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# missing runs


@dataclass(frozen=True)
class RunKey:
    """What identifies a table cell's run: dataset, variant, ablation."""

    dataset: str
    variant: str
    ablation: str = "none"


def missing_runs(specs: Iterable[TableSpec], runs: pd.DataFrame, *, only: Iterable[str] | None = None,
                 filters: dict | None = None) -> list[RunKey]:
    """Cells of ``specs`` (restricted to datasets in ``only``) that no finished run fills."""
    only_set = {datasets.canonical_name(d) for d in only} if only is not None else None
    done = finished(runs) if len(runs) else runs
    have = set()
    for _, r in done.iterrows():
        if _matches_filters(r, filters):
            have.add(RunKey(r["dataset"], r["variant"], r["ablation"]))
    out: list[RunKey] = []
    for s in specs:
        for ds in s.datasets:
            if only_set is not None and ds not in only_set:
                continue
            for rs in s.rows:
                if rs.variant is None:
                    continue
                if "original_descriptions" in rs.ablation and not datasets.is_augmented(ds):
                    continue  # only '+' datasets keep original descriptions to ablate to
                k = RunKey(ds, rs.variant, rs.ablation)
                if k not in have and k not in out:
                    out.append(k)
    return out


def plan_runs(names: Iterable[str], variants: Iterable[str] = ("paper",),
              ablations: Iterable[str] = ("none",)) -> list[RunKey]:
    """Every (dataset, variant, ablation) combination asked for, names canonicalised.

    ``original_descriptions`` is kept only for '+' datasets: only they hold the original descriptions.
    """
    out = []
    for d in names:
        name = datasets.canonical_name(d)
        for v in variants:
            for a in ablations:
                if "original_descriptions" in a and not datasets.is_augmented(name):
                    continue
                k = RunKey(name, v, a)
                if k not in out:
                    out.append(k)
    return out


@dataclass
class LaunchReport:
    """What :func:`launch_missing` ran, skipped (and why) and what failed."""

    launched: list[str] = field(default_factory=list)  # run names
    skipped: list[tuple[RunKey, str]] = field(default_factory=list)
    failed: list[tuple[RunKey, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"launched {len(self.launched)} run(s), skipped {len(self.skipped)}, failed {len(self.failed)}"]
        lines += [f"  ran     {n}" for n in self.launched]
        lines += [f"  skipped {k.dataset} {k.variant} {k.ablation}: {why}" for k, why in self.skipped]
        lines += [f"  FAILED  {k.dataset} {k.variant} {k.ablation}: {why}" for k, why in self.failed]
        return "\n".join(lines)


def launch_missing(keys: Iterable[RunKey], runs: pd.DataFrame | None = None, *, num_epochs: int | None = None,
                   clip: str = "auto", device: str | None = None, overrides: dict | None = None,
                   data_dir: str | Path | None = None) -> LaunchReport:
    """Train each ``key`` that has no finished run (datasets not prepared are skipped and named).

    Runs go through :func:`dimkit.train.run` with the dataset's preset (``clip="auto"``: the sample
    CLIP on the sample, DIM's ViT-B-32 elsewhere); a failing run is recorded and the others still run.
    """
    from . import train  # torch-heavy: only when something is launched

    runs = collect_runs() if runs is None else runs
    done = finished(runs) if len(runs) else runs
    have = {RunKey(r["dataset"], r["variant"], r["ablation"]) for _, r in done.iterrows()}
    report = LaunchReport()
    for k in keys:
        if k in have:
            report.skipped.append((k, "a finished run exists"))
            continue
        root = datasets.dataset_dir(k.dataset, data_dir)
        if not (root / "meta.json").exists() and k.dataset != "sample":
            report.skipped.append((k, f"dataset not prepared ({root / 'meta.json'} missing)"))
            continue
        try:
            cfg = train.TrainConfig.for_dataset(k.dataset, variant=k.variant, ablation=k.ablation, num_epochs=num_epochs,
                                   clip=clip, device=device, **(overrides or {}))
            result = train.run(cfg)
            report.launched.append(result.run_name)
        except Exception as exc:  # one bad cell must not stop the others; it is reported
            report.failed.append((k, f"{type(exc).__name__}: {exc}"))
    return report


def runs_overview(runs: pd.DataFrame) -> pd.DataFrame:
    """A short view of the collected runs (one row each, newest first) for the notebook."""
    if not len(runs):
        return pd.DataFrame(columns=["run_name", "status", "dataset", "variant", "ablation", "weights_real",
                                     "test dim H@1", "test kb H@1"])
    cols = [c for c in ("run_name", "status", "dataset", "variant", "ablation", "weights_real", "feature_model",
                        "test dim H@1", "test kb H@1", "error") if c in runs.columns]
    return runs.sort_values(["mtime_ns", "run_name"], ascending=False)[cols].reset_index(drop=True)


__all__ = [
    "PROTOCOL_METRICS", "ORIGINAL", "ENHANCED", "SAMPLES", "RowSpec", "TableSpec", "Table", "RunKey",
    "LaunchReport", "read_metrics", "collect_runs", "finished", "pick_run", "load_reference",
    "reference_value", "standard_tables", "build_table", "build_tables", "write_tables", "tables_dir",
    "missing_runs", "plan_runs", "launch_missing", "runs_overview",
]
