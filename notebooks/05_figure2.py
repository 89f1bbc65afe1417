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
# # 05 · What the LLM added: statistics of the enhanced datasets (cf. the paper's Figure 2)
#
# The paper's Figure 2 describes Wiki+, Rich+ and Diverse+: how the entity descriptions changed once
# ChatGPT rewrote them. Its numbers are not known here, so this notebook measures the same kind of
# thing on whatever '+' datasets you have, with `dimkit.stats`:
#
# - entity and mention counts;
# - the length of each description in words, before (`description_original`) and after
#   (`description`) augmentation;
# - the share of entities whose description changed (beyond whitespace);
# - how often the new description **names a fact absent from the original** -- measured by a
#   transparent token rule, no model: a *number* the original does not contain, or a *capitalised
#   name* (not starting a sentence, not a function word) found neither in the original nor in the
#   entity's name. A looser signal, any new *content word* (4+ letters, not a function word, light
#   plural/possessive stemming), is shown beside it.
#
# One figure (one plotting policy, `dimkit.plots`), saved as PNG and PDF under `figures/`
# (`$DIMKIT_FIGURES`), plus its numbers as CSV/Markdown under `figures/tables/`. On `make demo` it
# shows `sample+`, whose descriptions are **synthetic oracle answers**: the title says so.

# %%
from dimkit.env import print_environment

print_environment()

# %% tags=["parameters"]
dataset: str = "sample+"  # enhanced dataset: sample+ | wiki+ | rich+ | diverse+ (any prepared + dataset)
extra_datasets: list = []  # more + datasets in the same figure, e.g. rich+ diverse+
n_examples: int = 5  # entities shown with the facts their new description adds

# %%
from dimkit import datasets, stats

cfg = stats.Figure2Config(datasets=[dataset, *extra_datasets]).validate()  # '+' names only, each once
# fails here, at once, if one is not prepared (the sample's '+' form is built from its stored answers)
names = [datasets.require(n) for n in cfg.datasets]
names

# %% [markdown]
# ## The measure, on one sentence
# Written out by hand first, then compared with `stats.new_facts`: numbers of the new description
# missing from the original, capitalised non-initial words missing from the original and the name.

# %%
import re

original = "Pellmarsh is a mountain."
new = "Pellmarsh is a mountain of 4,700 metres in the Ashen Teeth."
orig_words = {w.lower() for w in re.findall(r"[A-Za-z]+", original)} | {"pellmarsh"}
numbers = [n.replace(",", "") for n in re.findall(r"\d+(?:,\d+)*", new) if n.replace(",", "") not in original]
names_ = [w for i, w in enumerate(re.findall(r"[A-Za-z]+", new))
          if i > 0 and w[0].isupper() and w.lower() not in orig_words and w.lower() not in stats.STOPWORDS]
print("by hand:", numbers, names_)
facts = stats.new_facts(new, original, "Pellmarsh")
assert (facts.numbers, facts.names) == (numbers, names_)
print("dimkit: ", facts.numbers, facts.names, "| content words:", facts.content_words)

# %% [markdown]
# ## The statistics and the figure

# %%
result = stats.run(cfg)
result.table.T

# %%
print("written:", *[p.name for p in result.files])
result.fig

# %% [markdown]
# ## Examples
# The original and new description of a few entities, with what the rule counts as new.

# %%
import pandas as pd

first = result.stats[0]
ents = datasets.load(first.dataset).entities.set_index("qid")
ex = first.per_entity.head(n_examples).set_index("qid")
with pd.option_context("display.max_colwidth", 120):
    display(pd.DataFrame({"original": ents.loc[ex.index, "description_original"],
                          "new": ents.loc[ex.index, "description"],
                          "new numbers": ex["new_numbers"], "new names": ex["new_names"]}))
if first.synthetic:
    print("NOTE: synthetic sample -- oracle descriptions, not an LLM's; not the paper's data.")
