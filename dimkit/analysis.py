"""Where a trained run fails, and why (notebook ``06_errors``).

:func:`analyse` re-scores every mention of a split with the run's own model and stored features
(through :class:`dimkit.link.Linker`, so no model is loaded when the features are stored) and gives
each failure one error kind; :func:`compare` sets two runs (e.g. ``paper`` and its ``text_only``
ablation) side by side on the mentions where their predictions differ. The runs are found by
:mod:`dimkit.runs`. :func:`run` does both for an :class:`AnalysisConfig` and writes the tables
(``dimkit errors sample+``).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from . import cues, datasets, runs
from .errors import ConfigError, DimkitError
from .images import load_dataset_image
from .link import Linker
from .stage import Config, Result, setting
from .tables import ABLATION_LABELS, VARIANT_LABELS  # the names, without the model (torch)

#: Error kinds, in the order they are assigned (the first that applies): the fuzzy candidate list
#: (DIM's search_top100) missed the gold, so candidate generation failed, not the model (DIM's
#: protocol still adds the gold back); the image could not be used, so only text and no cue
#: remained; the prediction shares the gold's name, so the ambiguity the image and the cue are meant
#: to resolve was not resolved; anything else.
ERROR_KINDS = ("gold not in candidates", "image unusable", "name-alike entity chosen", "other")
PROTOCOLS = ("dim", "kb")


# ---------------------------------------------------------------------------------------------
# Settings (notebook 06's parameters)


@dataclass
class AnalysisConfig(Config):
    """Which run to analyse, which run to set beside it (both found by :func:`dimkit.runs.ensure`), and on
    what split and protocol."""

    STAGE: ClassVar[str] = "analysis"

    dataset: str = setting("sample+", "a prepared dataset with trained runs (sample+, wiki+, rich+, diverse+, ...)",
                           positional=True)
    run: str = setting("", "run folder or name under $DIMKIT_RUNS (empty: the newest run of the variant)")
    variant: str = setting("paper", "which run to take when run is empty: paper or released",
                           choices=tuple(VARIANT_LABELS))
    compare_run: str = setting("", "the run set beside it (empty: the newest compare_ablation run of the variant)")
    compare_ablation: str = setting("text_only", "the ablation set beside the full run (none: no comparison, "
                                                 "unless compare_run is named)",
                                    choices=list(ABLATION_LABELS))
    split: str = setting("test", "the split analysed", choices=("test", "dev"))
    protocol: str = setting("dim", "dim (the gold among its candidate list) or kb (the gold among the whole KB)",
                            choices=PROTOCOLS)
    n_worst: int = setting(8, "failures and disagreements shown (all of them are in the files written)", min=1)
    quick_epochs: int = setting(5, "epochs of a run trained here because none exists yet", min=1)
    save: bool = setting(True, "write the per-mention table, the error kinds and the disagreements (CSV) and a "
                               "summary (JSON)")
    folder: Path | None = setting(None, "where (default: <run folder>/errors/<split>-<protocol>)")

    def check(self) -> None:
        """The dataset's canonical name."""
        self.dataset = datasets.canonical_name(self.dataset)

    def main_run(self, progress: bool = False) -> Path:
        """The run analysed: ``run``, else the newest full run of ``variant``, else a quick one trained now."""
        return runs.ensure(self.dataset, self.variant, "none", run=self.run, quick_epochs=self.quick_epochs,
                           progress=progress)

    def other_run(self, progress: bool = False) -> Path | None:
        """The run set beside it: ``compare_run``, else the newest ``compare_ablation`` run (or a quick one);
        None when ``compare_ablation`` is ``none`` and no ``compare_run`` is named."""
        if not self.compare_run and self.compare_ablation == "none":
            return None
        return runs.ensure(self.dataset, self.variant, self.compare_ablation, run=self.compare_run,
                           quick_epochs=self.quick_epochs, progress=progress)


