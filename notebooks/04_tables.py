# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The paper's tables, rebuilt from the runs
#
# Every training run (notebook 03, `dimkit train`, `make reproduce`) leaves
# `runs/<run-name>/metrics.json`. `dimkit.runs` finds and reads those files -- nothing parses printed
# text -- and `dimkit.tables` rebuilds the paper's three tables from them as DataFrames:
#
# 1. DIM on the **original** datasets (WikiMEL, RichpediaMEL, WikiDiverse),
# 2. DIM on the **enhanced** datasets (Wiki+, Rich+, Diverse+),
# 3. the **ablations** (no cue, no image, no attention, original vs LLM descriptions, text only),
#
# each twice: under DIM's own **candidate protocol** (the gold among its mention's top-100 fuzzy
# candidates, gold guaranteed; H@1/5/10/20) and, in separate tables, under the **whole-KB protocol**
# of MIMIC and later papers (H@1/3/5/MRR). The two are never put in one column.
#
# Beside each dimkit number stand the reference value from `dimkit/data/reference_results.csv` and the
# difference. **The DIM paper's own numbers are not in that file**: they could not be obtained when
# the kit was written, so those cells are empty and show as *n/a* until you fill them in from the
# PDF (give a `source` for every number you add). The file does hold the published whole-KB H@1 of
# MIMIC and MMoE, for orientation, with their source.
#
# Tables are written to `figures/tables/` (`$DIMKIT_FIGURES/tables`) as CSV, Markdown and LaTeX.
# With the default parameters this notebook only collects what exists; on `make demo` that is the
# sample's runs from notebook 03, whose numbers **are not paper numbers**.

# %%
from dimkit.env import print_environment

print_environment()

# %% tags=["parameters"]
dataset: str = "sample"  # family shown first and launched for (with its + form): sample | wikimel | richpediamel | wikidiverse
split: str = "test"  # test | dev: the split shown (the model is always selected on dev)
pick: str = "latest"  # latest | best_dev: which run fills a cell when several match
launch_missing: bool = False  # True: train the runs the tables lack, for launch_datasets x variants x ablations
launch_datasets: list = []  # empty: dataset and its + form, or names such as wiki+ rich+ diverse+
variants: list = ["paper"]  # paper | released
ablations: list = ["none"]  # none | no_cue | no_image | no_attention | original_descriptions | text_only
num_epochs: int = 0  # 0: the dataset preset (sample 30, released scripts 300, diverse 500)
clip: str = "auto"  # feature model for launched runs: auto (sample CLIP on the sample, ViT-B-32 else) | default | ARCH:random

# %%
from dimkit import runs, tables

# the parameters, checked as `dimkit tables` checks its flags (0 epochs: the dataset preset)
cfg = tables.TablesConfig.for_dataset(dataset, split=split, pick=pick, launch_missing=launch_missing,
                                      launch_datasets=launch_datasets, variants=variants, ablations=ablations,
                                      num_epochs=num_epochs or None, clip=clip)
specs = cfg.specs()
print(f"tables for {cfg.split}, run choice {cfg.pick!r}; launch {'ON' if cfg.launch_missing else 'off'} "
      f"for {cfg.launch_names}")

# %% [markdown]
# ## The runs
# One row per `metrics.json` under `runs/`, newest first. Runs that did not finish (a diverged
# loss, a broken file, a knowledge base changed since: "stale") are listed with their status and
# never used in a table.

# %%
found = runs.check_kb(runs.collect())  # a run trained before its knowledge base changed: "stale"
runs.overview(found)

# %% [markdown]
# ## Missing runs
# Which table cells of the chosen datasets have no finished run. With `launch_missing=True` the
# combinations of `launch_datasets` x `variants` x `ablations` that lack a run are trained here
# (each with its dataset's preset, by `dimkit.runs.launch`); otherwise this only lists them.

# %%
missing = tables.missing_runs(specs, found, only=cfg.launch_names)
print(f"{len(missing)} cell(s) without a run for {cfg.launch_names}:",
      ", ".join(map(str, missing[:12])) + (" ..." if len(missing) > 12 else ""))
if cfg.launch_missing:
    print(runs.launch(cfg.plan(), reuse="key", runs=found, num_epochs=cfg.num_epochs, clip=cfg.clip))
    found = runs.check_kb(runs.collect())

# %% [markdown]
# ## Building the tables
# One call builds all of them (a dict of `Table`: `.frame` holds the numbers, `.caption` says which
# split, protocol and run choice they come from, and warns about the sample and about features
# without pretrained weights); a second writes them.

# %%
built = tables.build_tables(specs, runs=found, pick=cfg.pick)
left = runs.left_out(found)  # unreadable or stale runs: named, never used
for name, why in left:
    print(f"left out {name}: {why}")
files = tables.write_tables(built, left=left)
print(f"wrote {len(files)} files to {files[0].parent}")

# %% [markdown]
# **How a cell is filled** -- in the open, then checked against the package: a dimkit cell is
# 100 x the fraction stored in the chosen run's `metrics.json` (the run named in the `run` column);
# the difference is that minus the reference value, in percentage points.

# %%
import json
import math

from dimkit import paths

filled = [(t, row) for t in built.values() for _, row in t.frame.iterrows() if isinstance(row["run"], str)]
for t, row in filled[:1]:
    raw = json.loads((paths.runs_dir() / row["run"] / "metrics.json").read_text())
    by_hand = 100 * raw["metrics"][cfg.split][t.spec.protocol]["H@1"]
    assert math.isclose(by_hand, row["H@1"]), (by_hand, row["H@1"])
    print(f"{t.name}: {row['dataset']} / {row['method']}: H@1 {by_hand:.2f} from {row['run']} -- matches the table")
if not filled:
    print("no table cell holds a dimkit number yet: run notebook 03 (or set launch_missing=True)")

# %% [markdown]
# ## The tables of this dataset family
# On the sample: the sample's table under both protocols (its caption says these are not paper
# numbers). On a paper dataset: the original, enhanced and ablation tables.

# %%
from IPython.display import Markdown, display

for name in cfg.shown():
    display(Markdown(built[name].to_markdown()))

# %% [markdown]
# ## The reference values
# `dimkit/data/reference_results.csv`: one row per (dataset, protocol, method, ablation, metric), values in
# percent as printed in the papers, a `source` for every number. Fill the empty DIM rows from the
# paper's PDF, then rerun this notebook.

# %%
ref = tables.load_reference()
print(f"{int(ref['value'].notna().sum())} of {len(ref)} reference cells hold a value")
ref[ref["value"].notna()]

# %% [markdown]
# Every table as Markdown, CSV and LaTeX is under `figures/tables/` (`index.md` holds all of them).

# %%
sorted(p.name for p in files)
