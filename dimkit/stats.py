"""Statistics of the enhanced datasets, in the spirit of the paper's Figure 2 (notebook ``05_figure2``).

For every '+' dataset (entities with ``description`` written by the LLM and ``description_original``
kept beside it, :mod:`dimkit.augment`): entity and mention counts, the distribution of description
lengths in words before and after augmentation, the share of entities whose description changed,
and how often the new description names facts the original lacks.

"Names a fact absent from the original" is measured transparently, token by token (no model):

- a **number** (``1934``, ``4,700`` -> ``4700``, ``3.5``) of the new description that does not occur
  among the numbers of the original description;
- a **capitalised name**: a capitalised word that does not start a sentence and is not a common
  function word ("The", "In" ...), whose case-folded form occurs neither in the original
  description nor in the entity's name (``Ashen``, ``Teeth`` in "... in the Ashen Teeth");
- a **content word**: a word of 4 or more letters that is not a common function word, whose light
  stem (case-folded, a trailing "'s" or plural "s" dropped) occurs neither in the original
  description nor in the entity's name.

The headline share ("new name or number") counts entities whose new description holds at least
one new number or new capitalised name; the content-word share is reported beside it as a looser
signal (a paraphrase alone already adds content words). Entities without an original description
count as "new" whenever their new description has any such token, and are counted separately.
A description is "changed" when it differs from the original after collapsing whitespace.

Nothing here is the paper's Figure 2 itself (its numbers are not known here); on the bundled
sample the descriptions are synthetic oracle answers and the figure title says so.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import pandas as pd

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .stage import Config, Result, setting

#: Preferred order of the enhanced datasets in the figure (others follow by name, the sample last).
ORDER = ("wikimel+", "richpediamel+", "wikidiverse+")
DISPLAY_NAMES = {"wikimel+": "Wiki+", "richpediamel+": "Rich+", "wikidiverse+": "Diverse+",
                 "sample+": "sample+"}
MEASURES = {
    "changed_share": "description changed",
    "new_number_share": "new number",
    "new_name_share": "new capitalised name",
    "new_fact_share": "new name or number",
    "new_content_word_share": "new content word",
}

# Function words (and a few generic description words) that never count as a new name or content word.
STOPWORDS = frozenset("""
a about above across after again against all almost along already also although always am among an and
another any anyone anything are around as at be became because become been before being below between
both but by can could did do does doing done down during each either else especially even ever every
for from further had has have having he her here hers herself him himself his how however i if in
including into is it its itself just known later least less like many may me might more most mostly
much must my near neither never no nor not now of off often on once one only onto or other others our
out over own per perhaps rather same several she should since so some such than that the their theirs
them themselves then there these they this those though through throughout thus to too toward towards
under until upon us usually very was we well were what when where whether which while who whom whose
why will with within without would yet you your
""".split())

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’\-][^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")


def _text(v) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v)
    return s if s.strip() else None


def word_count(text: str | None) -> int:
    """Words of a description (whitespace-separated; 0 for a missing one)."""
    return len(text.split()) if text else 0


def _stem(word: str) -> str:
    w = word.casefold().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


def _number(tok: str) -> str:
    return tok.replace(",", "")


def tokens(text: str | None) -> list[tuple[str, bool]]:
    """(token, starts a sentence) for each word or number of ``text``."""
    if not text:
        return []
    out = []
    for m in _TOKEN.finditer(text):
        before = text[:m.start()]
        initial = not before.strip() or bool(_SENTENCE_END.search(before))
        out.append((m.group(0), initial))
    return out


@dataclass
class NewFacts:
    """Tokens of a new description that its original lacks (see the module docstring)."""

    numbers: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    content_words: list[str] = field(default_factory=list)

    @property
    def any_fact(self) -> bool:
        """A new number or a new capitalised name."""
        return bool(self.numbers or self.names)


def new_facts(description: str | None, original: str | None, name: str | None = None) -> NewFacts:
    """Numbers, capitalised names and content words of ``description`` absent from ``original`` (and ``name``)."""
    known_words: set[str] = set()
    known_numbers: set[str] = set()
    for text in (original, name):
        for tok, _ in tokens(text):
            if tok[0].isdigit():
                known_numbers.add(_number(tok))
            else:
                known_words.add(tok.casefold())
                known_words.add(_stem(tok))
    out = NewFacts()
    seen: set[str] = set()
    for tok, initial in tokens(description):
        if tok[0].isdigit():
            n = _number(tok)
            if n not in known_numbers and ("#" + n) not in seen:
                out.numbers.append(n)
                seen.add("#" + n)
            continue
        low = tok.casefold()
        if low in STOPWORDS:
            continue
        stem = _stem(tok)
        if low in known_words or stem in known_words:
            continue
        if tok[0].isupper() and not initial and ("N" + low) not in seen:
            out.names.append(tok)
            seen.add("N" + low)
        if len(tok) >= 4 and tok.isalpha() and ("W" + stem) not in seen:
            out.content_words.append(low)
            seen.add("W" + stem)
    return out


def _normalised(text: str | None) -> str | None:
    return " ".join(text.split()) if text else None


@dataclass
class EnhancedStats:
    """Figure 2 statistics of one '+' dataset: per-entity table and a summary."""

    dataset: str
    synthetic: bool  # the bundled sample, or descriptions marked synthetic in meta.json
    counts: dict
    per_entity: pd.DataFrame  # qid, name, words_original, words_description, changed, new_* lists, has_*

    def summary(self) -> dict:
        """One flat dict: counts, median/mean lengths, shares (fractions in [0, 1])."""
        pe = self.per_entity
        measured = pe[pe["has_description"]]
        n = len(measured)

        def share(col: str) -> float:
            return float(measured[col].mean()) if n else math.nan

        out = {"dataset": self.dataset, "synthetic": self.synthetic, **self.counts}
        for col in ("words_original", "words_description"):
            vals = pe.loc[pe["has_original" if col == "words_original" else "has_description"], col]
            out[f"{col}_median"] = float(vals.median()) if len(vals) else math.nan
            out[f"{col}_mean"] = float(vals.mean()) if len(vals) else math.nan
        out["measured_entities"] = n
        out["changed_share"] = share("changed")
        out["new_number_share"] = share("has_new_number")
        out["new_name_share"] = share("has_new_name")
        out["new_fact_share"] = share("has_new_fact")
        out["new_content_word_share"] = share("has_new_content_word")
        return out


#: Bump when the per-entity measures change: stored tables of an older version are computed again.
STATS_VERSION = 1
_STATS_FILE = "reports/figure2.parquet"
_STATS_KEY = "reports/figure2.json"


def _per_entity(ds: datasets.Dataset) -> pd.DataFrame:
    """The per-entity measures, stored beside the dataset under a key of its entity table (a rerun on
    160K entities would otherwise spend a minute measuring the same texts again)."""
    from .images import sha256_file
    from .store import content_hash

    root = Path(ds.root)
    stored = (root / "entities.parquet").is_file()  # a dataset built in memory is measured, not stored
    key = (content_hash({"version": STATS_VERSION, "entities": sha256_file(root / "entities.parquet")})
           if stored else None)
    try:
        if stored and json.loads((root / _STATS_KEY).read_text()).get("key") == key:
            pe = pd.read_parquet(root / _STATS_FILE)
            for col in ("new_numbers", "new_names", "new_content_words"):
                pe[col] = [list(v) for v in pe[col]]
            return pe
    except (OSError, ValueError):
        pass  # not measured yet, or measured on other texts
    ents = ds.entities
    names = ents["name"].tolist()
    desc = [_text(v) for v in ents["description"]]
    orig = [_text(v) for v in ents["description_original"]]
    facts = [new_facts(d, o, nm) for d, o, nm in zip(desc, orig, names)]
    pe = pd.DataFrame({
        "qid": ents["qid"].astype(str).tolist(),
        "name": names,
        "has_original": [o is not None for o in orig],
        "has_description": [d is not None for d in desc],
        "words_original": [word_count(o) for o in orig],
        "words_description": [word_count(d) for d in desc],
        "changed": [_normalised(d) != _normalised(o) for d, o in zip(desc, orig)],
        "new_numbers": [f.numbers for f in facts],
        "new_names": [f.names for f in facts],
        "new_content_words": [f.content_words for f in facts],
    })
    pe["has_new_number"] = [bool(f.numbers) for f in facts]
    pe["has_new_name"] = [bool(f.names) for f in facts]
    pe["has_new_fact"] = [f.any_fact for f in facts]
    pe["has_new_content_word"] = [bool(f.content_words) for f in facts]
    if stored:
        atomic.write_parquet(pe, root / _STATS_FILE)
        atomic.write_json({"key": key}, root / _STATS_KEY)
    return pe


def enhanced_stats(ds: datasets.Dataset | str, data_dir: str | Path | None = None) -> EnhancedStats:
    """Compute the statistics of one '+' dataset (needs ``description_original`` in entities)."""
    if isinstance(ds, str):
        ds = datasets.load(ds, data_dir)
    ents = ds.entities
    for col in ("description", "description_original"):
        if col not in ents.columns:
            raise DataError(f"not an enhanced dataset: entities lack {col!r} (build it with "
                            f"`dimkit augment {datasets.base_name(ds.name)}`)",
                            file=ds.root / "entities.parquet", field=col)
    pe = _per_entity(ds)
    m = ds.mentions
    src = ents["description_source"].astype(str) if "description_source" in ents.columns else pd.Series(
        [""] * len(ents))
    counts = {
        "entities": int(len(ents)),
        "mentions": int(len(m)),
        **{f"mentions_{s}": int((m["split"] == s).sum()) for s in datasets.SPLITS},
        "entities_llm_description": int(src.str.startswith("llm:").sum()),
        "entities_without_original": int((~pe["has_original"]).sum()),
        "entities_without_description": int((~pe["has_description"]).sum()),
    }
    synthetic = datasets.base_name(ds.name) == "sample" or bool(ds.meta.get("synthetic_answers"))
    return EnhancedStats(dataset=ds.name, synthetic=synthetic, counts=counts, per_entity=pe)


def enhanced_datasets_present(data_dir: str | Path | None = None) -> list[str]:
    """The prepared '+' datasets under ``$DIMKIT_DATA``, paper datasets first, the sample last."""
    root = Path(data_dir) if data_dir is not None else paths.data_dir()
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith("+") and (p / "meta.json").exists():
                try:
                    found.append(datasets.canonical_name(p.name))
                except DimkitError:
                    continue

    def key(n: str) -> tuple:
        return (ORDER.index(n) if n in ORDER else len(ORDER) + (1 if n.startswith("sample") else 0), n)

    return sorted(set(found), key=key)


def stats_table(stats: Sequence[EnhancedStats]) -> pd.DataFrame:
    """One row per dataset: counts, lengths and shares (fractions), as data."""
    return pd.DataFrame([s.summary() for s in stats])


def stats_markdown(table: pd.DataFrame) -> str:
    """The stats table as Markdown, shares in %, with its caption."""
    show = {
        "dataset": "dataset", "entities": "entities", "mentions": "mentions",
        "words_original_median": "words before (median)", "words_description_median": "words after (median)",
        "changed_share": "changed %", "new_fact_share": "new name or number %",
        "new_number_share": "new number %", "new_name_share": "new name %",
        "new_content_word_share": "new content word %",
    }
    lines = ["| " + " | ".join(show.values()) + " |", "|---|" + "---:|" * (len(show) - 1)]
    for _, r in table.iterrows():
        cells = []
        for k in show:
            v = r[k]
            if k == "dataset":
                cells.append(DISPLAY_NAMES.get(v, v) + (" (synthetic)" if r["synthetic"] else ""))
            elif k.endswith("_share"):
                cells.append("n/a" if pd.isna(v) else f"{100 * v:.1f}")
            elif isinstance(v, float):
                cells.append("n/a" if pd.isna(v) else f"{v:.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    caption = ("Statistics of the enhanced datasets (dimkit, in the spirit of the paper's Figure 2). "
               "'new name or number': share of entities whose new description holds a capitalised name or a "
               "number absent from the original description and the entity name (see dimkit.stats).")
    if table["synthetic"].any():
        caption = "Synthetic sample: oracle descriptions, not an LLM's and not the paper's data. " + caption
    return caption + "\n\n" + "\n".join(lines) + "\n"


def figure_title(stats: Sequence[EnhancedStats]) -> str:
    """The figure's title; says 'synthetic sample' whenever a synthetic dataset is shown."""
    title = "Enhanced datasets: counts, description lengths, new facts (dimkit, cf. the paper's Figure 2)"
    if any(s.synthetic for s in stats):
        title += "\nsynthetic sample: oracle descriptions, not an LLM's; not the paper's data"
    return title