def example_mention(linker: Any, split: str = "test") -> pd.Series:
    """A mention of ``split`` with a usable image that the run ranked first (KB protocol), for demos;
    the first mention with an image and a gold if the run ranked none first."""
    ds = linker.dataset
    m = ds.split(split).dropna(subset=["image", "qid"])
    if "image_status" in m.columns:
        m = m[m["image_status"] == "ok"]
    if not len(m):
        raise DimkitError(f"{ds.name} has no {split} mention with a usable image and a gold entity")
    pred = pd.read_parquet(linker.run_dir / "predictions.parquet")
    first = set(pred.loc[(pred["split"] == split) & (pred.get("rank_kb", pd.Series(0, index=pred.index)) == 1),
                         "mention_id"])
    hit = m[m["mention_id"].isin(first)]
    return (hit if len(hit) else m).iloc[0]


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class Analysis:
    """A run's per-mention outcome on one split (``table``), under one protocol."""

    run_name: str
    variant: str
    ablation: str
    dataset: str
    split: str
    protocol: str
    rank_rule: str
    table: pd.DataFrame
    attention_keys: list[str] = field(default_factory=list)
    note: str = ""
    linker: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``paper`` or ``paper (text_only)``."""
        return self.variant + ("" if self.ablation == "none" else f" ({self.ablation})")

    @property
    def failures(self) -> pd.DataFrame:
        """Mentions whose gold is not ranked first."""
        return self.table[~self.table["correct"]]

    def worst(self, n: int = 8) -> pd.DataFrame:
        """The ``n`` most confident failures: largest margin of the prediction over the gold."""
        return self.failures.sort_values("margin", ascending=False, kind="stable").head(n)

    def __str__(self) -> str:
        t = self.table
        return (f"{self.run_name} ({self.label}) on {self.dataset} {self.split}, {self.protocol} protocol: "
                f"{int(t['correct'].sum())} of {len(t)} mentions right (H@1 {t['correct'].mean():.3f}), "
                f"{len(self.failures)} failures" + (f"\nnote: {self.note}" if self.note else ""))


def _expert(linker) -> tuple[str, Any]:
    """The run's cue expert as a stage setting and an object: its recorded spec, else the expert the
    linker was given (``auto`` + the object), else none."""
    if linker.info.cue_expert_spec:
        return linker.info.cue_expert_spec, None
    if linker.expert is not None:
        return "auto", linker.expert
    return "none", None


def _dataset_features(linker, progress: bool):
    """The run dataset's FeatureSet from the stores, with the run's CLIP, precision and expert."""
    from . import features  # here, not at the top: analyse() takes a FeatureSet named features

    info = linker.info
    spec, obj = _expert(linker)
    cfg = features.FeaturesConfig.for_dataset(
        linker.dataset.name, clip=info.clip_spec, expert=spec, precision=info.precision,
        missing_description=info.missing_description, write_report=False).replace(shard=None)
    fs = features.run(cfg, dataset=linker.dataset, expert=obj, progress=progress).features
    if fs.model_id != info.feature_model:
        raise DimkitError(f"the dataset's features are of {fs.model_id}, the run's of {info.feature_model}")
    return fs


def analyse(run: Any, split: str = "test", protocol: str = "dim", *, linker: Any = None, features: Any = None,
            progress: bool = False, chunk: int = 512) -> Analysis:
    """Score every mention of ``split`` with the run and classify its failures (:data:`ERROR_KINDS`)."""
    import torch

    from .evaluate import candidate_matrix, gold_rank

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    linker = linker or Linker(run, lazy=True)
    info, cfg, ds = linker.info, linker.config, linker.dataset
    fs = features if features is not None else _dataset_features(linker, progress)
    m = ds.mentions.reset_index(drop=True)
    if list(fs.mention_ids) != m["mention_id"].astype(str).tolist():
        raise DimkitError(f"the features do not follow {ds.name}'s mentions: recompute them (dimkit features)")
    rows = np.flatnonzero(((m["split"] == split) & m["qid"].notna()).to_numpy())
    if not len(rows):
        raise DimkitError(f"{ds.name} has no {split} mention with a gold entity")
    mids = m["mention_id"].to_numpy()[rows]
    gold = np.array([linker.entity_index.get(q, -1) for q in m["qid"].to_numpy()[rows]])
    if (gold < 0).any():
        raise DimkitError(f"{int((gold < 0).sum())} gold entities of {split} are not in the run's KB")
    if protocol == "dim" and ds.candidates is None:
        raise ConfigError(f"the dim protocol needs {ds.name}'s candidate lists (dimkit candidates {ds.name})")
    cand = candidate_matrix(ds.candidates, mids.tolist(), gold, linker.entity_index, cfg.candidate_limit,
                            source=str(ds.root / "candidates.parquet")) if protocol == "dim" else None

    pred, rank, gscore, pscore, attn = [], [], [], [], []
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        feats = {k: np.asarray(getattr(fs, k))[r] if getattr(fs, k) is not None
                 else np.zeros((len(r), fs.dim), np.float32) for k in ("mention", "mention_sentence", "image", "cue")}
        feats["image_ok"] = np.asarray(fs.image_ok)[r]
        feats["cue_ok"] = np.asarray(fs.cue_ok)[r] if fs.cue_ok is not None else np.zeros(len(r), bool)
        q, w = linker.query(feats, attention=True)
        s = linker.scores(q).cpu()                                              # [n, E]
        g = torch.as_tensor(gold[a:a + chunk])
        if protocol == "kb":
            rank.append(gold_rank(s, g, cfg.rank_rule).numpy())
            best = s.nan_to_num(nan=-2.0).argmax(1)
        else:
            c = torch.as_tensor(cand[a:a + chunk])
            valid = c >= 0
            sc = torch.gather(s, 1, c.clamp_min(0)).masked_fill(~valid, float("-inf"))   # [n, C]
            rank.append(gold_rank(sc, torch.zeros(len(r), dtype=torch.long), cfg.rank_rule, valid).numpy())
            best = torch.gather(c, 1, sc.nan_to_num(nan=-2.0).argmax(1, keepdim=True))[:, 0]
        pred.append(best.numpy())
        gscore.append(s[torch.arange(len(r)), g].numpy())
        pscore.append(s[torch.arange(len(r)), best].numpy())
        if w is not None:
            attn.append(w)
    pred_i = np.concatenate(pred)
    gold_q, pred_q = linker.qids[gold], linker.qids[pred_i]

    spec, obj = _expert(linker)
    ccfg = cues.CuesConfig.for_dataset(ds.name, expert=spec, write_report=False).replace(shard=None)
    cue_table = cues.run(ccfg, dataset=ds, expert=obj, progress=progress).table.set_index("mention_id")
    sub = m.iloc[rows]
    image_ok = np.asarray(fs.image_ok)[rows]
    lists = dict(zip(ds.candidates["mention_id"], ds.candidates["qids"])) if ds.candidates is not None else {}
    norm = np.vectorize(lambda x: " ".join(str(x).lower().split()))
    gold_name, pred_name = linker.names[gold], linker.names[pred_i]
    table = pd.DataFrame({
        "mention_id": mids, "mention": sub["mention"].to_numpy(), "sentence": sub["sentence"].to_numpy(),
        "image": [x if isinstance(x, str) else None for x in sub["image"].tolist()],
        "image_ok": image_ok,
        "image_status": [s if isinstance(s, str) else ("ok" if ok else "unusable")
                         for s, ok in zip(sub.get("image_status", [None] * len(sub)), image_ok)],
        "cue": [cue_table["cue"].get(mid) for mid in mids],
        "cue_status": [cue_table["cue_status"].get(mid) for mid in mids],
        "gold_qid": gold_q, "gold_name": gold_name, "gold_description": linker.descriptions[gold],
        "pred_qid": pred_q, "pred_name": pred_name, "pred_description": linker.descriptions[pred_i],
        "rank": np.concatenate(rank).astype(int), "gold_score": np.concatenate(gscore),
        "pred_score": np.concatenate(pscore),
    })
    table["margin"] = table["pred_score"] - table["gold_score"]
    table["correct"] = table["rank"] == 1
    table["gold_in_candidates"] = pd.array([q in list(lists[mid])[:cfg.candidate_limit] if mid in lists else None
                                            for mid, q in zip(mids, gold_q)], dtype="boolean")
    table["name_alike"] = (norm(gold_name) == norm(pred_name)) & (gold_q != pred_q)
    keys = list(linker.model.key_names) if attn else []
    for j, k in enumerate(keys):
        table[f"attention {k}"] = np.concatenate(attn)[:, j]
    missed = table["gold_in_candidates"].eq(False).fillna(False).to_numpy(bool)
    table["error_kind"] = np.select([table["correct"], missed, ~table["image_ok"], table["name_alike"]],
                                    ["correct", *ERROR_KINDS[:3]], ERROR_KINDS[3])
    return Analysis(run_name=info.run_name, variant=info.variant, ablation=info.ablation, dataset=ds.name,
                    split=split, protocol=protocol, rank_rule=cfg.rank_rule, table=table, attention_keys=keys,
                    note=linker.note, linker=linker)


def agreement_with_training(a: Analysis) -> float:
    """Share of mentions whose rank here equals the one ``dimkit.train`` wrote to predictions.parquet."""
    p = a.linker.run_dir / "predictions.parquet"
    pred = pd.read_parquet(p)
    col = f"rank_{a.protocol}"
    if col not in pred.columns:
        raise DimkitError(f"{p} has no {col} column (the run did not evaluate the {a.protocol} protocol)")
    merged = a.table[["mention_id", "rank"]].merge(pred[pred["split"] == a.split][["mention_id", col]], on="mention_id")
    return float((merged["rank"] == merged[col]).mean()) if len(merged) else float("nan")


def confusion_summary(a: Analysis) -> pd.DataFrame:
    """Failures by error kind: count, share of failures and of the split, and how often each flag occurs.

    ``error kind`` counts each failure once (the first kind that applies); ``flag set`` counts every
    failure showing that condition, so overlaps (a name-alike choice on an unusable image) are visible.
    """
    f = a.failures
    n_f, n = max(len(f), 1), max(len(a.table), 1)
    flags = {ERROR_KINDS[0]: (f["gold_in_candidates"] == False).sum(),  # noqa: E712 (nullable boolean)
             ERROR_KINDS[1]: (~f["image_ok"]).sum(), ERROR_KINDS[2]: f["name_alike"].sum(), ERROR_KINDS[3]: None}
    rows = []
    for kind in ERROR_KINDS:
        c = int((f["error_kind"] == kind).sum())
        rows.append({"error kind": kind, "failures": c, "% of failures": round(100 * c / n_f, 1),
                     "% of mentions": round(100 * c / n, 1),
                     "flag set": int(flags[kind]) if flags[kind] is not None else pd.NA})
    rows.append({"error kind": "all failures", "failures": len(f), "% of failures": 100.0 if len(f) else 0.0,
                 "% of mentions": round(100 * len(f) / n, 1), "flag set": pd.NA})
    out = pd.DataFrame(rows).astype({"flag set": "Int64"})
    out.attrs["note"] = a.note
    return out


def _short(text: Any, width: int) -> str:
    return textwrap.shorten(str(text), width, placeholder="...") if isinstance(text, str) and text else "(none)"


def _cue_text(cue: Any, status: Any) -> str:
    return cue if isinstance(cue, str) and cue else f"(none: {status})"


def _attention_text(row: pd.Series, keys: list[str]) -> str:
    return " ".join(f"{'sentence' if k == 'mention_sentence' else k} {row[f'attention {k}']:.2f}" for k in keys)


def _after_name(description: Any, name: str) -> str:
    """A description without its leading "<name> is" (the caption already names the entity)."""
    if not isinstance(description, str) or not description:
        return "(no description)"
    d = description.strip()
    for lead in (f"{name} is ", f"{name} was ", f"{name} "):
        if d.startswith(lead):
            return "..." + d[len(lead) - 1:]
    return d


def _image_grid(ds: Any, images: list, captions: list[str], title: str, note: str, *, ncols: int, wrap: int):
    """The mentions' images with their captions, under a title that carries the run's note."""
    from . import plots  # matplotlib: only when a figure is drawn

    pil = [load_dataset_image(ds, x).image if x else None for x in images]
    if note:
        title += "\n" + _short(note, 160)
    return plots.image_grid(pil, captions, ncols=ncols, width=3.4, wrap=wrap, title=title)


def failure_table(a: Analysis, n: int = 8) -> pd.DataFrame:
    """The worst failures as a readable table: mention, sentence, gold and predicted entity with descriptions,
    the cue, the attention over modalities (``paper``) and the error kind."""
    w = a.worst(n)
    out = pd.DataFrame({
        "mention": w["mention"], "sentence": w["sentence"],
        "gold": w["gold_name"] + " (" + w["gold_qid"] + ")", "gold description": w["gold_description"],
        "predicted": w["pred_name"] + " (" + w["pred_qid"] + ")", "predicted description": w["pred_description"],
        "gold rank": w["rank"], "margin": w["margin"].round(3),
        "cue": [_cue_text(c, s) for c, s in zip(w["cue"], w["cue_status"])],
        "image": w["image_status"], "error kind": w["error_kind"]})
    if a.attention_keys:
        out.insert(len(out.columns) - 1, "attention", [_attention_text(r, a.attention_keys) for _, r in w.iterrows()])
    return out.reset_index(drop=True)


def show_failures(a: Analysis, n: int = 8, *, ncols: int = 4):
    """The worst failures as image + caption (mention, gold and prediction with descriptions, cue,
    attention, error kind); returns the figure. The full texts are in :func:`failure_table`."""
    w = a.worst(n)
    captions = []
    for _, r in w.iterrows():
        lines = [_short(line, 52) for line in (
            f"[{r['mention']}] {r['sentence']}", f"gold: {r['gold_name']} ({r['gold_qid']}), rank {r['rank']}",
            f"  {_after_name(r['gold_description'], r['gold_name'])}", f"pred: {r['pred_name']} ({r['pred_qid']})",
            f"  {_after_name(r['pred_description'], r['pred_name'])}", f"cue: {_cue_text(r['cue'], r['cue_status'])}")]
        if a.attention_keys:
            lines.append("attention: " + _attention_text(r, a.attention_keys))
        lines.append(f"{r['error_kind']} | margin {r['margin']:.3f}")
        captions.append("\n".join(lines))
    return _image_grid(a.linker.dataset, list(w["image"]), captions,
                       f"{a.run_name}: worst {a.split} failures ({a.protocol} protocol)", a.note, ncols=ncols,
                       wrap=56)


# ---------------------------------------------------------------------------------------------
# Two runs


@dataclass
class Comparison:
    """Two runs on the same mentions: where their predictions differ."""

    a: Analysis
    b: Analysis
    table: pd.DataFrame  # one row per mention where the predictions differ

    @property
    def labels(self) -> tuple[str, str]:
        """The two runs' names in the table (:func:`_labels`)."""
        return _labels(self.a, self.b)

    def summary(self) -> pd.DataFrame:
        """Counts: both right, only A right, only B right, both wrong (same / different entity)."""
        t = self.a.table.merge(self.b.table, on="mention_id", suffixes=("_a", "_b"))
        ca, cb = t["correct_a"], t["correct_b"]
        same = t["pred_qid_a"] == t["pred_qid_b"]
        la, lb = self.labels
        rows = [("both right", ca & cb), (f"only {la} right", ca & ~cb),
                (f"only {lb} right", ~ca & cb), ("both wrong, same entity", ~ca & ~cb & same),
                ("both wrong, different entities", ~ca & ~cb & ~same)]
        return pd.DataFrame([{"outcome": k, "mentions": int(v.sum())} for k, v in rows])

    def __str__(self) -> str:
        return (f"{self.labels[0]} vs {self.labels[1]} on {self.a.dataset} {self.a.split}: predictions differ on "
                f"{len(self.table)} of {len(self.a.table)} mentions")


