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
# # 02 · Expert cues and CLIP features
#
# DIM's second idea: an image *expert* (BLIP-2 OPT-2.7b in the paper) is asked about every mention
# image -- "Question:  Who are the characters in the picture? Answer: " -- and its answer, the *cue*,
# becomes a fourth input beside the mention, the mention + sentence and the image. All four, and
# every entity description, are encoded by a frozen CLIP ViT-B/32 into one 512-d space.
#
# This notebook runs both stages with one call each (`dimkit cues`, `dimkit features` on the command
# line) and looks at what came back. Both store every answer and vector under (model id, prompt
# version, content hash), so a rerun computes nothing.
#
# With the default parameters it runs offline on the bundled **synthetic sample**: the cues are the
# sample's **synthetic oracle cues** (not BLIP-2), and the CLIP is a small one dimkit trained on the
# sample (not OpenAI's weights). Nothing here is comparable to the paper.

# %%
from dimkit.env import print_environment

print_environment()  # the feature model and its weights are printed once the parameters are read

# %% tags=["parameters"]
dataset: str = "sample+"  # sample+ | sample | wiki+ | rich+ | diverse+ | wikimel | richpediamel | wikidiverse
expert: str = "auto"  # auto | sample-oracle | blip2 | blip2:FOLDER | hf:ID_OR_FOLDER | vqa:ID | openai:MODEL | replay:FILE.json | none
clip: str = "auto"  # auto (sample-trained CLIP on the sample, else default) | default (ViT-B-32:openai) | ARCH:random | PATH
n_examples: int = 8  # images shown beside their cues

# %%
from dimkit import cues, datasets, features
from dimkit.clip import parse_clip_spec

dataset = datasets.require(dataset)  # fails here, at once, if it is not prepared
# One expert for both stages: "auto" is resolved once (the last one used on the dataset, else its default).
expert_spec = cues.default_expert(dataset) if expert == "auto" else expert
# The settings of this notebook's two stages (`dimkit cues`, `dimkit features`): a bad value fails here, named.
cue_cfg = cues.CuesConfig.for_dataset(dataset, expert=expert_spec)
feature_cfg = features.FeaturesConfig.for_dataset(dataset, clip=clip, expert=expert_spec)
assert isinstance(n_examples, int) and n_examples >= 0, "n_examples must be a non-negative integer"
ds = datasets.load(dataset)
clip_spec = parse_clip_spec(features.resolve_clip_name(ds.name, clip))  # fails fast on an unknown spec
print_environment(clip_spec.model_id, clip_spec.weights_real)
print(f"\ndataset {ds.name} | expert {expert_spec} | clip {clip_spec.model_id}")
if dataset.startswith("sample"):
    print("NOTE: synthetic sample with synthetic oracle cues and a sample-trained CLIP -- "
          "numbers below are not comparable to the paper.")

# %% [markdown]
# ## The expert's question
# DIM's exact prompt (note the two spaces after "Question:"), 20 new tokens, greedy. dimkit keys every
# answer by the expert's model id, a *prompt version* and the SHA-256 of the image bytes: change the
# prompt and nothing old is reused; rename an image and nothing is recomputed.

# %%
from dimkit import experts
from dimkit.store import make_key

print(repr(experts.RELEASED_PROMPT), "->", experts.prompt_version(experts.RELEASED_PROMPT, 20))
ex = experts.make_expert(expert_spec)  # builds nothing heavy: models load on first use
demo_sha = "0" * 64
assert cues.cue_key(ex, demo_sha) == make_key("expert_cue", ex.model_id, ex.version, {"image_sha256": demo_sha})
print(f"expert {ex.model_id}, prompt version {ex.version}")

# %% [markdown]
# ## Cues
# One call: every distinct usable image is asked once, in batches; answers already stored are
# reused. Unusable images (missing, empty, truncated, corrupt ...) get no cue, are flagged in
# `mentions.parquet` (`image_status`) and counted in the report.

# %%
cue_result = cues.run(cue_cfg, dataset=ds)
print(cue_result.summary())

# %%
cue_result.table["cue_status"].value_counts().to_frame()

# %%
fig = cues.show_cues(ds, cue_result, n=n_examples)

# %% [markdown]
# ## Features
# One call again. It checks the images, replays the cues from the store, and encodes what the store
# lacks: mention, "mention [SEP] sentence" (the released join, a literal "[SEP]"), image, cue, entity
# descriptions -- and in a `+` dataset the original descriptions too. Vectors are raw CLIP outputs,
# not L2-normalised, as in the released code.

# %%
feature_result = features.run(feature_cfg, dataset=ds)
fs, feature_report = feature_result.features, feature_result.report
print(feature_result.summary())
fs.summary()

# %% [markdown]
# ### The released encoding, by hand
# The "mention [SEP] sentence" vector of the first mention, computed directly with open_clip, equals
# the stored row.

# %%
import numpy as np
import torch

from dimkit.clip import load_clip

model = load_clip(clip_spec)
first = ds.mentions.iloc[0]
tokens = model.tokenize([first["mention"] + " [SEP] " + first["sentence"]])
with torch.inference_mode():
    by_hand = model.model.encode_text(tokens.to(model.device)).float().cpu().numpy()[0]
np.testing.assert_allclose(fs.mention_sentence[0], by_hand, rtol=1e-3, atol=1e-4)
print(f"{first['mention']!r}: by hand == stored row (norm {np.linalg.norm(by_hand):.2f}, raw, not normalised)")

# %% [markdown]
# ## Do the cues point at the right entity?
# For test mentions whose gold entity shares its name with others, how often is the gold the closest
# (cosine) among its namesakes? The mention string cannot tell namesakes apart; the image and the cue
# can -- and they match the LLM descriptions of a `+` dataset much better than the originals.

# %%
hits = features.namesake_hits(ds, fs)
print(hits.attrs["label"])
hits

# %% [markdown]
# ## Results are data
# The reports are in the dataset folder (`reports/cues.json`, `reports/features.json`); the headline
# numbers of this notebook go to `runs/02_expert_cues/<dataset>.json`.

# %%
print(features.write_summary(ds, cue_result.report, feature_report, hits))