def plot_figure2(stats: Sequence[EnhancedStats]):
    """One figure, three panels: counts, description lengths before/after, shares of new facts."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import set_style

    if not stats:
        raise DimkitError("no enhanced dataset to plot")
    set_style()
    names = [DISPLAY_NAMES.get(s.dataset, s.dataset) for s in stats]
    summ = [s.summary() for s in stats]
    fig, (ax_c, ax_l, ax_s) = plt.subplots(1, 3, figsize=(12.0, 3.9),
                                           gridspec_kw={"width_ratios": [1.0, 1.2, 1.5]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # (a) counts
    x = np.arange(len(stats))
    w = 0.38
    ent = [s["entities"] for s in summ]
    men = [s["mentions"] for s in summ]
    b1 = ax_c.bar(x - w / 2, ent, w, label="entities", color=colors[0])
    b2 = ax_c.bar(x + w / 2, men, w, label="mentions", color=colors[1])
    vals = [v for v in ent + men if v > 0]
    if vals and max(vals) / min(vals) > 30:
        ax_c.set_yscale("log")
    for bars in (b1, b2):
        ax_c.bar_label(bars, labels=[f"{int(b.get_height()):,}" for b in bars], fontsize=7, padding=1)
    ax_c.set_xticks(x, names)
    ax_c.set(title="(a) entities and mentions", ylabel="count")
    ax_c.legend(loc="upper left", fontsize=7)
    ax_c.margins(y=0.15)

    # (b) description lengths before / after
    data, pos, cols = [], [], []
    for i, s in enumerate(stats):
        pe = s.per_entity
        data += [pe.loc[pe["has_original"], "words_original"].to_numpy(),
                 pe.loc[pe["has_description"], "words_description"].to_numpy()]
        pos += [3 * i, 3 * i + 1]
        cols += [colors[2], colors[3]]
    data = [d if len(d) else np.array([np.nan]) for d in data]
    bp = ax_l.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showfliers=True,
                      flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "black"})
    for patch, c in zip(bp["boxes"], cols):
        patch.set_facecolor(c)
        patch.set_alpha(0.7)
    ax_l.set_xticks([3 * i + 0.5 for i in range(len(stats))], names)
    ax_l.set(title="(b) description length", ylabel="words per description")
    ax_l.legend([bp["boxes"][0], bp["boxes"][1]], ["original", "LLM (after)"], loc="upper left", fontsize=7)
    for p_, d in zip(pos, data):
        if len(d) and not np.isnan(d).all():
            ax_l.annotate(f"median {np.nanmedian(d):.0f}", (p_ + 0.42, np.nanmedian(d)), xytext=(2, 0),
                          textcoords="offset points", ha="left", va="center", fontsize=7)

    # (c) shares
    keys = list(MEASURES)
    y = np.arange(len(keys))
    h = 0.8 / len(stats)
    for i, (s, nm) in enumerate(zip(summ, names)):
        v = [100 * s[k] if not math.isnan(s[k]) else 0.0 for k in keys]
        bars = ax_s.barh(y + (i - (len(stats) - 1) / 2) * h, v, h, label=nm, color=colors[(i + 4) % len(colors)])
        ax_s.bar_label(bars, labels=[f"{t:.0f}%" for t in v], fontsize=7, padding=2)
    ax_s.set_yticks(y, [MEASURES[k] for k in keys])
    ax_s.invert_yaxis()
    ax_s.set(title="(c) entities whose new description ...", xlabel="% of entities with a description",
             xlim=(0, 112))
    if len(stats) > 1:
        ax_s.legend(loc="lower right", fontsize=7)
    fig.suptitle(figure_title(stats), fontsize=9)
    fig.tight_layout()
    return fig


def figure_name(stats: Sequence[EnhancedStats]) -> str:
    """``figure2_sample`` when only the sample is shown, else ``figure2``."""
    return "figure2_sample" if stats and all(datasets.base_name(s.dataset) == "sample" for s in stats) \
        else "figure2"


@dataclass
class Figure2(Result):
    """What :func:`run` returns: the stats, their table, the figure and the files written."""

    stats: list[EnhancedStats]
    table: pd.DataFrame
    fig: object = field(repr=False)
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """The statistics as a table, what is synthetic, and the files written."""
        lines = [figure_title(self.stats), "", self.table.round(3).to_string(index=False)]
        lines += [f"wrote {p}" for p in self.files]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The table's rows and the files (the figure itself is in the files)."""
        return {"rows": self.table.to_dict(orient="records"), "files": [str(p) for p in self.files]}