def _labels(a: Analysis, b: Analysis) -> tuple[str, str]:
    """Two runs' labels (``paper``, ``paper (text_only)``), or their run names when the labels are the
    same (two seeds of one variant)."""
    return (a.label, b.label) if a.label != b.label else (a.run_name, b.run_name)


def compare(a: Analysis, b: Analysis) -> Comparison:
    """The mentions where runs ``a`` and ``b`` predict different entities, side by side."""
    if (a.dataset, a.split, a.protocol) != (b.dataset, b.split, b.protocol):
        raise ConfigError(f"compare runs on the same dataset, split and protocol: {a.dataset}/{a.split}/{a.protocol} "
                          f"vs {b.dataset}/{b.split}/{b.protocol}")
    if a.run_name == b.run_name:
        raise ConfigError(f"run {a.run_name} compared with itself: name another run to set beside it")
    la, lb = _labels(a, b)
    t = a.table.merge(b.table[["mention_id", "pred_qid", "pred_name", "pred_description", "rank", "correct"]],
                      on="mention_id", suffixes=("", "_b"))
    diff = t[t["pred_qid"] != t["pred_qid_b"]]
    out = pd.DataFrame({
        "mention_id": diff["mention_id"], "mention": diff["mention"], "sentence": diff["sentence"],
        "image": diff["image"], "image_status": diff["image_status"], "cue": diff["cue"],
        "gold": diff["gold_name"] + " (" + diff["gold_qid"] + ")",
        la: diff["pred_name"] + " (" + diff["pred_qid"] + ")", f"{la} right": diff["correct"],
        lb: diff["pred_name_b"] + " (" + diff["pred_qid_b"] + ")", f"{lb} right": diff["correct_b"],
        "gold description": diff["gold_description"],
    })
    # Where exactly one run is right first: that is what the extra inputs bought (or cost).
    both_alike = (out[f"{la} right"] == out[f"{lb} right"]).to_numpy()
    return Comparison(a=a, b=b, table=out.iloc[np.argsort(both_alike, kind="stable")].reset_index(drop=True))


