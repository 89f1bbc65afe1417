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
# # 01 · LLM-written entity descriptions: building Wiki+, Rich+ and Diverse+
#
# DIM's first contribution is data: every KB *entity* is put to ChatGPT with a "Who is ...?"
# question, and the answer replaces the entity's static *description*. That turns WikiMEL,
# RichpediaMEL and WikiDiverse into **Wiki+**, **Rich+** and **Diverse+**. The released code ships only
# the finished files; `dimkit.augment` makes the step itself reproducible:
#
# - the prompt is a named, versioned template (`who-is@1`);
# - every answer is stored the moment it arrives, keyed by model + template version + entity, so a
#   rerun (or a run resumed after a crash) sends no request for what is already stored;
# - 429s (honouring `Retry-After`), server errors and timeouts are retried with backoff, and a
#   malformed or empty answer is asked again (it never becomes a description); what still fails is
#   recorded with its reason and retried on the next run.
#
# **Endpoint and key** come from the environment only: `OPENAI_BASE_URL` (default OpenAI; any
# OpenAI-compatible server works: Azure OpenAI, vLLM, Ollama, llama.cpp) and `OPENAI_API_KEY`. They are
# never parameters of this notebook, because papermill writes parameters into the output notebook.
#
# **Defaults: no LLM at all.** The bundled sample ships *synthetic oracle answers*
# (`dimkit/data/sample/source/llm_answers.json`, written by `dimkit_dev/sample.py`, not by an LLM). With
# `model = "sample-oracle"` and `replay = True` they are imported into the store and replayed, so this
# notebook runs offline with zero requests and builds `sample+` for notebooks 02 and 03. For a real
# dataset choose a real model and `replay = False`, e.g.
# `papermill 01_augment.ipynb out.ipynb -p dataset wikimel -p model gpt-4o-mini -p replay False`
# (with `OPENAI_API_KEY` set). The command line does the same: `dimkit augment wikimel --model gpt-4o-mini`.

# %%
import dimkit
from dimkit.env import print_environment

print_environment()

# %% tags=["parameters"]
dataset: str = "sample"  # source dataset: sample | wikimel | richpediamel | wikidiverse (writes <dataset>+)
model: str = "sample-oracle"  # sample-oracle (sample's synthetic answers) | gpt-4o-mini | gpt-4o | any model your endpoint serves
template: str = "who-is"  # who-is | who-is-kb | name@version of a template you registered
concurrency: int = 8  # requests in flight, 1..1024 (32 suits a fast endpoint)
replay: bool = True  # True: stored answers only, never call the LLM | False: request what is missing
dry_run: bool = False  # True: count stored answers and estimate the cost; call and write nothing
n_examples: int = 5  # entities shown before / after
out: str = ""  # output dataset name (empty: <dataset>+)
force: bool = False  # True: replace out even if it holds a dataset this notebook did not build

# %%
from dimkit import augment, datasets
from dimkit.llm import Endpoint

# One config checks every parameter (types, ranges, the template, source vs output) as `dimkit augment` does.
cfg = augment.AugmentConfig.for_dataset(datasets.require(dataset), model=model, template=template,
                                        concurrency=concurrency, replay=replay, dry_run=dry_run,
                                        out=out or None, force=force)
assert isinstance(n_examples, int) and n_examples >= 0, "n_examples must be a non-negative int"
tmpl = augment.get_template(cfg.template)
print(f"{cfg.dataset} -> {cfg.out or cfg.dataset + '+'} | model {cfg.model} | template {cfg.template} | replay {cfg.replay} "
      f"| dry run {cfg.dry_run}")
if cfg.mode == "live":
    print("endpoint:", Endpoint.resolve())  # the key is shown only as <set> / <missing>

# %% [markdown]
# ## The question
# The paper asks ChatGPT "Who is ...?" about each entity; its exact wording is not published. The
# template asks for the facts that set the entity apart from others with the same name, and names the
# Wikidata id where the KB key is one. Here is the request for the first entity:

# %%
ds = datasets.load(cfg.dataset)
first = ds.entities.iloc[0]
for message in tmpl.render(first["qid"], first["name"], first["description"]):
    print(f"[{message['role']}] {message['content']}")

# %% [markdown]
# ## What would it cost?
# A dry run counts the answers already stored and estimates tokens and cost of the rest (list
# prices in `dimkit.llm.PRICES_USD_PER_1M`; the Batch API halves them). It calls nothing.

# %%
estimate = augment.run(cfg.replace(dry_run=True))
print(estimate)

# %% [markdown]
# ## Ask (or replay)
# One call. The report counts answers done, cached and failed (by reason, naming the entities), the
# requests sent with their retries, and tokens and cost. It is also written to
# `runs/augment/<dataset>+.json`.

# %%
report = augment.run(cfg)
print(report)

# %% [markdown]
# ## Before and after
# The original description beside the new one. On the sample the new ones are the synthetic oracle's:
# they carry the distinguishing facts (kind, visual signature) that the ambiguous originals lack.

# %%
import pandas as pd

if report.written:
    with pd.option_context("display.max_colwidth", 200):
        display(augment.before_after(report.out, n=n_examples))
    plus = datasets.load(report.out)
    words = pd.DataFrame({"original": plus.entities["description_original"].fillna("").str.split().str.len(),
                          "llm": plus.entities["description"].fillna("").str.split().str.len()})
    print("words per description (median):", words.median().to_dict())
    if plus.meta.get("synthetic_answers"):
        print("NOTE:", plus.meta["note"])
else:
    print("nothing written:", "dry run" if cfg.dry_run else "some entities still lack an answer; rerun")