@dataclass
class Figure2Config(Config):
    """Which '+' datasets Figure 2 compares with their originals, and where it is written."""

    STAGE: ClassVar[str] = "figure2"

    datasets: list[str] = setting(factory=list, help="'+' datasets (default: every prepared one, paper order)")
    name: str | None = setting(None, "file stem of the figure and its table, a plain file name (default: from the "
                                     "datasets)")
    save: bool = setting(True, "write the figure (PNG, PDF) and its table (CSV, Markdown)")
    folder: Path | None = setting(None, "where (default $DIMKIT_FIGURES)")
    data_dir: Path | None = setting(None, "prepared datasets (default $DIMKIT_DATA)", cli=False)

    def check(self) -> None:
        """Canonical '+' names, each once; a name that stays inside the folder it is written to."""
        if self.name is not None:
            paths.check_name(self.name, self.label("name"), f"it names files in {option('folder', '--folder')} "
                                                      "(default $DIMKIT_FIGURES): choose the place with that")
        canon: list[str] = []
        for n in self.datasets:
            c = datasets.canonical_name(n)
            if not datasets.is_augmented(c):
                raise ConfigError(f"{n!r} is not an enhanced dataset: Figure 2 compares '+' datasets with their "
                                  f"originals (try {c}+)")
            if c not in canon:
                canon.append(c)
        self.datasets = canon