def show_comparison(c: Comparison, n: int = 8, *, ncols: int = 4):
    """Disagreements as image + caption: gold, each run's prediction (right or wrong), cue; a figure."""
    t = c.table.head(n)
    captions = []
    for _, r in t.iterrows():
        lines = [f"[{r['mention']}] {r['sentence']}", f"gold: {r['gold']}"]
        for x, label in zip((c.a, c.b), c.labels):
            # the ablation's name, or the variant of a full run; the run name when that is the label
            tag = (x.variant if x.ablation == "none" else x.ablation) if label == x.label else label
            lines.append(f"{tag}: [{'right' if r[label + ' right'] else 'wrong'}] {r[label]}")
        lines.append(f"cue: {r['cue']}" if isinstance(r["cue"], str) else "cue: (none)")
        captions.append("\n".join(_short(line, 44) for line in lines))
    return _image_grid(c.a.linker.dataset, list(t["image"]), captions,
                       f"{c.labels[0]} vs {c.labels[1]}: {c.a.dataset} {c.a.split} mentions where they disagree",
                       c.a.note, ncols=ncols, wrap=48)


# ---------------------------------------------------------------------------------------------
# The stage: dimkit errors


@dataclass
class ErrorReport(Result):
    """What :func:`run` found: the run's :class:`Analysis`, how far its re-scoring agrees with the ranks
    training wrote, the error kinds, the :class:`Comparison` with the run set beside it, the files."""

    analysis: Analysis
    agreement: float
    comparison: Comparison | None = None
    n_worst: int = 8
    files: list[Path] = field(default_factory=list)

    @property
    def kinds(self) -> pd.DataFrame:
        """:func:`confusion_summary` of the analysis."""
        return confusion_summary(self.analysis)

    @property
    def agrees(self) -> bool:
        """Re-scoring gave every mention the rank training wrote (False when nothing could be matched)."""
        return self.agreement == 1.0

    def summary(self) -> str:
        a = self.analysis
        matched = not math.isnan(self.agreement)
        lines = [str(a), f"ranks identical to training's predictions.parquet for {100 * self.agreement:.1f}% of "
                         "mentions" if matched else "no mention could be matched with training's predictions.parquet"]
        if not self.agrees:
            lines.append("WARNING: re-scoring does not reproduce the run's own evaluation (were its features "
                         "recomputed with another model or expert since it was trained?)")
        lines += ["", self.kinds.to_string(index=False)]
        if len(a.failures):
            worst = failure_table(a, self.n_worst)[["mention", "gold", "predicted", "gold rank", "margin", "error kind"]]
            lines += ["", f"worst {len(worst)} failures (largest margin of the prediction over the gold):",
                      worst.to_string(index=False, max_colwidth=40)]
        if self.comparison is not None:
            c = self.comparison
            lines += ["", str(c), c.summary().to_string(index=False)]
            if len(c.table):
                la, lb = c.labels
                head = c.table[["mention", "gold", la, f"{la} right", lb, f"{lb} right"]].head(self.n_worst)
                lines += [head.to_string(index=False, max_colwidth=32)]
        if self.files:
            lines += ["", f"wrote {self.files[0].parent}: " + ", ".join(f.name for f in self.files)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        a, t = self.analysis, self.analysis.table
        kinds = self.kinds.astype(object).where(self.kinds.notna(), None)
        out: dict[str, Any] = {
            "run": a.run_name, "variant": a.variant, "ablation": a.ablation, "dataset": a.dataset, "split": a.split,
            "protocol": a.protocol, "rank_rule": a.rank_rule, "mentions": len(t), "correct": int(t["correct"].sum()),
            "hits_at_1": float(t["correct"].mean()),
            "agreement_with_training": None if math.isnan(self.agreement) else self.agreement,
            "error_kinds": kinds.to_dict("records"), "note": a.note, "files": [str(f) for f in self.files]}
        if self.comparison is not None:
            b = self.comparison.b
            out["compared_with"] = {"run": b.run_name, "label": self.comparison.labels[1],
                                    "hits_at_1": float(b.table["correct"].mean()),
                                    "outcomes": dict(self.comparison.summary().itertuples(index=False, name=None))}
        return out

    @property
    def exit_code(self) -> int:
        return 0 if self.agrees else 1


def run(cfg: AnalysisConfig, *, linker: Any = None, progress: bool = True) -> ErrorReport:
    """Analyse the run ``cfg`` names (:meth:`AnalysisConfig.main_run`), set the compare run of the same
    variant beside it, and (``save``) write ``mentions.csv`` (every mention of the split: prediction,
    rank, margin, error kind), ``error_kinds.csv``, ``disagreements.csv`` and ``summary.json`` to ``folder``.

    ``linker``: a :class:`~dimkit.link.Linker` of the main run already loaded (notebook 06 holds one).
    """
    from . import atomic
    from .link import read_run

    cfg = cfg.replace()  # a checked copy
    datasets.require(cfg.dataset)  # before any run is looked for (or trained)
    main = cfg.main_run(progress) if linker is None else Path(linker.run_dir)
    info = linker.info if linker is not None else read_run(main)
    # refused before anything is computed (re-scoring may compute features and cues)
    if datasets.canonical_name(info.dataset) != cfg.dataset:
        raise ConfigError(f"run {info.run_name} was trained on {info.dataset}, not on {cfg.dataset}: name a run of "
                          f"{cfg.dataset}, or analyse it with dataset={info.dataset}")
    # the run set beside it is of the analysed run's variant, whatever cfg.variant says
    other_dir = cfg.replace(variant=info.variant).other_run(progress)
    if other_dir is not None:
        other = read_run(other_dir)
        if datasets.canonical_name(other.dataset) != cfg.dataset or other.run_name == info.run_name:
            raise ConfigError(f"run {other.run_name} (of {other.dataset}) cannot be set beside {info.run_name}: "
                              f"name another run of {cfg.dataset}")
    a = analyse(main, cfg.split, cfg.protocol, linker=linker, progress=progress)
    comparison = None
    if other_dir is not None:
        comparison = compare(a, analyse(other_dir, cfg.split, cfg.protocol, progress=progress))
    report = ErrorReport(analysis=a, agreement=agreement_with_training(a), comparison=comparison,
                         n_worst=cfg.n_worst)
    if cfg.save:
        out = cfg.folder if cfg.folder is not None else a.linker.run_dir / "errors" / f"{cfg.split}-{cfg.protocol}"
        files = [atomic.write_text(a.table.to_csv(index=False), out / "mentions.csv"),
                 atomic.write_text(report.kinds.to_csv(index=False), out / "error_kinds.csv")]
        if comparison is not None:
            files.append(atomic.write_text(comparison.table.to_csv(index=False), out / "disagreements.csv"))
        else:  # a comparison left by an earlier run here would read as this one's
            atomic.remove(out / "disagreements.csv")
        report.files = files + [out / "summary.json"]
        report.save(out / "summary.json")
    return report


#: The command line: ``dimkit errors sample+ --protocol kb`` takes the flags of :class:`AnalysisConfig`.
CONFIG = AnalysisConfig
