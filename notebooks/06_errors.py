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
# # 06 · Using a trained model, and where it fails
#
# Two things no released MEL code offers:
#
# 1. **Linking a new mention.** `dimkit.link(sentence, mention, image, model=RUN)` encodes a new
#    sentence and image with the *same* CLIP and the *same* image expert the run was trained with
#    (the run folder records them in `features.json`; a model that is not available is refused, not
#    swapped) and ranks the run's whole knowledge base. `dimkit link RUN --input F.jsonl --output
#    G.jsonl` does a batch (module `dimkit.link`).
# 2. **Error analysis** (module `dimkit.analysis`): the worst failures of a run on the test
#    split with their image, sentence, gold and predicted entity, expert cue and -- for the `paper`
#    variant -- the attention over modalities; a summary by error kind; and the `paper` run beside
#    its text-only ablation on the mentions where they disagree.
#
# It uses the runs notebook 03 left in `$DIMKIT_RUNS`; if there are none, it trains short ones.
# On `make demo` everything here is the bundled **synthetic sample** with a sample-trained CLIP and
# synthetic oracle cues: nothing is comparable to the paper.

# %%
from dimkit.env import print_environment

print_environment()  # the run's feature model is printed once the run is chosen

# %% tags=["parameters"]
dataset: str = "sample+"  # sample+ | wiki+ | rich+ | diverse+ | any prepared dataset with trained runs
run: str = ""  # run folder or name under DIMKIT_RUNS (empty: the newest run of the variant below, no ablation)
variant: str = "paper"  # paper | released: which run to pick when run is empty
compare_run: str = ""  # the run set beside it (empty: the newest compare_ablation run of the same variant)
compare_ablation: str = "text_only"  # text_only | no_image | no_cue | no_attention | original_descriptions | none
split: str = "test"  # test | dev
protocol: str = "dim"  # dim (the gold among its candidate list) | kb (the gold among the whole KB)
n_worst: int = 8  # failures and disagreements shown
quick_epochs: int = 5  # only if no run exists yet: train one this many epochs
folder: str = ""  # where the tables go (empty: <run folder>/errors/<split>-<protocol>)

# %%
from dimkit import analysis, datasets, runs
from dimkit.link import Linker, link

# the parameters, checked as every dimkit setting is (names, choices, ranges)
cfg = analysis.AnalysisConfig.for_dataset(dataset, run=run, variant=variant, compare_run=compare_run,
                                          compare_ablation=compare_ablation, split=split, protocol=protocol,
                                          n_worst=n_worst, quick_epochs=quick_epochs, folder=folder or None)
is_sample = datasets.base_name(cfg.dataset) == "sample"
# fails here, at once, if it is not prepared (the sample's '+' form is built from its stored answers)
datasets.require(cfg.dataset)

runs.overview(runs.find(cfg.dataset)).drop(columns=["status", "error"])

# %% [markdown]
# ## The run
# The newest finished run of the chosen variant (or the one named); the run folder says which
# feature model and expert made its inputs. Loading it gathers the stored entity features of the
# whole knowledge base once.

# %%
run_dir = cfg.main_run()
linker = Linker(run_dir)
print_environment(linker.info.feature_model, linker.info.weights_real)
print()
print(linker)
if linker.note:
    print("NOTE:", linker.note)

# %% [markdown]
# ## Linking a new mention
# A new sentence about a test mention, linked twice: with the mention's own image file (its CLIP
# vector and expert cue are in the stores, so nothing is computed) and with the same picture
# re-saved as JPEG -- new bytes, so its CLIP vector is computed now with the run's CLIP, and the
# sample's expert, which only replays stored answers, has no cue for it: the model masks the cue,
# as for a training mention without one. `.attrs` says how each input was obtained.

# %%
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image

ds = linker.dataset
example = analysis.example_mention(linker, cfg.split)  # one the run ranks first, with a usable image
sentence = f"A postcard showing {example['mention']} arrived this morning."
new_image = Path(tempfile.mkdtemp()) / "postcard.jpg"
Image.open(ds.image_path(example["image"])).convert("RGB").save(new_image, quality=90)

with_file = link(sentence, example["mention"], ds.image_path(example["image"]), model=run_dir, k=5)
with_copy = link(sentence, example["mention"], new_image, model=run_dir, k=5)
for label, res in (("dataset image", with_file), ("re-saved copy", with_copy)):
    print(f"{label:>14}:", {k: v for k, v in res.attrs.items() if k not in ("note", "run")})
print(f"gold: {example['qid']}")
pd.concat({"dataset image": with_file[["qid", "name", "score"]],
           "re-saved copy": with_copy[["qid", "name", "score"]]}, axis=1)

# %% [markdown]
# ## Every mention of the split, re-scored
# `analysis.run` (the `dimkit errors` command) scores each mention with the run's model and stored
# features, as training evaluated it, does the same with the run set beside it (the text-only
# ablation, below), and writes the tables to the run folder (`errors/<split>-<protocol>/`) or to
# `folder`.
# Before looking at failures, prove that the re-scoring agrees with what `dimkit.train` wrote to
# `predictions.parquet`: the rank of every gold must be identical.

# %%
report = analysis.run(cfg, linker=linker)
result = report.analysis
print(result)
print(f"ranks identical to training's predictions.parquet for {100 * report.agreement:.1f}% of mentions")
print("tables written to", report.files[0].parent if report.files else "(not saved)")
assert report.agreement == 1.0, "re-scoring must reproduce the run's own evaluation"

# %% [markdown]
# ## The worst failures
# Sorted by how much the wrong entity out-scored the gold (margin of cosine scores). Each shows the
# image, the mention in its sentence, gold and predicted entity with their descriptions, the expert
# cue and, for the `paper` variant, the attention weights of the mention over the other modalities
# (sentence, image, cue; a masked modality -- unusable image, no cue -- gets 0).

# %%
from dimkit.plots import save_figure

fig = analysis.show_failures(result, cfg.n_worst)
save_figure(fig, f"06_worst_failures_{cfg.dataset}")

# %%
with pd.option_context("display.max_colwidth", 120):
    display(analysis.failure_table(result, cfg.n_worst))  # noqa: F821

# %% [markdown]
# ## Failures by kind
# Each failure counts once, under the first kind that applies: the fuzzy candidate list missed the
# gold; the image was unusable; an entity with the gold's *name* was chosen (the ambiguity the image
# and the cue should resolve); other. `flag set` counts every failure showing the condition, so
# overlaps stay visible.

# %%
report.kinds

# %% [markdown]
# ## Beside the text-only ablation
# The same mentions, scored by the run without image and cue. Where the predictions differ, which
# run was right tells what the extra modalities bought -- or cost.

# %%
comparison = report.comparison  # None with compare_ablation="none"
if comparison is None:
    print("no run set beside it (compare_ablation='none'): nothing to compare")
else:
    print(comparison)
    display(comparison.summary())  # noqa: F821

# %%
if comparison is not None:
    fig = analysis.show_comparison(comparison, cfg.n_worst)
    save_figure(fig, f"06_disagreements_{cfg.dataset}")

# %%
if comparison is not None:
    with pd.option_context("display.max_colwidth", 80):
        display(comparison.table.drop(columns=["mention_id", "image"]).head(cfg.n_worst))  # noqa: F821

# %%
print("NOTE:", result.note or "pretrained feature model on a real dataset")
if is_sample:
    print("These are synthetic-sample runs: the failures illustrate the method, not the paper's model.")