def run(cfg: Figure2Config) -> Figure2:
    """Stats of the named (default: every prepared) '+' datasets, the figure, and the files written.

    Writes ``<name>.png``/``.pdf`` through :func:`dimkit.plots.save_figure` (``$DIMKIT_FIGURES``) and
    ``tables/<name>_stats.csv``/``.md`` beside them.
    """
    from .plots import save_figure

    cfg = cfg.replace()  # a checked copy
    names = cfg.datasets or enhanced_datasets_present(cfg.data_dir)
    if not names:
        raise DimkitError("no enhanced ('+') dataset is prepared: build the sample's with "
                          "`dimkit augment sample --model sample-oracle --replay`, or a paper dataset's with "
                          "`dimkit augment wikimel` / `dimkit prepare <released Wiki+> --name wiki+`")
    stats = [enhanced_stats(datasets.require(n, cfg.data_dir), cfg.data_dir) for n in names]
    table = stats_table(stats)
    fig = plot_figure2(stats)
    files: list[Path] = []
    if cfg.save:
        stem = cfg.name or figure_name(stats)
        out = cfg.folder if cfg.folder is not None else paths.figures_dir()
        files += save_figure(fig, stem, out)
        tdir = out / "tables"
        csv_path, md_path = tdir / f"{stem}_stats.csv", tdir / f"{stem}_stats.md"
        atomic.write_text(table.round(4).to_csv(index=False, na_rep="n/a"), csv_path)
        atomic.write_text(stats_markdown(table), md_path)
        files += [csv_path, md_path]
    return Figure2(stats=stats, table=table, fig=fig, files=files)


def figure2(names: Iterable[str] | None = None, **settings) -> Figure2:
    """:func:`run` of ``Figure2Config(datasets=names, **settings)``."""
    return run(Figure2Config(datasets=list(names or []), **settings))


#: The command line: ``dimkit figure2 --datasets wiki+ rich+`` takes the flags of :class:`Figure2Config`.
CONFIG = Figure2Config


__all__ = ["MEASURES", "NewFacts", "new_facts", "tokens", "word_count", "EnhancedStats", "enhanced_stats",
           "enhanced_datasets_present", "stats_table", "stats_markdown", "figure_title", "plot_figure2",
           "figure_name", "Figure2", "Figure2Config", "run", "figure2"]
