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
# # 00 · The data: mentions, entities, images and candidates
#
# Multimodal entity linking (MEL) links a *mention* in a *sentence*, together with the mention's
# *image*, to an *entity* of a knowledge base (KB). DIM (Song et al., PRCV 2024) works on WikiMEL,
# RichpediaMEL and WikiDiverse and on their LLM-enhanced versions Wiki+, Rich+ and Diverse+.
#
# Every dataset, whatever layout it was released in (the DIM release, MIMIC's cleaned files, the
# MELBench raw JSON), is converted by `dimkit prepare` into **one prepared form**: a folder of parquet
# files that plain pandas reads. This notebook loads one, checks its images and builds DIM's
# fuzzy candidate lists.
#
# With the default parameters it runs on the bundled **synthetic sample** (see
# `dimkit/data/sample/README.md`): its numbers say nothing about the paper.

# %%
import dimkit
from dimkit.env import print_environment

print_environment()

# %% tags=["parameters"]
dataset: str = "sample"  # sample | sample+ | wikimel | richpediamel | wikidiverse | wiki+ | rich+ | diverse+
k: int = 100  # candidates per mention (DIM's search_top100 uses 100)
n_examples: int = 8  # mentions shown with their images

# %%
from dimkit import candidates, datasets, images

dataset = datasets.require(dataset)  # fails here, at once, if it is not prepared
# The settings of this notebook's two stages (`dimkit images`, `dimkit candidates`): a bad value fails here, named.
image_cfg = images.ImagesConfig.for_dataset(dataset)
candidate_cfg = candidates.CandidatesConfig.for_dataset(dataset, k=k)
assert isinstance(n_examples, int) and n_examples >= 0, "n_examples must be a non-negative integer"
ds = datasets.load(dataset)
if dataset.startswith("sample"):
    print("NOTE: synthetic sample -- every number below describes the sample, not the paper's data.")
ds

# %% [markdown]
# ## The tables
# `mentions` has one row per mention: its split, sentence, mention string, image path (relative to
# the dataset folder) and gold `qid`. `entities` is the KB: one row per entity with its name and
# description.

# %%
import pandas as pd

pd.Series(ds.counts(), name=ds.name).to_frame()

# %%
ds.mentions.head()

# %%
ds.entities.head()

# %% [markdown]
# How ambiguous are the mention strings? An entity *name* shared by several KB entities cannot be
# resolved from text alone.

# %%
name_sizes = ds.entities.groupby("name").size()
print(f"{(name_sizes > 1).sum()} of {len(name_sizes)} names are shared by more than one entity "
      f"({name_sizes[name_sizes > 1].sum()} entities)")
name_sizes.sort_values(ascending=False).head(10)

# %% [markdown]
# ## Images
# Every mention image is opened once. Missing, empty, truncated, corrupt, SVG and oversized files are
# *counted and reported* (never silently replaced by a blank, as MIMIC's loader does); palette, CMYK,
# 16-bit and animated files are converted and counted too.

# %%
image_report = images.run(image_cfg, dataset=ds)
print(image_report.summary())

# %%
image_report.per_mention[image_report.per_mention["status"] != "ok"]

# %% [markdown]
# ## Candidates
# DIM ranks the gold entity among 100 candidates: the KB names most similar to the mention string
# under fuzzy `WRatio` (`search_top100`). dimkit computes the same lists with rapidfuzz and reports how
# often the gold is among them: under DIM's protocol the gold is added anyway, so this recall tells how
# much that protocol gives away.

# %%
candidate_report = candidates.run(candidate_cfg, dataset=ds)
print(candidate_report.summary())

# %% [markdown]
# ## A few mentions
# The image, the sentence with the mention in brackets, the gold entity, and the top candidates.

# %%
from dimkit.plots import mention_grid

ds = datasets.load(dataset)  # reload: the image check added `image_status` to mentions
examples = ds.split("test").head(n_examples)
names = ds.entities.set_index("qid")["name"]
cand = ds.candidates.set_index("mention_id")["qids"]
top3 = [", ".join(f"{q}" for q in list(cand[m])[:3]) for m in examples["mention_id"]]
fig = mention_grid(ds, examples, extra={"top-3 candidates": top3, "image": examples["image_status"].tolist()},
                   title=f"{ds.name}: test mentions" + (" (synthetic sample)" if ds.name.startswith("sample") else ""))
